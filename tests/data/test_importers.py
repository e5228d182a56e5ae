"""Yo'LLaVA and Yo'Chameleon importers on small fixtures; odd records are reported with their location."""

from __future__ import annotations

import json

import pytest

from unipers import cli
from unipers.data.importers import import_yochameleon, import_yollava, read_yochameleon, read_yollava_qa
from unipers.data.manifest import read_prepared
from synthetic import write_photos


@pytest.fixture
def yollava(tmp_path):
    root = tmp_path / "yollava-data"
    write_photos(root / "train" / "bo", 4, start=0)
    write_photos(root / "train" / "mam", 3, start=10)
    write_photos(root / "test" / "bo", 2, start=20)
    write_photos(root / "test" / "mam", 3, start=30)
    write_photos(root / "train" / "bo" / "negative_example", 3, start=40)
    visual = {
        "bo": {
            "./yollava-data/test/bo/photo_00.png": {"question": "What colour is <sks>'s collar?",
                                                    "options": {"A": "Red", "B": "Blue"}, "correct_answer": "A"},
            "./yollava-data/test/bo/photo_01.png": {"question": "Is sks asleep?", "options": {"A": "Yes", "B": "No"},
                                                    "correct_answer": "C"},
            "./yollava-data/test/bo/photo_09.png": {"question": "Is <sks> here?", "options": {"A": "Yes", "B": "No"},
                                                    "correct_answer": "A"},
            "./yollava-data/test/bo/photo_01.png#2": {"options": {"A": "x", "B": "y"}, "correct_answer": "A"},
            "odd": ["not", "an", "object"],
        },
        "mam": {"./yollava-data/test/mam/photo_00.png": {"question": "Is <sks> a person?",
                                                         "options": {"A": "Yes", "B": "No"}, "correct_answer": "A"}},
    }
    (root / "yollava-visual-qa.json").write_text(json.dumps(visual))
    text = {"bo": {"0": {"question": "What breed is sks?", "option": {"A": "Shiba", "B": "Poodle"}, "correct_answer": "A"},
                   "1": {"question": "Does <sks> like asks?", "option": {"A": "Yes", "B": "No"}, "correct_answer": "B"}}}
    (root / "yollava-text-qa.json").write_text(json.dumps(text))
    flat = {"3": {"question": "Where is <sks>?", "options": {"A": "Park", "B": "Beach"}, "correct_answer": "B",
                  "image": "test/bo/photo_01.png"}}
    (root / "test" / "bo" / "qa.json").write_text(json.dumps(flat))
    return root


def test_yollava_qa_parser_rewrites_placeholders_and_reports_odd_items(yollava):
    samples, issues = read_yollava_qa(yollava / "yollava-visual-qa.json", "bo", root=yollava)
    assert [(s.task, s.question, s.answer, s.options) for s in samples] == [
        ("vqa", "What colour is <bo>'s collar?", "A", {"A": "Red", "B": "Blue"})]
    assert samples[0].split == "test" and samples[0].image.endswith("test/bo/photo_00.png")
    assert samples[0].source == "yollava:yollava-visual-qa.json#bo/./yollava-data/test/bo/photo_00.png"
    where = {i["where"].split("#", 1)[1]: i["problem"] for i in issues}
    assert "correct_answer 'C'" in where["bo/./yollava-data/test/bo/photo_01.png"]
    assert "image not found" in where["bo/./yollava-data/test/bo/photo_09.png"]
    assert "question" in where["bo/./yollava-data/test/bo/photo_01.png#2"]
    assert "list" in where["bo/odd"]
    text, text_issues = read_yollava_qa(yollava / "yollava-text-qa.json", "bo", root=yollava)
    assert text_issues == []
    assert [(s.task, s.question, s.image) for s in text] == [
        ("qa", "What breed is <bo>?", None), ("qa", "Does <bo> like asks?", None)]  # whole-word sks only
    assert read_yollava_qa(yollava / "yollava-text-qa.json", "mam", root=yollava) == ([], [])


def test_import_yollava_one_concept(tmp_path, yollava):
    (out,) = import_yollava(yollava, tmp_path / "out", concepts=["bo"])
    assert out == (tmp_path / "out" / "bo").absolute()
    concept, recs = read_prepared(out)
    assert (len(concept["train"]), len(concept["val"]), len(concept["test"])) == (4, 0, 2)
    assert len(concept["test_negatives"]) == 3  # mam's test photos
    assert len(concept["negatives"]) == 3 and {d["kind"] for d in concept["negative_details"]} == {"given"}
    test_rec = [r for r in recs if r.task == "recognition" and r.split == "test"]
    assert sorted(r.label for r in test_rec) == [False] * 3 + [True] * 2
    vqa = [r for r in recs if r.task == "vqa"]
    by_q = {r.question: r for r in vqa}
    assert set(by_q) == {"What colour is <bo>'s collar?", "Where is <bo>?"}
    # QA images point at the copies of the test photos, not new files
    src = concept["sources"]
    assert src[by_q["Where is <bo>?"].image].endswith("test/bo/photo_01.png")
    assert by_q["Where is <bo>?"].image in concept["test"]
    assert by_q["Where is <bo>?"].source == "yollava:test/bo/qa.json#3"
    assert len([r for r in recs if r.task == "qa" and r.split == "test"]) == 2
    assert len(concept["import_issues"]) == 4
    report = (out / "report.txt").read_text()
    assert "import issues: 4" in report and "correct_answer 'C'" in report


def test_import_yollava_all_concepts_from_cli(tmp_path, yollava, capsys):
    assert cli.main(["prepare", "--from-yollava", str(yollava), "--out", str(tmp_path / "y"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == ["bo", "mam"]
    concept, recs = read_prepared(tmp_path / "y" / "mam")
    assert concept["negatives"] == [] and "no --negatives" in concept["retrieval"]["skipped"]
    assert [r.question for r in recs if r.task == "vqa"] == ["Is <mam> a person?"]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="nope"):
        import_yollava(yollava, tmp_path / "z", concepts=["nope"])


def test_import_yollava_refuses_a_bad_folder_name_before_writing_any_concept(tmp_path, yollava, capsys):
    write_photos(yollava / "train" / "zz.v2", 3, start=50)  # sorts after bo and mam
    out = tmp_path / "y"
    assert cli.main(["prepare", "--from-yollava", str(yollava), "--out", str(out), "--quiet"]) == 2
    assert "'zz.v2'" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture
def yochameleon(tmp_path):
    imgs = write_photos(tmp_path / "yc_images", 4)
    run = "<reserved16200>" + "".join(f"<reserved{16201 + i}>" for i in range(16))
    short = "<reserved16200>" + "".join(f"<reserved{16201 + i}>" for i in range(4))
    records = [
        {"image": [str(imgs[0])], "conversations": [
            {"from": "human", "value": f"<image>\nIs {run} in this photo?"}, {"from": "bot", "value": f"Yes, {run} is in it."},
            {"from": "human", "value": f"What colour is {run}?"}, {"from": "bot", "value": f"{run} is brown."}]},
        {"image": ["photo_01.png"], "conversations": [
            {"from": "human", "value": "<image>\nIs <sks> in this photo?"}, {"from": "bot", "value": "No, it is not."}]},
        {"image": [str(imgs[2])], "conversations": [
            {"from": "human", "value": f"A photo of {short}."}, {"from": "bot", "value": "<image>"}]},
        {"image": [str(imgs[3])], "conversations": [
            {"from": "human", "value": f"A photo of {run}."}, {"from": "bot", "value": "<image>"}]},
        {"image": [str(imgs[3])], "conversations": [
            {"from": "human", "value": f"<image>\nDescribe {run}."}, {"from": "bot", "value": f"{run} sits on grass."}]},
        "not a record",
        {"image": [str(imgs[0])]},
        {"image": ["missing.png"], "conversations": [{"from": "human", "value": "<image> Is <sks> here?"},
                                                    {"from": "bot", "value": "Yes."}]},
        {"image": 7, "conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]},
        {"image": [str(imgs[0]), str(imgs[1])], "conversations": [
            {"from": "human", "value": "<image><image> Which one is <sks>?"}, {"from": "bot", "value": "The first."}]},
        {"image": [str(imgs[0])], "conversations": [{"from": "bot", "value": "hi"}, {"from": "human", "value": "x"}]},
    ]
    path = tmp_path / "bo_train.json"
    path.write_text(json.dumps(records))
    return path


def test_read_yochameleon_maps_tokens_and_reports_odd_records(yochameleon):
    samples, issues = read_yochameleon(yochameleon, "bo", image_root=yochameleon.parent / "yc_images")
    got = [(s.task, s.question or s.prompt, s.answer, s.label, s.gen_slots) for s in samples]
    assert got == [
        ("recognition", "Is <bo> in this photo?", "Yes, <bo> is in it.", True, None),
        ("qa", "What colour is <bo>?", "<bo> is brown.", None, None),
        ("recognition", "Is <bo> in this photo?", "No, it is not.", False, None),
        ("generation", "A photo of <bo>.", None, None, 2),  # 5 of 17 tokens -> round(5/17*8) of 8 slots
        ("generation", "A photo of <bo>.", None, None, None),
        ("caption", "Describe <bo>.", "<bo> sits on grass.", None, None),
    ]
    assert samples[2].image.endswith("yc_images/photo_01.png")
    assert samples[0].source == "yochameleon:bo_train.json#0.conversations[0]"
    where = {i["where"]: i["problem"] for i in issues}
    assert "record is a str" in where["yochameleon:bo_train.json#5"]
    assert "conversations" in where["yochameleon:bo_train.json#6"]
    assert "image not found" in where["yochameleon:bo_train.json#7.conversations[0]"]
    assert "'image' must be" in where["yochameleon:bo_train.json#8"]
    assert "2 images" in where["yochameleon:bo_train.json#9.conversations[0]"]
    assert "human turn then a bot turn" in where["yochameleon:bo_train.json#10.conversations[0]"]


def test_import_yochameleon_folder(tmp_path, yochameleon):
    out = import_yochameleon([yochameleon], "bo", tmp_path / "bo_yc", image_root=yochameleon.parent / "yc_images")
    concept, recs = read_prepared(out)
    assert len(recs) == 6 and len(concept["train"]) == 2 and len(concept["negatives"]) == 1
    assert all(r.image is None or (out / r.image).is_file() for r in recs)
    assert {r.image for r in recs if r.label is True} <= set(concept["train"])
    assert [r.image for r in recs if r.label is False] == concept["negatives"]
    assert len(concept["import_issues"]) == 6 and "import issues: 6" in (out / "report.txt").read_text()
