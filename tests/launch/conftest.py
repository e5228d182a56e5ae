"""Fixtures for the Slurm tests: a live cluster (or a skip), the jobs' environment, a third concept, and for
the tests without a cluster: concept folders that pass the submit check, a fake `sbatch`, metric models.

Start the single-node test cluster with ``bash scripts/start_test_slurm.sh`` (root); without it the
tests marked ``slurm`` skip and the rendering tests still run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _cluster_answers() -> str | None:
    """None when sbatch/sinfo exist and a node is idle; else why not."""
    if not (shutil.which("sinfo") and shutil.which("sbatch")):
        return "no Slurm client (sinfo/sbatch) on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo failed: {err}"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()[:200]}"
    if not any(s.strip().rstrip("*") in ("idle", "mix") for s in out.stdout.split()):
        return f"no idle Slurm node (sinfo: {out.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def cluster():
    """Skip unless a Slurm cluster answers with an idle node (bash scripts/start_test_slurm.sh)."""
    why = _cluster_answers()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def job_env(tiny_dirs):
    """The environment jobs inherit (sbatch --export=ALL): the tiny models' folder, one thread per task."""
    return dict(os.environ, OMP_NUM_THREADS="1", UNIPERS_TINY_DIR=os.environ["UNIPERS_TINY_DIR"])


@pytest.fixture(scope="session")
def three_concepts(prepared_concepts, tmp_path_factory):
    """bo and mam, plus kit (green) prepared the same way."""
    from PIL import Image

    from unipers.data.prepare import prepare_concept

    root = tmp_path_factory.mktemp("kit")
    (root / "photos").mkdir()
    for i in range(6):
        im = Image.new("RGB", (96 + 8 * i, 96), (40, 180, 60))
        im.paste((20 * i, 255 - i * 30, 128), (10 + 5 * i, 20, 50 + 5 * i, 70))
        im.save(root / "photos" / f"p{i}.png")
    return [*prepared_concepts, prepare_concept(root / "photos", "kit", root / "kit", class_word="bird")]


@pytest.fixture
def fake_concepts(tmp_path):
    """Five folders that pass the submit-time check (a manifest.jsonl each); nothing trains on them."""
    folders = []
    for name in "abcde":
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "manifest.jsonl").write_text("")
        folders.append(str(tmp_path / "data" / name))
    return folders


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH folder whose `sbatch` records each call and prints job id 4242 (no squeue, no sacct)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.calls\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


@pytest.fixture
def metric_models(tmp_path):
    """Overrides naming a CLIP and a DINO folder that pass the submit check (a config.json each); no job
    loads them."""
    out = []
    for key in ("clip", "dino"):
        (tmp_path / "models" / key).mkdir(parents=True)
        (tmp_path / "models" / key / "config.json").write_text("{}")
        out.append(f"eval.{key}_path={tmp_path / 'models' / key}")
    return out
