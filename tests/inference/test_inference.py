"""ask / recognize / generate: reproducible, batch-invariant, cache-invariant, and strict about input."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from unipers.config import load_config
from unipers.inference import InferenceSession, InputError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, colour in enumerate([(200, 120, 40), (40, 80, 200)]):
        Image.new("RGB", (80, 64), colour).save(root / f"p{i}.png")
        paths.append(root / f"p{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths, root / "broken.jpg"


def test_same_seed_same_image_and_batch_equals_single_runs(session):
    kw = dict(steps=4, guidance=3.0)
    a = session.generate(["<bo> on a beach"], seed=5, **kw).tensors
    b = session.generate(["<bo> on a beach"], seed=5, **kw).tensors
    assert torch.equal(a, b)
    both = session.generate(["<bo> on a beach", "<bo> and <mam> on a sofa"], seed=5, **kw)
    single = session.generate(["<bo> and <mam> on a sofa"], seed=5, **kw).tensors
    assert torch.allclose(both.tensors[0], a[0], atol=1e-5) and torch.allclose(both.tensors[1], single[0], atol=1e-5)
    assert [s.seed for s in both.settings] == [5, 5]
    pil = both.images
    assert [im.size for im in pil] == [tuple(a.shape[-2:])[::-1]] * 2 and pil[0].mode == "RGB"
    other = session.generate(["<bo> on a beach"], seed=6, **kw).tensors
    assert not torch.equal(other, a)


def test_greedy_answer_identical_with_and_without_kv_cache(session, photos):
    q = "What is <bo> doing?"
    assert session.ask(q, max_new_tokens=16) == session.ask(q, max_new_tokens=16, use_cache=False)
    assert session.ask(q, [photos[0][0]], max_new_tokens=8) == session.ask(q, [photos[0][0]], max_new_tokens=8,
                                                                            use_cache=False)
    history = [("Who is <bo>?", "<bo> is a dog.")]
    assert isinstance(session.ask("And <mam>?", history=history, max_new_tokens=4), str)


def test_a_concept_answers_the_same_alone_or_with_others(session, concept_files, photos):
    alone = InferenceSession.from_config(load_config([]))
    alone.load(concept_files["bo"])
    assert alone.recognize("bo", photos[0]) == session.recognize("bo", photos[0])
    assert alone.ask("What is <bo>?", max_new_tokens=12) == session.ask("What is <bo>?", max_new_tokens=12)
    probs = session.recognize("bo", photos[0])
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)


def test_unloading_one_concept_leaves_the_other_answering_as_alone(concept_files, photos):
    both = InferenceSession.from_config(load_config([]))
    both.load(concept_files["bo"])
    both.load(concept_files["mam"])  # its ids sit after <bo>'s: unloading bo moves them down
    alone = InferenceSession.from_config(load_config([]))
    alone.load(concept_files["mam"])
    both.unload("bo")
    assert both.concepts == ["mam"] and list(both.files) == ["mam"]
    assert both.recognize("mam", photos[0]) == alone.recognize("mam", photos[0])
    assert both.ask("What is <mam>?", max_new_tokens=12) == alone.ask("What is <mam>?", max_new_tokens=12)
    with pytest.raises(InputError, match="<bo>.*loaded: <mam>"):
        both.ask("What is <bo>?")
    with pytest.raises(KeyError, match="'bo' is not loaded"):
        both.unload("bo")


def test_concepts_disabled_is_the_untrained_base_and_gives_every_concept_back(session, tiny_dirs, photos):
    base = InferenceSession.from_config(load_config([]))
    q, kw = "What is a dog?", dict(max_new_tokens=12)
    with_concepts = session.ask("What is <bo>?", **kw), session.recognize("bo", photos[0])
    with session.concepts_disabled():
        assert session.concepts == [] and session.ask(q, **kw) == base.ask(q, **kw)
        assert torch.equal(session.generate(["a dog"], steps=2).tensors, base.generate(["a dog"], steps=2).tensors)
        with pytest.raises(InputError, match="<bo>"):
            session.ask("What is <bo>?")
    assert session.concepts == ["bo", "mam"] and sorted(session.files) == ["bo", "mam"]
    assert (session.ask("What is <bo>?", **kw), session.recognize("bo", photos[0])) == with_concepts


def test_bad_input_is_refused_with_a_clear_message(session, photos):
    with pytest.raises(InputError, match=r"<rex>.*loaded: <bo>, <mam>"):
        session.generate(["<rex> on a sofa"])
    with pytest.raises(InputError, match=r"<rex>.*loaded"):
        session.ask("Is <rex> here?")
    with pytest.raises(InputError, match="broken.jpg"):
        session.recognize("bo", [photos[1]])
    with pytest.raises(InputError, match="longer than the model's context"):
        session.ask("dog " * 3000)
    with pytest.raises(InputError, match="context"):
        session.generate(["<bo> " + "dog " * 3000])


def test_concept_file_for_another_base_is_refused(concept_files, other_backbone_dir):
    from unipers.concepts.io import ConceptFileError

    other = InferenceSession.from_config(load_config([], [f"backbone.path={other_backbone_dir}"]))
    with pytest.raises(ConceptFileError, match="trained on base model"):
        other.load(concept_files["bo"])


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "unipers.cli", *args], capture_output=True, text=True, **kw)


def test_cli_generate_writes_pngs_grid_sidecars_and_sidecar_regenerates(concept_files, tmp_path):
    out = run_cli("generate", "--concept", str(concept_files["bo"]), "<bo> reading a book", "--seed", "3",
                  "--num-images", "2", "--steps", "3", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    pngs = sorted((tmp_path / "a").glob("*_seed*.png"))
    assert [p.name for p in pngs] == ["bo_reading_a_book_seed3.png", "bo_reading_a_book_seed4.png"]
    assert (tmp_path / "a" / "grid.png").is_file()
    side = json.loads(pngs[1].with_suffix(".json").read_text())
    assert side["seed"] == 4 and side["steps"] == 3 and side["concept_files"] == [str(concept_files["bo"])]
    again = run_cli("generate", "--from-sidecar", str(pngs[1].with_suffix(".json")), "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b" / pngs[1].name).read_bytes() == pngs[1].read_bytes()


def test_cli_failures_write_nothing(concept_files, photos, tmp_path):
    out = run_cli("generate", "--concept", str(concept_files["bo"]), "<mam> on a sofa", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "<mam>" in out.stderr and "loaded: <bo>" in out.stderr
    assert not (tmp_path / "x").exists()
    out = run_cli("recognize", "--concept", str(concept_files["bo"]), "--image", str(photos[1]))
    assert out.returncode == 2 and "broken.jpg" in out.stderr
    out = run_cli("ask", "--concept", str(tmp_path / "missing.safetensors"), "hi")
    assert out.returncode == 2 and "missing.safetensors" in out.stderr


def test_cli_chat_keeps_turns(concept_files):
    out = run_cli("ask", "--concept", str(concept_files["bo"]), "--chat", "--max-new-tokens", "4",
                  input="Who is <bo>?\nAnd what does <bo> like?\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("model>") == 2 and "loaded: <bo>" in out.stdout


def test_answers_name_a_concept_by_its_marker(session):
    tok = session.backbone.tokenizer
    bo = session.model.bank.info["bo"]
    ids = tok("Yes, I can see", add_special_tokens=False).input_ids + [bo.first_id]
    ids += bo.token_ids("shared") + tok(" here.", add_special_tokens=False).input_ids
    assert session.decode(ids) == "Yes, I can see<bo> here."  # identifier as its marker, other slots as nothing
