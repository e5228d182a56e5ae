"""The `unipers` command: help answers without importing torch; sub-commands run end to end."""

import subprocess
import sys

import pytest

from unipers.cli import COMMANDS


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "unipers.cli", *args], capture_output=True, text=True, **kw)


PROBE = (
    "import sys\n"
    "from unipers.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'lightning') if m in sys.modules]\n"
    "print('HEAVY', heavy)\n"
)


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in COMMANDS]])
def test_help_imports_no_heavy_library(args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    assert "usage:" in out.stdout


def test_top_level_help_lists_every_command():
    out = run_cli("--help")
    for name in COMMANDS:
        assert name in out.stdout


def test_tiny_and_export_commands(tiny_dirs, tmp_path):
    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel

    out = run_cli("tiny", "--out", str(tiny_dirs[0].parent))
    assert out.returncode == 0 and str(tiny_dirs[0]) in out.stdout
    model = UnifiedModel.from_config(load_config([]))
    model.add_concept("bo", "dog")
    concept = model.save_concepts(tmp_path / "bo.safetensors")
    out = run_cli("export", "--backbone", str(tiny_dirs[0]), "--concept", str(concept), "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "unipers_prompts.json").is_file()


def test_tiny_check_trains_a_concept_and_finds_the_rest_bit_identical(tiny_dirs):
    out = run_cli("tiny", "--out", str(tiny_dirs[0].parent), "--check")
    assert out.returncode == 0, out.stderr
    assert "check passed" in out.stdout and "step 4:" in out.stdout
