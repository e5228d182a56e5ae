"""``unipers prepare``: folder layout, split, samples, determinism, atomic writes, CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from unipers import cli
from unipers.data import samples as samples_mod
from unipers.data.images import PhotoError
from unipers.data.manifest import Sample, atomic_dir, read_manifest, read_prepared
from unipers.data.prepare import PrepareOptions, prepare_concept, split_indices

FAST = PrepareOptions(n_soft=3, n_hard=6, n_easy=4, near_duplicate=0.995, quiet=True, batch_size=16)


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_layout_and_samples_without_pool(tmp_path, photos_dir):
    (tmp_path / "facts.txt").write_text("<bo> has a red collar\nbo is 3 years old.\n\n# a comment\n")
    out = prepare_concept(photos_dir, "bo", tmp_path / "out", class_word="dog", facts=tmp_path / "facts.txt")
    assert sorted(p.name for p in out.iterdir()) == [".unipers-output", "concept.json", "images", "manifest.jsonl", "report.txt"]
    concept, recs = read_prepared(out)
    assert concept["name"] == "bo" and concept["class_word"] == "dog" and concept["seed"] == 0
    assert (len(concept["train"]), len(concept["val"])) == (5, 1)
    assert concept["facts"] == ["<bo> has a red collar.", "<bo> is 3 years old."]
    assert concept["retrieval"] == {"skipped": "no --negatives pool given"}
    for rel in concept["train"] + concept["val"]:
        assert (out / rel).is_file() and rel.startswith("images/")
    assert all(r.image is None or (out / r.image).is_file() for r in recs)

    by = lambda task, split: [r for r in recs if r.task == task and r.split == split]  # noqa: E731
    train_rec, val_rec = by("recognition", "train"), by("recognition", "val")
    assert {r.image for r in train_rec} == set(concept["train"]) and all(r.label for r in train_rec)
    assert {r.image for r in val_rec} == set(concept["val"])  # validation photos are held out
    assert not {r.image for r in recs if r.split == "train"} & set(concept["val"])
    assert len({r.question for r in train_rec}) >= 4 and all(r.answer.startswith("Yes, ") for r in train_rec)
    assert all("<bo>" in r.question and "<bo>" in r.answer for r in train_rec)
    qa = by("qa", "train")
    assert [r.answer for r in qa[:2]] == concept["facts"]
    assert qa[-1].question == "What do you know about <bo>?" and qa[-1].answer == " ".join(concept["facts"])
    caps = by("caption", "train")
    assert len(caps) == 10 and all("<bo>" in r.answer and "dog" in r.answer for r in caps)
    gens = by("generation", "train")
    assert [r.prompt for r in gens] == ["A photo of <bo>."] * 5 and all(r.gen_slots is None for r in gens)

    report = (out / "report.txt").read_text()
    assert "retrieval: skipped (no --negatives pool given)" in report and "5 train, 1 val" in report
    assert "recognition" in report and "caption" in report


def test_conversation_json_facts(tmp_path, photos_dir):
    (tmp_path / "conv.json").write_text(json.dumps([{"question": "What does bo like?", "answer": "<bo> likes balls."}]))
    out = prepare_concept(photos_dir, "bo", tmp_path / "out", facts=tmp_path / "conv.json")
    qa = [r for r in read_manifest(out / "manifest.jsonl") if r.task == "qa"]
    assert [(r.question, r.answer) for r in qa] == [("What does <bo> like?", "<bo> likes balls.")]


def test_negatives_balance_and_recognition_templates(tmp_path, photos_dir, pool_dir, tiny_clip):
    out = prepare_concept(photos_dir, "bo", tmp_path / "out", negatives=pool_dir, clip_path=tiny_clip, options=FAST)
    concept, recs = read_prepared(out)
    for split in ("train", "val"):
        rec = [r for r in recs if r.task == "recognition" and r.split == split]
        pos, neg = [r for r in rec if r.label], [r for r in rec if not r.label]
        assert pos and len(neg) == len(pos)  # neg_per_pos = 1
        assert all(r.answer.startswith("No, ") for r in neg)
    neg_imgs = {r.image for r in recs if r.label is False}
    assert neg_imgs == set(concept["negatives"]) | set(concept["val_negatives"])
    assert len(samples_mod.RECOGNITION_QUESTIONS) >= 8


def test_identical_inputs_give_identical_files_and_seed_changes_split(tmp_path, photos_dir, pool_dir, tiny_clip):
    runs = [prepare_concept(photos_dir, "bo", tmp_path / f"out{i}", negatives=pool_dir, clip_path=tiny_clip,
                            class_word="dog", seed=0, options=FAST) for i in range(2)]
    # the first run computed the pool embeddings, the second read them from the cache: same bytes anyway
    assert "0 embeddings reused" in (runs[0] / "report.txt").read_text()
    assert "40 embeddings reused" in (runs[1] / "report.txt").read_text()
    for name in ("manifest.jsonl", "concept.json"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes()
    for img in sorted(p.name for p in (runs[0] / "images").iterdir()):
        assert (runs[0] / "images" / img).read_bytes() == (runs[1] / "images" / img).read_bytes()
    other = prepare_concept(photos_dir, "bo", tmp_path / "seed2", seed=2)
    src = lambda out, role: [json.loads((out / "concept.json").read_text())["sources"][p]  # noqa: E731
                             for p in json.loads((out / "concept.json").read_text())[role]]
    assert src(runs[0], "val") != src(other, "val")
    assert (runs[0] / "manifest.jsonl").read_bytes() != (other / "manifest.jsonl").read_bytes()


def test_split_indices():
    assert len(split_indices(3, 0.2, 0)[1]) == 1  # at least one val photo from 3 photos
    assert split_indices(2, 0.2, 0) == ([0, 1], [])
    assert len(split_indices(10, 0.3, 0)[1]) == 3
    assert split_indices(10, 0.0, 0)[1] == []
    assert len({tuple(split_indices(8, 0.25, s)[1]) for s in range(10)}) > 1
    with pytest.raises(ValueError):
        split_indices(5, 1.0, 0)


def test_failed_prepare_leaves_nothing(tmp_path, photos_dir, monkeypatch):
    (photos_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PhotoError, match=r"broken\.jpg"):
        prepare_concept(photos_dir, "bo", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)

    # a failure after writing has started: the temporary folder is removed, OUT never appears
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(samples_mod, "caption_samples", boom)
    with pytest.raises(RuntimeError):
        prepare_concept(photos_dir, "bo", tmp_path / "out", skip_bad=True)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    monkeypatch.undo()

    out = prepare_concept(photos_dir, "bo", tmp_path / "out", skip_bad=True)
    concept = json.loads((out / "concept.json").read_text())
    assert [s["file"].endswith("broken.jpg") for s in concept["skipped"]] == [True]
    assert "broken.jpg" in (out / "report.txt").read_text()
    # an existing OUT is refused, and kept intact when an --overwrite run fails
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_concept(photos_dir, "bo", out, skip_bad=True)
    monkeypatch.setattr(samples_mod, "caption_samples", boom)
    with pytest.raises(RuntimeError):
        prepare_concept(photos_dir, "bo", out, skip_bad=True, overwrite=True)
    assert json.loads((out / "concept.json").read_text()) == concept and not leftovers(tmp_path)
    monkeypatch.undo()
    prepare_concept(photos_dir, "cat", out, skip_bad=True, overwrite=True)
    assert json.loads((out / "concept.json").read_text())["name"] == "cat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]


def test_stale_tmp_of_a_killed_run_is_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{socket.gethostname()}-{dead.stdout.strip()}-abc"
    stale.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and (tmp_path / "out" / "x").read_text() == "1"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_sample_json_roundtrip_and_checks():
    s = Sample("vqa", "bo", "test", image="images/test_000.png", question="Is <bo> happy?", answer="A",
               options={"A": "Yes", "B": "No"}, source="yollava:x.json#0")
    line = s.to_json()
    assert "label" not in line and Sample.from_json(line) == s
    with pytest.raises(ValueError, match="not one of the options"):
        Sample("vqa", "bo", question="q", answer="C", options={"A": "x"}, image="i")
    with pytest.raises(ValueError, match="unknown manifest key"):
        Sample.from_json({"task": "qa", "concept": "bo", "question": "q", "answer": "a", "colour": 1})
    with pytest.raises(ValueError, match="unknown task"):
        Sample("chat", "bo")


def test_cli_prints_summary_and_names_bad_files(tmp_path, photos_dir, capsys):
    assert cli.main(["prepare", str(photos_dir), "--name", "bo", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "photos: 6 kept" in printed and "retrieval: skipped" in printed and f"wrote {tmp_path / 'out'}" in printed
    (photos_dir / "bad.png").write_text("nope")
    assert cli.main(["prepare", str(photos_dir), "--name", "bo", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "--skip-bad" in err
    assert cli.main(["prepare", str(tmp_path / "nowhere"), "--name", "bo", "--out", str(tmp_path / "o3")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["prepare", str(photos_dir), "--name", "b o", "--out", str(tmp_path / "o4")]) == 2


@pytest.mark.parametrize("name", ["bo.v2", "image", "x" * 40, "<bo>", "b o"])
def test_prepare_refuses_at_once_every_name_training_would_refuse(tmp_path, photos_dir, capsys, name):
    from unipers.concepts.bank import ConceptBank
    from unipers.concepts.names import ConceptNameError

    with pytest.raises(ConceptNameError):  # the rule training applies
        ConceptBank(base_vocab_size=16, hidden_size=8).add(name)
    out = tmp_path / "out"
    assert cli.main(["prepare", str(photos_dir), "--name", name, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "concept name" in err[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_help_imports_nothing_heavy():
    code = ("import sys, unipers.cli as c; c.build_parser(['prepare']).format_help();"
            "print([m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules])")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"


def test_captions_give_each_photo_its_generation_prompt(tmp_path, photos_dir):
    names = sorted(p.name for p in photos_dir.iterdir())
    given = {names[0]: "A photo of <bo> on the sofa.", names[1]: "bo   in the\ngarden."}
    (tmp_path / "captions.json").write_text(json.dumps(given))
    out = prepare_concept(photos_dir, "bo", tmp_path / "out", class_word="dog", captions=tmp_path / "captions.json",
                          val_fraction=0.0)
    concept, recs = read_prepared(out)
    by_source = {rel: os.path.basename(src) for rel, src in concept["sources"].items()}
    prompts = {by_source[r.image]: r.prompt for r in recs if r.task == "generation"}
    assert prompts[names[0]] == "A photo of <bo> on the sofa."
    assert prompts[names[1]] == "<bo> in the garden."  # the bare name is the concept, as in a facts file
    assert all(prompts[n] == "A photo of <bo>." for n in names[2:])
    # only the generation prompts change
    plain = prepare_concept(photos_dir, "bo", tmp_path / "plain", class_word="dog", val_fraction=0.0)
    others = lambda folder: [r for r in read_prepared(folder)[1] if r.task != "generation"]  # noqa: E731
    assert others(out) == others(plain)


@pytest.mark.parametrize("captions, named", [
    ('{"missing.png": "A photo of <bo>."}', "missing.png"),
    ('{"PHOTO": "A photo of a dog."}', "does not name <bo>"),
    ('{"PHOTO": "<bo> and <mam> on a sofa."}', "<mam>"),
    ('{"PHOTO": ""}', "non-empty"),
    ('{"PHOTO": "<bo> ' + "x" * 600 + '"}', "characters"),
    ('["A photo of <bo>."]', "JSON object"),
    ("{not json", "not JSON"),
])
def test_bad_captions_are_refused_in_one_line_and_write_nothing(tmp_path, photos_dir, unipers_cli, tree_digest,
                                                                one_line_error, captions, named):
    photo = sorted(p.name for p in photos_dir.iterdir())[0]
    path = tmp_path / "captions.json"
    path.write_text(captions.replace("PHOTO", photo))
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("prepare", photos_dir, "--name", "bo", "--captions", path, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, "captions.json", named)
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before


def test_captions_apply_to_a_photo_folder_only(tmp_path, unipers_cli, one_line_error):
    (tmp_path / "captions.json").write_text("{}")
    code, _, err = unipers_cli("prepare", "--from-yollava", tmp_path, "--captions", tmp_path / "captions.json",
                               "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, "--captions", "--from-yollava")
