"""The realshape tier: random models at the published shapes (Anole-7B with 1 decoder layer, Stable
Diffusion 1.5 with 1 layer per UNet block), built once per session, and unipers' real commands run on them.

Opt-in: it costs ~8 minutes and ~10 GB on 2 cores, so it runs only when selected (``-m realshape``) or with
UNIPERS_REALSHAPE=1; the default suite skips it. Every command runs as a user runs it, in a process of its
own (`unipers_run`): a command's peak memory is its own, not the sum of what the tests before it left
allocated. The summary prints the tier's wall time, each command's peak RSS and the test process's."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    wanted = "realshape" in (config.getoption("-m") or "") or os.environ.get("UNIPERS_REALSHAPE") == "1"
    skip = pytest.mark.skip(reason="realshape tier: select with -m realshape (or UNIPERS_REALSHAPE=1)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.realshape)
            if not wanted:
                item.add_marker(skip)


_PEAKS: list[tuple[str, float, float]] = []  # (test, seconds since start, peak RSS so far in GiB)
_COMMANDS: list[tuple[str, float, float]] = []  # (command, seconds, its peak RSS in GiB)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


_START: list[float] = []  # when the tier's first test that runs began


def _runs(item) -> bool:
    return HERE in Path(str(item.fspath)).parents and item.get_closest_marker("skip") is None


def pytest_runtest_setup(item):
    if _runs(item) and not _START:
        _START.append(time.monotonic())


def pytest_runtest_teardown(item):
    if _runs(item):
        _PEAKS.append((item.name, time.monotonic() - _START[0], _peak_gib()))


def pytest_terminal_summary(terminalreporter):
    if not _PEAKS:  # the tier did not run (skipped by default)
        return
    for name, seconds, peak in _COMMANDS:
        terminalreporter.write_line(f"  unipers {name}: {seconds:.0f} s, peak RSS {peak:.2f} GiB")
    for name, seconds, peak in _PEAKS:
        terminalreporter.write_line(f"  {name}: done at {seconds:.0f} s, test process peak RSS so far {peak:.2f} GiB")
    commands = max((peak for *_, peak in _COMMANDS), default=0.0)
    terminalreporter.write_line(f"realshape tier: wall {_PEAKS[-1][1]:.0f} s, peak RSS {max(commands, _peak_gib()):.2f} "
                                f"GiB (commands {commands:.2f}, test process {_peak_gib():.2f})")


# Runs each command for `unipers_run` and reports its exit status and peak RSS. A child's peak (wait4's
# ru_maxrss) counts the memory of the process that started it, at the moment it did (its pages before
# exec), so commands started straight from this test process, gigabytes by the end of the tier, would
# report its memory as theirs. This small process starts them instead, and is itself started first.
SPAWNER = """
import json, os, subprocess, sys
for line in sys.stdin:
    job = json.loads(line)
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        proc = subprocess.Popen(job["args"], stdout=out, stderr=err, env=job["env"], cwd=job["cwd"])
        _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}), flush=True)
"""


@pytest.fixture(scope="session")
def unipers_run(tmp_path_factory):
    """Run ``unipers ARGS...`` in a process of its own, in the current directory: (exit code, stdout,
    stderr). Its peak RSS (from wait4, in a small spawner process: SPAWNER) goes into the tier's summary."""
    import json
    import subprocess
    import sys

    import unipers

    # The unipers this test imports, wherever the command runs (the README's commands run in a scratch folder).
    source = str(Path(unipers.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (source, os.environ.get("PYTHONPATH"))))}
    spawner = subprocess.Popen([sys.executable, "-c", SPAWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    logs = tmp_path_factory.mktemp("commands")

    def run(*args, cwd=None):
        args = [str(a) for a in args]
        out, err = logs / f"{len(_COMMANDS)}.out", logs / f"{len(_COMMANDS)}.err"
        start = time.monotonic()
        job = {"args": [sys.executable, "-m", "unipers.cli", *args], "env": env, "cwd": str(cwd) if cwd else None,
               "out": str(out), "err": str(err)}
        spawner.stdin.write(json.dumps(job) + "\n")
        spawner.stdin.flush()
        done = json.loads(spawner.stdout.readline())
        name = " ".join(a for a in args[:2] if not a.startswith("-"))
        _COMMANDS.append((name, time.monotonic() - start, done["maxrss_kib"] / 2**20))
        return (done["code"], out.read_bytes().decode(errors="replace"),
                err.read_bytes().decode(errors="replace"))

    yield run
    spawner.stdin.close()
    spawner.wait(timeout=60)


@pytest.fixture(scope="session")
def rs_dirs(tmp_path_factory, unipers_run):
    """(backbone_dir, decoder_dir): Anole-7B (1 layer) and SD1.5 (layers_per_block 1), bf16 on disk, built by
    `unipers tiny --preset`."""
    root = tmp_path_factory.mktemp("realshape")
    # One resnet+attention layer per UNet block instead of 2 halves its cost on 2 cores (10 s forward and
    # 15 s backward at 64x64 latents against 20 and 28); every width, head and the resolution stay real.
    for preset, folder in (("anole-7b", "anole-7b"), ("sd15", "sd15")):
        code, _, err = unipers_run("tiny", "--preset", preset, "--layers", 1, "--out", root / folder)
        assert code == 0, err[-2000:]
    return root / "anole-7b", root / "sd15"


@pytest.fixture(scope="session")
def rs_concept(tmp_path_factory):
    """One prepared concept, <bo> (a dog), from 3 photos (2 train, 1 val): each photo costs a VQ encode
    (~15 s) and a VAE encode (~20 s) at 512 px on 2 cores."""
    from PIL import Image

    from unipers.data.prepare import prepare_concept

    root = tmp_path_factory.mktemp("rs_concept")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        im = Image.new("RGB", (96 + 8 * i, 96), (200, 120, 40))
        im.paste((255 - i * 30, 20 * i, 128), (10 + 5 * i, 20, 50 + 5 * i, 70))
        im.save(photos / f"p{i}.png")
    facts = root / "facts.txt"
    facts.write_text("<bo> has a red collar.\n")
    return prepare_concept(photos, "bo", root / "bo", class_word="dog", facts=facts)


README = Path(__file__).parents[2] / "README.md"
# Appended to the README's commands to fit the tier's budget: steps and batch sizes only.
ALIGN_BUDGET = ["trainer.max_steps=1", "data.batch_size=1", "trainer.progress_bar=false", "trainer.checkpoint_every=0",
                "trainer.val_every=0", "trainer.logger=csv"]
PERSONALIZE_BUDGET = ["trainer.max_steps=2", "data.batch_size=2", "trainer.progress_bar=false",
                      "trainer.checkpoint_every=0", "trainer.val_every=0", "trainer.logger=csv",
                      "personalize.warmup_steps=0"]


def real_path_commands() -> list[list[str]]:
    """The `unipers ...` commands in the README's bash blocks under "From the demo to real checkpoints"."""
    import re
    import shlex

    text = README.read_text()
    section = text.split("## From the demo to real checkpoints", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "unipers":
                commands.append(words[1:])
    return commands


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def base_digests(dirs) -> dict:
    return {p.name: sha256(p) for p in (dirs[0] / "model.safetensors",
                                        dirs[1] / "unet" / "diffusion_pytorch_model.safetensors")}


@pytest.fixture(scope="session")
def rs_base_digests():
    """sha256 of the realshape folders' weight files, for checking that nothing wrote to the base."""
    return base_digests


@pytest.fixture(scope="session")
def readme_commands() -> list[list[str]]:
    return real_path_commands()


@pytest.fixture(scope="session")
def readme_run(rs_dirs, rs_concept, tmp_path_factory, unipers_run):
    """The README's real path, as written, in a scratch folder with the realshape folders where the README
    puts checkpoints (``checkpoints/anole-7b``, ``checkpoints/sd15``): the align stage docs/training.md
    names, then every README real-path command. Returns (folder, base digests taken before any command).
    Its configs ask for bf16 and UNet checkpointing (a CPU without bf16 kernels loads float32 and says so);
    the other tests use its run (``runs/bo``), as a user would."""
    import json

    from PIL import Image

    work = tmp_path_factory.mktemp("readme")
    before = base_digests(rs_dirs)
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "anole-7b").symlink_to(rs_dirs[0])
    (work / "checkpoints" / "sd15").symlink_to(rs_dirs[1])
    (work / "data").mkdir()
    (work / "data" / "bo").symlink_to(rs_concept)
    pairs = work / "data" / "pairs"
    (pairs / "images").mkdir(parents=True)
    lines = []
    for i, colour in enumerate(((200, 40, 40), (40, 200, 40))):
        Image.new("RGB", (512, 512), colour).save(pairs / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a plain square number {i}"}))
    (pairs / "captions.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = unipers_run("train", "base", "backbone/anole-7b", "decoder/sd15", "stage=align",
                               "data.pairs=data/pairs", "run_dir=runs/align", *ALIGN_BUDGET, cwd=work)
    assert code == 0, err[-3000:]
    assert (work / "runs" / "align" / "connector.safetensors").is_file()
    for command in real_path_commands():
        code, _, err = unipers_run(*command, *PERSONALIZE_BUDGET, cwd=work)
        assert code == 0, (command, err[-3000:])
    return work, before
