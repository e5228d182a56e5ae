"""The benchmark readers (MyVLM, UnifyBench, DreamBench, MC-LLaVA, PODS) on small folders in their published
layouts: the right photos in train / test, texts carried over exactly, class words, named test sets and
multi-concept membership; and one refusal each that changes nothing on disk."""

from __future__ import annotations

import json

import pytest

from unipers.data.importers import (ImportRefused, import_dreambench, import_mcllava, import_myvlm, import_pods,
                                    import_unifybench)
from unipers.data.manifest import Sample, read_prepared
from synthetic import write_photos


def sources(out, role):
    """The source files of a prepared folder's photos of one role (train / val / test), by file name."""
    concept, _ = read_prepared(out)
    return sorted(concept["sources"][rel].rsplit("/", 1)[1] for rel in concept[role])


def source_of(out, rel):
    return read_prepared(out)[0]["sources"][rel]


# ---- MyVLM ----

@pytest.fixture
def myvlm(tmp_path):
    root = tmp_path / "myvlm_data"
    c = root / "cat_statue"
    write_photos(c, 6, start=0, pattern="IMG_{:02d}.jpg")
    write_photos(c, 1, start=9, pattern="stray.png")
    caps = {f"IMG_{i:02d}.jpg": [f"cat_statue sits on shelf {i}.", f"A photo of Cat_Statue near a window ({i})."]
            for i in range(6)}
    (c / "captions.json").write_text(json.dumps(caps))
    (c / "additional_llava_vqa_data.json").write_text(json.dumps(
        {"IMG_01.jpg": [["What colour is cat_statue?", "cat_statue is white."]]}))
    return root


def test_myvlm_from_cli_splits_photos_and_keeps_captions(tmp_path, myvlm, unipers_cli):
    code, out, err = unipers_cli("prepare", "--from-myvlm", myvlm, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    folder = tmp_path / "out" / "cat_statue"
    concept, recs = read_prepared(folder)
    train, test = sources(folder, "train"), sources(folder, "test")
    assert len(train) == 4 and len(test) == 2 and set(train) | set(test) == {f"IMG_{i:02d}.jpg" for i in range(6)}
    caps = [r for r in recs if r.task == "caption"]
    assert len(caps) == 12 and all(r.source.startswith("myvlm:cat_statue/captions.json#") for r in caps)  # no templates
    for r in caps:
        name = source_of(folder, r.image).rsplit("/", 1)[1]
        i = int(name[4:6])
        assert r.split == ("train" if name in train else "test")
        assert r.question == "Please caption this image."
        assert r.answer in (f"<cat_statue> sits on shelf {i}.", f"A photo of <cat_statue> near a window ({i}).")
    (vqa,) = [r for r in recs if r.task == "vqa"]
    assert (vqa.question, vqa.answer, vqa.options) == ("What colour is <cat_statue>?", "<cat_statue> is white.", None)
    assert source_of(folder, vqa.image).endswith("IMG_01.jpg")
    assert [d["where"] for d in concept["import_issues"]] == ["myvlm:cat_statue/stray.png"]
    rec_test = [r for r in recs if r.task == "recognition" and r.split == "test"]
    assert len(rec_test) == 2 and all(r.label for r in rec_test)
    assert "wrote" in out


def test_myvlm_n_train_and_seed(tmp_path, myvlm):
    (a,) = import_myvlm(myvlm, tmp_path / "a", n_train=3, seed=1)
    (b,) = import_myvlm(myvlm, tmp_path / "b", n_train=3, seed=1)
    assert len(sources(a, "train")) == 3 and sources(a, "train") == sources(b, "train")
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()


def test_myvlm_caption_of_a_missing_image_is_refused(tmp_path, myvlm, tree_digest, one_line_error, unipers_cli):
    cap = myvlm / "cat_statue" / "captions.json"
    cap.write_text(json.dumps({**json.loads(cap.read_text()), "IMG_99.jpg": ["cat_statue."]}))
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-myvlm", myvlm, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert "image not found" in one_line_error(err, str(cap), "IMG_99.jpg")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


# ---- UnifyBench ----

def write_unifybench(root, concepts=("bo", "mam")):
    for k, c in enumerate(concepts):
        train, test = root / "concept" / "train" / c, root / "concept" / "test" / c
        write_photos(train, 4, start=100 * k, pattern="{}.png")
        write_photos(train / "negative_example", 2, start=100 * k + 50, pattern="n{}.png")
        write_photos(train / "cropped", 1, start=100 * k + 60, pattern="{}.png")
        (train / "info.json").write_text(json.dumps({"class": "dog" if c == "bo" else "cat", "info": f"<{c}> is..."}))
        write_photos(test, 2, start=100 * k + 20, pattern="{}.png")
        (test / "text_only.json").write_text(json.dumps([
            {"question": f"What is <{c}>'s favourite toy?", "answer": f"<{c}> loves the red ball."},
            {"question": f"How old is <{c}>?", "answer": "B", "options": {"A": "Two", "B": "Five"}}]))
        (test / "vqa.json").write_text(json.dumps({
            "0.png": {"question": f"What is <{c}> doing?", "answer": "Sleeping",
                      "options": ["Eating", "Sleeping", "Running"]},
            "1.png": {"question": f"Where is <{c}>?", "answer": "On the sofa."}}))
        (test / "t2i_conditions.json").write_text(json.dumps([f"A photo of <{c}>.", f"<{c}> wearing its hat."]))
    write_photos(root / "random_images", 2, start=900, pattern="{}.png")
    return root


def test_unifybench_questions_prompts_negatives_and_class_word(tmp_path):
    root = write_unifybench(tmp_path / "unictokens_data")
    outs = import_unifybench(root, tmp_path / "out")
    assert [o.name for o in outs] == ["bo", "mam"]
    bo = outs[0]
    concept, recs = read_prepared(bo)
    assert concept["class_word"] == "dog" and read_prepared(outs[1])[0]["class_word"] == "cat"
    assert sources(bo, "train") == ["0.png", "1.png", "2.png", "3.png"] and sources(bo, "test") == ["0.png", "1.png"]
    assert all("/concept/test/bo/" in concept["sources"][rel] for rel in concept["test"])
    negs = sorted(concept["sources"][rel].split("unictokens_data/")[1] for rel in concept["negatives"])
    assert negs == ["concept/train/bo/negative_example/n0.png", "concept/train/bo/negative_example/n1.png",
                    "random_images/0.png", "random_images/1.png"]
    qa = [(r.split, r.question, r.answer, r.options) for r in recs if r.task == "qa"]
    assert qa == [("test", "What is <bo>'s favourite toy?", "<bo> loves the red ball.", None),
                  ("test", "How old is <bo>?", "B", {"A": "Two", "B": "Five"})]
    vqa = {r.question: r for r in recs if r.task == "vqa"}
    assert vqa["What is <bo> doing?"].answer == "B"  # the option's text -> its letter
    assert vqa["What is <bo> doing?"].options == {"A": "Eating", "B": "Sleeping", "C": "Running"}
    assert (vqa["Where is <bo>?"].answer, vqa["Where is <bo>?"].options) == ("On the sofa.", None)
    assert source_of(bo, vqa["Where is <bo>?"].image).endswith("concept/test/bo/1.png")
    assert vqa["Where is <bo>?"].image in concept["test"]  # the test photo's copy, not a second one
    gen = [(r.split, r.prompt, r.image) for r in recs
           if r.task == "generation" and (r.source or "").startswith("unifybench")]
    assert gen == [("test", "A photo of <bo>.", None), ("test", "<bo> wearing its hat.", None)]


def test_unifybench_bad_json_is_refused(tmp_path, tree_digest, one_line_error, unipers_cli):
    root = write_unifybench(tmp_path / "unictokens_data")
    bad = root / "concept" / "test" / "mam" / "vqa.json"
    bad.write_text('{"0.png": {"question": "x",')
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-unifybench", root, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert "cannot read JSON" in one_line_error(err, str(bad))
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()  # not even bo's folder
    with pytest.raises(ImportRefused, match="vqa.json"):
        import_unifybench(root, tmp_path / "out", concepts=["mam"])
    missing = root / "concept" / "test" / "bo" / "t2i_conditions.json"
    missing.unlink()
    with pytest.raises(ImportRefused, match=f"{missing}: file not found") as e:
        import_unifybench(root, tmp_path / "out", concepts=["bo"])
    assert not (tmp_path / "out").exists() and e.value.details == [f"  {missing}: file not found"]


# ---- DreamBench ----

def write_dreambench(root):
    data = root / "dataset"
    write_photos(data / "backpack", 4, start=300, pattern="{:02d}.jpg")
    write_photos(data / "dog6", 5, start=320, pattern="{:02d}.jpg")

    def plist(kind):
        return ["prompt_list = ["] + [f"'a {{0}} {{1}} {kind} prompt {i}'.format(unique_token, class_token),"
                                      for i in range(25)] + ["]"]

    text = ["Classes", "", "subject_name,class", "backpack,backpack", "dog6,dog", "", "Prompts", "",
            "Object Prompts", "", *plist("object"), "", "Live Subject Prompts", "", *plist("live"), ""]
    (data / "prompts_and_classes.txt").write_text("\n".join(text))
    (data / "references_and_licenses.txt").write_text("...")
    return root


def test_dreambench_class_words_and_the_right_prompt_list(tmp_path, unipers_cli):
    root = write_dreambench(tmp_path / "dreambooth")
    code, _, err = unipers_cli("prepare", "--from-dreambench", root, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    for name, word, kind, n in (("backpack", "backpack", "object", 4), ("dog6", "dog", "live", 5)):
        concept, recs = read_prepared(tmp_path / "out" / name)
        assert concept["class_word"] == word
        assert len(concept["train"]) + len(concept["val"]) == n and len(concept["val"]) == 1
        gen = [r for r in recs if r.task == "generation" and r.split == "test"]
        assert [r.prompt for r in gen] == [f"a <{name}> {word} {kind} prompt {i}" for i in range(25)]
        assert all(r.image is None and r.source == f"dreambench:prompts_and_classes.txt#{kind}/{i}"
                   for i, r in enumerate(gen))


def test_dreambench_subject_without_folder_is_refused(tmp_path, tree_digest, one_line_error, unipers_cli):
    root = write_dreambench(tmp_path / "dreambooth")
    txt = root / "dataset" / "prompts_and_classes.txt"
    txt.write_text(txt.read_text().replace("dog6,dog", "dog6,dog\nteapot,teapot"))
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-dreambench", root, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    one_line_error(err, str(root / "dataset" / "teapot"), "folder not found")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()
    txt.write_text(txt.read_text().replace("'a {0} {1} live prompt 3'", "'a {0} {1} live prompt 3"))
    with pytest.raises(ImportRefused, match="prompts_and_classes.txt:"):
        import_dreambench(root, tmp_path / "out")


# ---- MC-LLaVA ----

def write_mcllava(root):
    g = root / "two_concept"
    for k, c in enumerate(("Anya", "Loid")):
        write_photos(g / "concept" / "train" / c, 3, start=400 + 10 * k, pattern="{}.png")
        write_photos(g / "concept" / "train" / c, 1, start=405 + 10 * k, pattern="0_mask.png")
        test = g / "concept" / "test" / c
        write_photos(test, 2, start=420 + 10 * k, pattern="{}.png")
        (test / "choice.json").write_text(json.dumps({f"two_concept/concept/test/{c}/0.png": {
            "Human": f"What is <{c}> holding?\nA. A cup\nB. A ball", "AI": "B"}}))
        (test / "vqa.json").write_text(json.dumps({f"/mnt/authors/mcdataset/two_concept/concept/test/{c}/1.png": {
            "Human": f"What is <{c}> wearing?", "AI": "A green coat."}}))
        (test / "qa.json").write_text(json.dumps([{"question": f"Is <{c}> a spy?\nA. Yes\nB. No", "answer": "A"}]))
    multi = g / "multi" / "Anya_Loid"
    write_photos(multi, 2, start=450, pattern="{}.png")
    (multi / "choice.json").write_text(json.dumps({"0.png": [
        {"Human": "Where is <Anya>?\nA. Left\nB. Right", "AI": "A"},
        {"Human": "Are <Anya> and <Loid> at home?\nA. Yes\nB. No", "AI": "B"}]}))
    (multi / "vqa.json").write_text(json.dumps({"1.png": [{"Human": "What are they doing?", "AI": "Eating."}]}))
    (multi / "qa.json").write_text(json.dumps([{"question": "Who is older?\nA. <Anya>\nB. <Loid>", "answer": "B"}]))
    (multi / "position.json").write_text("{}")
    write_photos(root / "random-images", 2, start=480, pattern="{}.png")
    return root


def test_mcllava_one_folder_per_concept_multi_questions_with_every_concept_named(tmp_path):
    from unipers.eval.targets import content_key, load_targets

    root = write_mcllava(tmp_path / "mcdataset")
    anya, loid = import_mcllava(root, tmp_path / "out")
    concept, recs = read_prepared(anya)
    assert sources(anya, "train") == ["0.png", "1.png", "2.png"]  # no masks
    tests = sorted(s.split("mcdataset/")[1] for s in (concept["sources"][r] for r in concept["test"]))
    assert tests == ["two_concept/concept/test/Anya/0.png", "two_concept/concept/test/Anya/1.png",
                     "two_concept/multi/Anya_Loid/0.png", "two_concept/multi/Anya_Loid/1.png"]
    assert len(concept["negatives"]) == 2
    by_q = {r.question: r for r in recs if r.task in ("qa", "vqa")}
    single = by_q["What is <Anya> holding?"]
    assert (single.task, single.answer, single.options, single.concepts) == ("vqa", "B", {"A": "A cup", "B": "A ball"},
                                                                             None)
    assert source_of(anya, single.image).endswith("test/Anya/0.png")
    assert source_of(anya, by_q["What is <Anya> wearing?"].image).endswith("test/Anya/1.png")  # authors' path, by tail
    assert (by_q["Is <Anya> a spy?"].task, by_q["Is <Anya> a spy?"].image) == ("qa", None)
    assert by_q["Where is <Anya>?"].concepts == ["Anya"]
    assert by_q["Are <Anya> and <Loid> at home?"].concepts == ["Anya", "Loid"]
    assert by_q["What are they doing?"].concepts == ["Anya", "Loid"]  # names none: the whole scenario
    assert by_q["Who is older?"].options == {"A": "<Anya>", "B": "<Loid>"} and by_q["Who is older?"].answer == "B"
    loid_q = {r.question: r for r in read_prepared(loid)[1] if r.task in ("qa", "vqa")}
    assert "Where is <Anya>?" not in loid_q
    assert loid_q["Are <Anya> and <Loid> at home?"].concepts == ["Anya", "Loid"]
    assert loid_q["Are <Anya> and <Loid> at home?"].concept == "Loid"
    targets = load_targets([anya, loid])  # eval reads the new fields
    assert len(targets["Anya"].choices["vqa"]) == 3 and len(targets["Anya"].positives) == 4
    multi = {content_key(p) for p in targets["Anya"].positives if "multi" in source_of(anya, str(p.relative_to(anya)))}
    assert len(multi) == 2 and targets["Anya"].subsets["with_others"] == multi  # scored apart by eval


def test_mcllava_missing_multi_image_is_refused_for_every_concept(tmp_path, tree_digest, one_line_error, unipers_cli):
    root = write_mcllava(tmp_path / "mcdataset")
    (root / "two_concept" / "multi" / "Anya_Loid" / "1.png").unlink()
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-mcllava", root, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    one_line_error(err, str(root / "two_concept" / "multi" / "Anya_Loid" / "vqa.json"), "image not found")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


# ---- PODS ----

def write_pods(root):
    annos = {}
    shifts = ["in_distribution", "pose", "distractors", "pose_and_distractors"]
    for k, c in enumerate(("mug_01", "shoe_02")):
        write_photos(root / "train" / c, 3, start=600 + 20 * k, pattern="{}.jpg")
        write_photos(root / "test" / c, 8, start=610 + 20 * k, pattern="{}.jpg")
        for i in range(3):
            annos[f"train/{c}/{i}.jpg"] = {"class": c, "split": "train"}
        for i in range(8):  # ids as paths and as bare stems: both layouts are read
            annos[f"test/{c}/{i}.jpg" if i % 2 else f"{c}_{i}"] = {"class": c, "split": "test",
                                                                   "test_split": shifts[i % 4]}
        for i in range(0, 8, 2):
            (root / "test" / c / f"{i}.jpg").rename(root / "test" / c / f"{c}_{i}.jpg")
    (root / "pods_info.json").write_text(json.dumps({
        "classes": ["mug_01", "shoe_02"], "class_to_idx": {"mug_01": 0, "shoe_02": 1},
        "class_to_sc": {"mug_01": "mug", "shoe_02": "shoe"}, "class_to_split": {"mug_01": "val", "shoe_02": "test"}}))
    (root / "pods_image_annos.json").write_text(json.dumps(annos))
    return root, annos


def test_pods_test_splits_are_named_on_their_samples(tmp_path, unipers_cli):
    from unipers.eval.targets import read_target

    root, annos = write_pods(tmp_path / "pods")
    code, out, err = unipers_cli("prepare", "--from-pods", root, "--name", "mug_01", "--out", tmp_path / "out",
                                 "--quiet")
    assert code == 0, err
    folder = tmp_path / "out" / "mug_01"
    concept, recs = read_prepared(folder)
    assert concept["class_word"] == "mug" and not (tmp_path / "out" / "shoe_02").exists()
    assert sources(folder, "train") == ["0.jpg", "1.jpg", "2.jpg"] and len(concept["test"]) == 8
    want = {}
    for image_id, a in annos.items():
        if a["class"] == "mug_01" and a["split"] == "test":
            want[image_id.rsplit("/", 1)[-1].removesuffix(".jpg")] = a["test_split"]
    test_recs = [r for r in recs if r.split == "test"]
    assert {r.task for r in test_recs} == {"recognition", "caption", "generation"}
    for r in test_recs:
        stem = source_of(folder, r.image).rsplit("/", 1)[1].removesuffix(".jpg")
        assert r.subset == want[stem], stem
    assert all(r.subset is None for r in recs if r.split != "test")
    assert "named sets: test/distractors" in out
    assert len(read_target(folder).positives) == 8


def test_pods_test_image_without_its_split_is_refused(tmp_path, tree_digest, one_line_error, unipers_cli):
    root, annos = write_pods(tmp_path / "pods")
    del annos["test/shoe_02/3.jpg"]["test_split"]
    (root / "pods_image_annos.json").write_text(json.dumps(annos))
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", "--from-pods", root, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    one_line_error(err, str(root / "pods_image_annos.json"), "test/shoe_02/3.jpg", "test_split")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()
    (root / "pods_info.json").unlink()
    with pytest.raises(ImportRefused, match="pods_info.json: file not found"):
        import_pods(root, tmp_path / "out", concepts=["mug_01"])


# ---- the manifest fields ----

def test_new_sample_fields_are_optional_and_checked():
    s = Sample("vqa", "Anya", "test", image="images/test_000.png", question="q", answer="A",
               options={"A": "x", "B": "y"}, concepts=["Anya", "Loid"], subset="pose")
    assert Sample.from_json(s.to_json()) == s
    old = Sample("qa", "bo", question="q", answer="a")
    assert "concepts" not in old.to_json() and "subset" not in old.to_json()
    with pytest.raises(ValueError, match="concepts"):
        Sample("qa", "bo", question="q", answer="a", concepts=["mam"])
    with pytest.raises(ValueError, match="subset"):
        Sample("qa", "bo", question="q", answer="a", subset="")


def test_benchmark_options_that_would_be_ignored_are_refused(tmp_path, one_line_error, unipers_cli):
    root = write_dreambench(tmp_path / "dreambooth")
    for args in (["--image-root", tmp_path], ["--n-train", "3"], ["--visual-qa", tmp_path / "x.json"]):
        code, _, err = unipers_cli("prepare", "--from-dreambench", root, "--out", tmp_path / "out", *args)
        assert code == 2
        one_line_error(err, args[0], "--from-dreambench")
    code, _, err = unipers_cli("prepare", "--from-myvlm", root, "--from-pods", root, "--out", tmp_path / "out")
    assert code == 2 and "exactly one of" in err
    code, _, err = unipers_cli("prepare", "--from-dreambench", root, "--out", tmp_path / "out", "--class-word", "x")
    assert code == 2
    one_line_error(err, "--class-word", "--name")
    code, _, err = unipers_cli("prepare", "--from-dreambench", root, "--name", "teapot", "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, "teapot", "available: backpack, dog6")
    assert not (tmp_path / "out").exists()
