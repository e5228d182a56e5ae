"""The README's real-checkpoint commands, read from the README and run as written against the realshape
folders placed where the README puts checkpoints (``checkpoints/anole-7b``, ``checkpoints/sd15``), after the
align stage the README names. Only step counts and batch sizes are appended, to fit the tier's budget."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.realshape

README = Path(__file__).parents[2] / "README.md"
BUDGET = ["trainer.max_steps=1", "data.batch_size=1", "trainer.progress_bar=false", "trainer.checkpoint_every=0",
          "trainer.val_every=0", "trainer.logger=csv", "personalize.warmup_steps=0"]


def real_path_commands() -> list[list[str]]:
    """The `unipers ...` commands in the README's bash blocks under "From the demo to real checkpoints"."""
    text = README.read_text()
    section = text.split("## From the demo to real checkpoints", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "unipers":
                commands.append(words[1:])
    return commands


def test_the_readme_names_a_real_path_command():
    commands = real_path_commands()
    assert commands and all(c[0] == "train" for c in commands)
    assert any("backbone/anole-7b" in c and "decoder/sd15" in c for c in commands)


def test_the_readme_real_path_runs_as_written(rs_dirs, rs_concept, tmp_path, monkeypatch, unipers_run):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "anole-7b").symlink_to(rs_dirs[0])
    (tmp_path / "checkpoints" / "sd15").symlink_to(rs_dirs[1])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bo").symlink_to(rs_concept)
    pairs = tmp_path / "data" / "pairs"
    (pairs / "images").mkdir(parents=True)
    lines = []
    for i, colour in enumerate(((200, 40, 40), (40, 200, 40))):
        Image.new("RGB", (512, 512), colour).save(pairs / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a plain square number {i}"}))
    (pairs / "captions.jsonl").write_text("\n".join(lines) + "\n")
    # Step 2 of the README: align once per backbone/decoder pair (docs/training.md's command).
    code, _, err = unipers_run("train", "base", "backbone/anole-7b", "decoder/sd15", "stage=align",
                                       "data.pairs=data/pairs", "run_dir=runs/align", *BUDGET)
    assert code == 0, err[-3000:]
    assert (tmp_path / "runs" / "align" / "connector.safetensors").is_file()
    for command in real_path_commands():
        code, _, err = unipers_run(*command, *BUDGET)
        assert code == 0, (command, err[-3000:])
    assert (tmp_path / "runs" / "bo" / "concepts" / "last.safetensors").is_file()
