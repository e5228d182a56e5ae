"""The README's real-checkpoint commands, read from the README and run as written against the realshape
folders placed where the README puts checkpoints (``checkpoints/anole-7b``, ``checkpoints/sd15``), after the
align stage the README names (`readme_run` in conftest.py). Only step counts and batch sizes are appended, to
fit the tier's budget."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.realshape


def test_the_readme_names_a_real_path_command(readme_commands):
    commands = readme_commands
    assert commands and all(c[0] == "train" for c in commands)
    assert any("backbone/anole-7b" in c and "decoder/sd15" in c for c in commands)


def test_the_readme_real_path_runs_as_written(readme_run):
    work, _ = readme_run
    assert (work / "runs" / "bo" / "concepts" / "last.safetensors").is_file()
    assert (work / "runs" / "bo" / "config.yaml").is_file()
