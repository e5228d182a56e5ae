"""Output folders and files: unipers never deletes or replaces what it did not write, a mistyped --out fails
in one line with the user's files byte-identical, outputs respect the umask, and errors reach the shell
as one line with an exit code that means something."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unipers.cli import explain
from unipers.errors import EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE, DivergedError, StoppedBySignal
from unipers.io import MARKER, atomic_directory, save_safetensors_atomic


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A user's folder: photos, a notes file, an unrelated folder; the working directory is inside it."""
    from PIL import Image

    home = tmp_path / "home"
    photos = home / "photos"
    photos.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (80 + 8 * i, 80), (40 * i, 100, 200)).save(photos / f"p{i}.png")
    (home / "notes.txt").write_text("keep me\n")
    (home / "other").mkdir()
    (home / "other" / "thesis.tex").write_text("\\section{keep}\n")
    monkeypatch.chdir(home)
    return home


# (case, --out relative to the workspace): each is refused with --overwrite too.
BAD_OUTS = [("the photo folder", "photos"), ("the working directory, which holds the photos", "."),
            ("a file", "notes.txt"), ("a folder unipers did not write", "other"), ("a parent of the cwd", "..")]


@pytest.mark.parametrize("case,out", BAD_OUTS, ids=[c for c, _ in BAD_OUTS])
def test_prepare_refuses_an_out_it_may_not_replace(case, out, workspace, unipers_cli, tree_digest, one_line_error):
    before = tree_digest(workspace.parent)
    for flags in ([], ["--overwrite"]):
        code, _, err = unipers_cli("prepare", "photos", "--name", "bo", "--out", out, *flags)
        assert code == 2, (case, flags, err)
        one_line_error(err, str(Path(out).absolute()))
    assert tree_digest(workspace.parent) == before


@pytest.mark.parametrize("case,out", BAD_OUTS, ids=[c for c, _ in BAD_OUTS])
def test_export_refuses_an_out_it_may_not_replace(case, out, workspace, concept_files, tiny_dirs, unipers_cli,
                                                  tree_digest, one_line_error):
    before = tree_digest(workspace.parent)
    code, _, err = unipers_cli("export", "--backbone", tiny_dirs[0], "--concept", concept_files["bo"], "--out", out,
                               "--overwrite")
    assert code == 2, (case, err)
    one_line_error(err, str(Path(out).absolute()))
    assert tree_digest(workspace.parent) == before


def test_export_refuses_an_out_that_holds_its_base(tmp_path, concept_files, tiny_dirs, unipers_cli, tree_digest,
                                                   one_line_error):
    base = tiny_dirs[0]
    before = tree_digest(base.parent)
    code, _, err = unipers_cli("export", "--backbone", base, "--concept", concept_files["bo"], "--out", base.parent,
                               "--overwrite")
    assert code == 2
    one_line_error(err, "holds the input")
    assert tree_digest(base.parent) == before


def test_a_folder_unipers_wrote_is_replaced_only_with_the_flag(workspace, unipers_cli, tree_digest):
    code, _, err = unipers_cli("prepare", "photos", "--name", "bo", "--out", "data/bo")
    assert code == 0, err
    assert (workspace / "data" / "bo" / MARKER).is_file()
    first = tree_digest(workspace / "data")
    code, _, err = unipers_cli("prepare", "photos", "--name", "bo", "--out", "data/bo")
    assert code == 2 and "--overwrite" in err and tree_digest(workspace / "data") == first
    code, _, err = unipers_cli("prepare", "photos", "--name", "bo", "--out", "data/bo", "--overwrite")
    assert code == 0, err


def test_outputs_respect_the_umask(tmp_path):
    import torch

    old = os.umask(0o002)  # a group-shared project folder
    try:
        f = save_safetensors_atomic({"x": torch.zeros(2)}, tmp_path / "c.safetensors")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o775


@pytest.mark.parametrize("err,code", [
    (StoppedBySignal("stopped"), EXIT_STOPPED), (DivergedError("diverged"), EXIT_FAILED),
    (FileNotFoundError("no such file"), EXIT_USAGE), (RuntimeError("boom"), EXIT_FAILED),
])
def test_errors_map_to_one_line_and_an_exit_code(err, code):
    got, line = explain(err)
    assert got == code and "\n" not in line
    if code == EXIT_FAILED and not isinstance(err, DivergedError):
        assert "--debug" in line and "RuntimeError" in line


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path):
    args = [sys.executable, "-m", "unipers.cli", "train", "personalize", f"run_dir={tmp_path}"]  # no data.concepts
    plain = subprocess.run(args, capture_output=True, text=True)
    debug = subprocess.run([*args[:3], "--debug", *args[3:]], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "data.concepts" in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_eval_writes_a_new_folder_and_replaces_only_its_own(workspace, concept_files, prepared_concepts, unipers_cli,
                                                           tree_digest, one_line_error):
    args = ["eval", "--concept", concept_files["bo"], "--data", prepared_concepts[0], "--no-generation"]
    (workspace / "metrics.json").write_text("{\"mine\": 1}\n")  # a user's file where eval would write one
    before = tree_digest(workspace.parent)
    for out in (".", "other", "notes.txt"):
        code, _, err = unipers_cli(*args, "--out", out, "--overwrite")
        assert code == 2, (out, err)
        one_line_error(err, str(Path(out).absolute()))
    assert tree_digest(workspace.parent) == before
    code, _, err = unipers_cli(*args, "--out", "ev")
    assert code == 0, err
    assert (workspace / "ev" / "metrics.json").is_file() and (workspace / "ev" / MARKER).is_file()
    code, _, err = unipers_cli(*args, "--out", "ev")
    assert code == 2 and "--overwrite" in err
    code, _, err = unipers_cli(*args, "--out", "ev", "--overwrite")
    assert code == 0, err
