"""Shared fixtures: the tiny base models are built once per test session into a temporary folder and
loaded back through the same ``from_pretrained`` path real checkpoints use. Nothing contacts a hub."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# torch.compile keeps compiled kernels on disk (/tmp/torchinductor_$USER) across processes. A cache filled
# under the CPU's own kernels crashed a later run under ATEN_CPU_CAPABILITY=avx2 (segmentation fault in the
# compiled forward), so each test run compiles into a folder of its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="unipers-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(backbone_dir, decoder_dir) of the embedded default, built via `ensure_tiny` into a temp root."""
    from unipers.models.tiny import ensure_tiny

    root = tmp_path_factory.mktemp("tiny")
    os.environ["UNIPERS_TINY_DIR"] = str(root)  # resolve_path("tiny") in code under test lands here too
    return ensure_tiny(root)


@pytest.fixture(scope="session")
def backbone_dir(tiny_dirs):
    return tiny_dirs[0]


@pytest.fixture(scope="session")
def decoder_dir(tiny_dirs):
    return tiny_dirs[1]


@pytest.fixture
def make_backbone(backbone_dir):
    """A fresh ARBackbone (own bank) on the tiny base: make_backbone(num_shared=2, ..., head_rows=...)."""
    from unipers.concepts.bank import SlotLayout
    from unipers.models.backbone import ARBackbone

    def make(num_shared=2, num_und=3, num_gen=4, head_rows="identifier", path=None):
        return ARBackbone.from_pretrained(path or backbone_dir, layout=SlotLayout(num_shared, num_und, num_gen),
                                          head_rows=head_rows)

    return make


@pytest.fixture(scope="session")
def other_backbone_dir(tmp_path_factory):
    """A second tiny backbone of the same shape but another seed: a different base model."""
    from unipers.models.tiny import build_tiny_chameleon

    return build_tiny_chameleon(tmp_path_factory.mktemp("other") / "backbone", seed=1)


@pytest.fixture(scope="session")
def qa_batch():
    """qa_batch(backbone, [(question, answer), ...]) -> right-padded (ids, mask, labels)."""
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.padding import pad_batch

    def make(backbone, items, mode="und"):
        builder = PromptBuilder.for_backbone(backbone)
        enc = [builder.encode_qa(q, a, mode=mode) for q, a in items]
        ids, mask = pad_batch([e.ids for e in enc], backbone.tokenizer.pad_token_id)
        labels, _ = pad_batch([e.labels for e in enc], 0, labels=True)
        return ids, mask, labels

    return make


@pytest.fixture(scope="session")
def prepared_concepts(tmp_path_factory):
    """Two prepared concept folders (bo: orange dog photos with facts, mam: blue cat photos), made by
    `prepare_concept` from generated images: each has negatives (the other's photos), QA, captions and
    generation prompts, train and val splits."""
    from PIL import Image

    from unipers.data.prepare import prepare_concept

    root = tmp_path_factory.mktemp("concepts")

    def photos(name, colour):
        folder = root / f"{name}_photos"
        folder.mkdir()
        for i in range(6):
            im = Image.new("RGB", (96 + 8 * i, 96), colour)
            im.paste((255 - i * 30, 20 * i, 128), (10 + 5 * i, 20, 50 + 5 * i, 70))
            im.save(folder / f"p{i}.png")
        return folder

    facts = root / "facts.txt"
    facts.write_text("<bo> has a red collar.\n<bo> is 3 years old.\n")
    bo = prepare_concept(photos("bo", (200, 120, 40)), "bo", root / "bo", class_word="dog", facts=facts)
    mam = prepare_concept(photos("mam", (40, 80, 200)), "mam", root / "mam", class_word="cat")
    return [bo, mam]


@pytest.fixture(scope="session")
def concept_files(tiny_dirs, tmp_path_factory):
    """bo.safetensors and mam.safetensors (class words dog / cat) on the tiny base, with rows moved away
    from their init (so a reload that re-initialised them would be caught)."""
    import torch

    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel

    out = tmp_path_factory.mktemp("concept_files")
    model = UnifiedModel.from_config(load_config([]))
    files = {}
    for name, word in (("bo", "dog"), ("mam", "cat")):
        model.add_concept(name, word)
        with torch.no_grad():
            for p in model.bank.rows[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
        files[name] = model.save_concepts(out / f"{name}.safetensors", names=[name])
    return files


@pytest.fixture(scope="module")
def session(concept_files):
    """An InferenceSession on the embedded default with <bo> and <mam> loaded (one per test module)."""
    from unipers.config import load_config
    from unipers.inference import InferenceSession

    s = InferenceSession.from_config(load_config([]))
    s.load(concept_files["bo"])
    s.load(concept_files["mam"])
    return s


def _tree_digest(path) -> dict:
    """{relative path: sha256 of its bytes (or "dir")} of everything under `path` (or of the file itself):
    compared before and after a bad input, it shows nothing the user had was removed or changed."""
    import hashlib
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def unipers_cli(capsys):
    """Run ``unipers ARGS`` in this process: (exit code, stdout, stderr). An argparse error counts as its
    exit code, as it would from the shell."""
    from unipers.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _one_line_error(err: str, *names: str) -> str:
    """The last stderr line, after checking it is a one-line error (no traceback) naming every one of
    `names` (a file, a key)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    last = lines[-1]
    for name in names:
        assert str(name) in last, f"{name!r} not named in: {last}"
    return last


@pytest.fixture
def tree_digest():
    """The function ``tree_digest(path)`` above: hash a user's folder before and after a bad input."""
    return _tree_digest


@pytest.fixture
def one_line_error():
    """The function ``one_line_error(stderr, *names)`` above."""
    return _one_line_error
