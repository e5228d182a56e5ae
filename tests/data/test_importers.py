"""Yo'LLaVA and Yo'Chameleon importers on small fixtures; odd records are reported with their location."""

from __future__ import annotations

import json

import pytest

from unipers import cli
from unipers.data.importers import import_yochameleon, import_yollava, read_yochameleon, read_yollava_qa
from unipers.data.manifest import read_prepared
from synthetic import LATENTS, write_photos, write_yochameleon, write_yollava


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
    (root / "yollava-text-only-qa.json").write_text(json.dumps(text))
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
    text, text_issues = read_yollava_qa(yollava / "yollava-text-only-qa.json", "bo", root=yollava)
    assert text_issues == []
    assert [(s.task, s.question, s.image) for s in text] == [
        ("qa", "What breed is <bo>?", None), ("qa", "Does <bo> like asks?", None)]  # whole-word sks only
    assert read_yollava_qa(yollava / "yollava-text-only-qa.json", "mam", root=yollava) == ([], [])


def test_import_yollava_one_concept(tmp_path, yollava):
    (out,) = import_yollava(yollava, tmp_path / "out", concepts=["bo"])
    assert out == (tmp_path / "out" / "bo").absolute()
    concept, recs = read_prepared(out)
    assert (len(concept["train"]), len(concept["val"]), len(concept["test"])) == (4, 0, 2)
    assert len(concept["test_negatives"]) == 3  # mam's test photos, kept once beside the concept folders
    assert all(p.startswith("../.shared/") and (out / p).is_file() for p in concept["test_negatives"])
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
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == [".shared", "bo", "mam"]
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
    # two positive photos (a "yes" image and a full-slot generation target): one is held out
    assert (len(concept["train"]), len(concept["val"]), len(concept["negatives"])) == (1, 1, 1)
    assert all(r.image is None or (out / r.image).is_file() for r in recs)
    assert {r.image for r in recs if r.label is True and r.split == "train"} <= set(concept["train"])
    assert {r.image for r in recs if r.label is True and r.split == "val"} == set(concept["val"])
    assert not {r.image for r in recs if r.split == "train"} & set(concept["val"])
    assert [r.image for r in recs if r.label is False] == concept["negatives"]
    assert len(concept["import_issues"]) == 6 and "import issues: 6" in (out / "report.txt").read_text()


def _without(digest: dict, folder: str) -> dict:
    """A tree digest less the output folder: what remains is the user's input."""
    return {k: v for k, v in digest.items() if k != folder and not k.startswith(folder + "/")}


# --- Yo'LLaVA: QA files, options, images, shared negatives --------------------------------------------------------


@pytest.fixture
def published(tmp_path):
    """A Yo'LLaVA folder in the published layout, with both published QA files."""
    root = tmp_path / "yollava-data"
    write_yollava(root)
    return root


def test_yollava_qa_files_add_up_and_default_names_are_the_published_ones(tmp_path, published, tree_digest,
                                                                          unipers_cli):
    extra_v = tmp_path / "more-visual.json"
    extra_v.write_text(json.dumps({"bo": {"./yollava-data/test/bo/1.png": {
        "question": "Is <sks> asleep?", "options": {"A": "Yes", "B": "No"}, "correct_answer": "B"}}}))
    extra_t = [tmp_path / "more-text-1.json", tmp_path / "more-text-2.json"]
    for i, f in enumerate(extra_t):
        f.write_text(json.dumps({"bo": {"0": {"question": f"Extra {i}: what does sks eat?",
                                              "option": {"A": "Fish", "B": "Rice"}, "correct_answer": "A"}}}))
    (published / "yollava-text-qa.json").write_text(json.dumps({"bo": {}}))  # not a published name
    before = tree_digest(tmp_path)
    code, out, err = unipers_cli("prepare", "--from-yollava", published, "--name", "bo", "--out", tmp_path / "y",
                                 "--visual-qa", extra_v, "--text-qa", *extra_t, "--quiet")
    assert code == 0, err
    concept, recs = read_prepared(tmp_path / "y" / "bo")
    vqa = sorted(r.question for r in recs if r.task == "vqa")
    qa = sorted(r.question for r in recs if r.task == "qa")
    assert vqa == ["Is <bo> asleep?", "What is next to <bo> in photo 0?", "What is next to <bo> in photo 1?"]
    assert qa == ["Extra 0: what does <bo> eat?", "Extra 1: what does <bo> eat?",
                  "Is <bo> a dog or a cat (0)?", "Is <bo> a dog or a cat (1)?"]
    assert {r.source.split("#")[0] for r in recs if r.task == "qa"} == {
        "yollava:yollava-text-only-qa.json", f"yollava:{extra_t[0].as_posix()}", f"yollava:{extra_t[1].as_posix()}"}
    # a JSON in ROOT that is not a published QA file is reported, not silently skipped
    assert any(d["where"] == "yollava:yollava-text-qa.json" and "not read" in d["problem"]
               for d in concept["import_issues"])
    assert "yollava-text-qa.json: not read" in out
    assert _without(tree_digest(tmp_path), "y") == before


def test_yollava_missing_qa_file_is_refused(tmp_path, published, tree_digest, one_line_error, unipers_cli):
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yollava", published, "--out", tmp_path / "y",
                               "--text-qa", tmp_path / "nowhere.json")
    assert code == 2
    one_line_error(err, "--text-qa", "nowhere.json")
    assert tree_digest(tmp_path) == before


def test_yollava_class_word_facts_and_val_fraction_apply(tmp_path, published, unipers_cli):
    facts = tmp_path / "facts.txt"
    facts.write_text("<bo> has a red collar.\n")
    code, _, err = unipers_cli("prepare", "--from-yollava", published, "--name", "bo", "--out", tmp_path / "y",
                               "--class-word", "dog", "--facts", facts, "--val-fraction", "0.5", "--quiet")
    assert code == 0, err
    concept, recs = read_prepared(tmp_path / "y" / "bo")
    assert concept["class_word"] == "dog" and concept["facts"] == ["<bo> has a red collar."]
    assert (len(concept["train"]), len(concept["val"]), len(concept["test"])) == (2, 2, 2)
    assert {r.image for r in recs if r.task == "recognition" and r.split == "val" and r.label} == set(concept["val"])
    assert not {r.image for r in recs if r.split == "train"} & set(concept["val"])
    assert any("dog" in r.answer for r in recs if r.task == "caption")
    assert "<bo> has a red collar." in [r.answer for r in recs if r.task == "qa" and r.split == "train"]


@pytest.mark.parametrize("option", ["--class-word", "--facts"])
def test_yollava_one_concept_options_need_a_name(tmp_path, published, tree_digest, one_line_error, unipers_cli,
                                                 option):
    (tmp_path / "facts.txt").write_text("<bo> has a red collar.\n")
    value = "dog" if option == "--class-word" else tmp_path / "facts.txt"
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yollava", published, "--out", tmp_path / "y", option, value)
    assert code == 2
    one_line_error(err, option, "--name")
    assert tree_digest(tmp_path) == before


def test_yollava_concept_without_test_photos_needs_val_fraction(tmp_path, tree_digest, one_line_error, unipers_cli):
    root = tmp_path / "yollava-data"
    write_yollava(root, concepts=(("bo", 4, 2), ("mam", 3, 0)))
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yollava", root, "--out", tmp_path / "y")
    assert code == 2
    one_line_error(err, str(root / "test" / "mam"), "--val-fraction")
    assert tree_digest(tmp_path) == before
    code, _, err = unipers_cli("prepare", "--from-yollava", root, "--out", tmp_path / "y", "--val-fraction", "0.3",
                               "--quiet")
    assert code == 0, err
    assert len(read_prepared(tmp_path / "y" / "mam")[0]["val"]) == 1


@pytest.mark.parametrize("source,option,value", [
    ("yollava", "--image-root", "."),
    ("yochameleon", "--negatives", "."),
    ("yochameleon", "--clip", "."),
    ("yochameleon", "--hard", "5"),
    ("yochameleon", "--visual-qa", "q.json"),
    ("photos", "--text-qa", "q.json"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, published, tree_digest, one_line_error, unipers_cli,
                                                   source, option, value):
    json_path, _ = write_yochameleon(tmp_path)
    args = {"yollava": ["--from-yollava", published], "yochameleon": ["--from-yochameleon", json_path, "--name", "bo"],
            "photos": [published / "train" / "bo", "--name", "bo"]}[source]
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", *args, "--out", tmp_path / "out", option, value)
    assert code == 2
    one_line_error(err, option)
    assert tree_digest(tmp_path) == before


def test_qa_image_missing_under_root_is_not_taken_from_a_copy(tmp_path, published, tree_digest, monkeypatch):
    from synthetic import shape_image

    (published / "test" / "bo" / "1.png").unlink()  # the QA refers to it; copies exist elsewhere
    (tmp_path / "test" / "bo").mkdir(parents=True)  # beside ROOT: a sibling copy of the dataset
    shape_image(7).save(tmp_path / "test" / "bo" / "1.png")
    cwd = tmp_path / "elsewhere"
    (cwd / "yollava-data" / "test" / "bo").mkdir(parents=True)  # in the working directory
    shape_image(8).save(cwd / "yollava-data" / "test" / "bo" / "1.png")
    (published / "test" / "bo" / "qa.json").write_text(json.dumps({"0": {
        "question": "Where is <sks>?", "options": {"A": "Park", "B": "Home"}, "correct_answer": "A",
        "image": "../test/bo/1.png"}}))
    monkeypatch.chdir(cwd)
    before = tree_digest(tmp_path)
    samples, issues = read_yollava_qa(published / "yollava-visual-qa.json", "bo", root=published)
    assert [s.image for s in samples] == [str(published / "test" / "bo" / "0.png")]
    assert [i["problem"] for i in issues] == [f"image not found under {published}: ./yollava-data/test/bo/1.png"]
    (out,) = import_yollava(published, tmp_path / "y", concepts=["bo"])
    concept, recs = read_prepared(out)
    assert [r.question for r in recs if r.task == "vqa"] == ["What is next to <bo> in photo 0?"]
    problems = {d["where"]: d["problem"] for d in concept["import_issues"]}
    assert "image not found under" in problems["yollava:yollava-visual-qa.json#bo/./yollava-data/test/bo/1.png"]
    assert "image not found under" in problems["yollava:test/bo/qa.json#0"]
    assert not any("elsewhere" in s or s.startswith(str(tmp_path / "test")) for s in concept["sources"].values())
    assert _without(tree_digest(tmp_path), "y") == before


def test_yollava_test_photos_are_shared_once_not_copied_per_concept(tmp_path, tree_digest, unipers_cli):
    from unipers.eval.targets import expand_data_dirs, load_targets

    root = tmp_path / "yollava-data"
    concepts = [(c, 3, 2) for c in ("bo", "mam", "dug", "oong")]
    write_yollava(root, concepts=concepts)
    out = tmp_path / "y"
    code, _, err = unipers_cli("prepare", "--from-yollava", root, "--out", out, "--quiet")
    assert code == 0, err
    shared = sorted(p.name for p in (out / ".shared").iterdir() if p.suffix == ".png")
    assert len(shared) == 8  # each test photo once, not once per other concept (3 x 8)
    for c, *_ in concepts:
        concept, recs = read_prepared(out / c)
        assert not [p for p in (out / c / "images").iterdir() if p.name.startswith("testneg")]
        assert len(concept["test_negatives"]) == 6
        assert all(p.startswith("../.shared/") and (out / c / p).is_file() for p in concept["test_negatives"])
        neg = [r.image for r in recs if r.split == "test" and r.task == "recognition" and not r.label]
        assert sorted(neg) == sorted(concept["test_negatives"])
        assert all(r.image is None or not r.image.startswith("..") for r in recs if r.split != "test")  # training
    assert [p.name for p in expand_data_dirs([out])] == ["bo", "dug", "mam", "oong"]
    targets = load_targets(expand_data_dirs([out]))
    assert {t.split for t in targets.values()} == {"test"}
    assert all(len(t.positives) == 2 and len(t.negatives) == 6 for t in targets.values())
    # a later one-concept import reuses the shared photos and leaves the other folders alone
    keep = {k: v for k, v in tree_digest(out).items() if not k.startswith("bo")}
    code, _, err = unipers_cli("prepare", "--from-yollava", root, "--name", "bo", "--out", out, "--overwrite",
                               "--quiet")
    assert code == 0, err
    assert {k: v for k, v in tree_digest(out).items() if not k.startswith("bo")} == keep


def test_yollava_shared_folder_not_written_by_unipers_is_refused(tmp_path, published, tree_digest, one_line_error,
                                                                 unipers_cli):
    (tmp_path / "y" / ".shared").mkdir(parents=True)
    (tmp_path / "y" / ".shared" / "mine.txt").write_text("my notes")
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yollava", published, "--out", tmp_path / "y")
    assert code == 2
    one_line_error(err, str(tmp_path / "y" / ".shared"))
    assert tree_digest(tmp_path) == before


# --- Yo'Chameleon: tokens, held-out photos, options, image paths, issue lists ----------------------------------


def test_yochameleon_prompts_name_the_concept_without_its_latent_tokens(tmp_path):
    from unipers.data.importers_yochameleon import clean_text

    assert clean_text(f"<reserved16200> is {LATENTS}. A photo of <reserved16200>.", "bo") == ("A photo of <bo>.", 16)
    assert clean_text(f"{LATENTS.replace('162', '163')}Yes, it is <sks>.", "bo") == ("Yes, it is <bo>.", 16)
    json_path, data = write_yochameleon(tmp_path)
    samples, issues = read_yochameleon(json_path, "bo", image_root=data)
    assert issues == []
    texts = [t for s in samples for t in (s.question, s.answer, s.prompt) if t]
    assert not [t for t in texts if "<reserved" in t or "<bo> is <bo>" in t or "sks" in t]
    gen = [(s.prompt, s.gen_slots) for s in samples if s.task == "generation"]
    assert gen == [("A photo of <bo>.", None)] * 4 + [("A photo of <bo>.", 2)] * 2  # 4 of 16 latents -> 2 of 8
    assert [(s.question, s.answer) for s in samples if s.task == "qa"] == [("What colour is <bo>?", "<bo> is orange.")]
    assert {s.question for s in samples if s.task == "recognition"} == {
        "Can you see <bo> in this photo? Answer with a single word."}


def test_yochameleon_options_apply_and_photos_are_held_out(tmp_path, tree_digest, unipers_cli):
    from PIL import Image

    from unipers.eval.targets import read_target

    json_path, data = write_yochameleon(tmp_path, n_pos=5)
    facts = tmp_path / "facts.txt"
    facts.write_text("<bo> likes the beach.\n")
    before = tree_digest(tmp_path)
    out = tmp_path / "out"
    code, _, err = unipers_cli("prepare", "--from-yochameleon", json_path, "--name", "bo", "--image-root", data,
                               "--out", out, "--class-word", "dog", "--facts", facts, "--max-side", "48",
                               "--val-fraction", "0.4")
    assert code == 0, err
    concept, recs = read_prepared(out)
    assert concept["class_word"] == "dog" and concept["facts"] == ["<bo> likes the beach."]
    assert "<bo> likes the beach." in [r.answer for r in recs if r.task == "qa"]
    assert all(max(Image.open(p).size) <= 48 for p in (out / "images").iterdir())
    assert (len(concept["train"]), len(concept["val"])) == (3, 2)
    assert not {r.image for r in recs if r.split == "train"} & set(concept["val"] + concept["val_negatives"])
    target = read_target(out)
    assert target.split == "val" and len(target.positives) == 2
    assert _without(tree_digest(tmp_path), "out") == before


@pytest.mark.parametrize("option,value,named", [
    ("--val-fraction", "0", "held-out"),  # no held-out photos: eval could never score recognition
    ("--val-fraction", "1.5", "[0, 1)"),
    ("--facts", "nowhere.txt", "nowhere.txt"),
])
def test_yochameleon_bad_option_values_are_refused(tmp_path, tree_digest, one_line_error, unipers_cli, option,
                                                    value, named):
    json_path, data = write_yochameleon(tmp_path)
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yochameleon", json_path, "--name", "bo", "--image-root", data,
                               "--out", tmp_path / "out", option, value)
    assert code == 2
    one_line_error(err, option, named)
    assert tree_digest(tmp_path) == before


def test_yochameleon_authors_paths_resolve_under_image_root_by_their_tail(tmp_path):
    from unipers.data.importers import resolve_under

    json_path, data = write_yochameleon(tmp_path, n_pos=2, n_neg=1, n_soft=0)
    outside = write_photos(tmp_path / "outside", 1)[0]
    assert resolve_under("/mnt/localssd/code/data/yochameleon-data/train/bo/0.png", data) == data / "train/bo/0.png"
    assert resolve_under("train/bo/1.png", data) == data / "train/bo/1.png"
    assert resolve_under(str(outside), data) is None  # exists, but outside the root
    assert resolve_under("../outside/photo_00.png", data) is None
    assert resolve_under("../outside/photo_00.png", tmp_path / "outside") == outside  # its tail, inside
    records = json.loads(json_path.read_text())
    records += [{"image": [str(outside)], "conversations": [{"from": "human", "value": "<image> Is <sks> here?"},
                                                           {"from": "bot", "value": "Yes."}]},
                {"image": ["../outside/photo_00.png"], "conversations": [
                    {"from": "human", "value": "<image> Is <sks> here?"}, {"from": "bot", "value": "No."}]}]
    json_path.write_text(json.dumps(records))
    samples, issues = read_yochameleon(json_path, "bo", image_root=data)
    assert {s.image for s in samples if s.image} == {str(data / "train/bo/0.png"), str(data / "train/bo/1.png"),
                                                    str(data / "train/bo/negative_example/n0.png")}
    n = len(records)
    assert [(i["where"], i["problem"].split(":")[0]) for i in issues] == [
        (f"yochameleon:bo.json#{n - 2}.conversations[0]", f"image not found under {data} (--image-root)"),
        (f"yochameleon:bo.json#{n - 1}.conversations[0]", f"image not found under {data} (--image-root)")]


def test_yochameleon_no_usable_records_lists_every_problem(tmp_path, tree_digest, one_line_error, unipers_cli):
    json_path, data = write_yochameleon(tmp_path, n_pos=2, n_neg=1, n_soft=0)
    records = [r for r in json.loads(json_path.read_text()) if r["image"]]  # image records only
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records + ["not a record"]))
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yochameleon", bad, "--name", "bo", "--out", tmp_path / "out",
                               "--image-root", tmp_path / "no_such_folder")
    assert code == 2
    one_line_error(err, "--image-root", "no_such_folder")
    assert tree_digest(tmp_path) == before
    (tmp_path / "empty_root").mkdir()  # the authors' paths match nothing under it
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-yochameleon", bad, "--name", "bo", "--out", tmp_path / "out",
                               "--image-root", tmp_path / "empty_root")
    assert code == 2
    last = one_line_error(err, str(bad), "no usable records", f"{len(records) + 1} problem(s)")
    listed = err.strip().splitlines()[:-1]
    assert len(listed) == len(records) + 1 and last not in listed
    for i in range(len(records)):
        assert any(f"bad.json#{i}.conversations[0]: image not found under" in line for line in listed)
    assert any(f"bad.json#{len(records)}: record is a str" in line for line in listed)
    assert tree_digest(tmp_path) == before


def test_facts_bare_name_rewrite_is_documented(tmp_path):
    from pathlib import Path

    from unipers.data.samples import read_facts

    (tmp_path / "f.txt").write_text("<dragon> is a plush dragon\n")
    (tmp_path / "f.json").write_text(json.dumps([{"question": "What is dragon?", "answer": "A toy."}]))
    assert read_facts(tmp_path / "f.txt", "dragon")[0] == ["<dragon> is a plush <dragon>."]
    assert read_facts(tmp_path / "f.json", "dragon")[1] == [{"question": "What is <dragon>?", "answer": "A toy."}]
    docs = " ".join((Path(__file__).parents[2] / "docs" / "prepare.md").read_text().split())
    assert "a bare word equal to the concept's name" in docs and "<dragon> is a plush <dragon>" in docs
    parser = cli.build_parser(["prepare"])
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("prepare"))
    assert "bare word equal to NAME is rewritten to <NAME>" in " ".join(sub.format_help().split())
