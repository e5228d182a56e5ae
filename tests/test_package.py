"""unipers as an installed package: shipped configs by name, caches under $UNIPERS_HOME, and a wheel that
runs from an empty folder without a checkout and writes nothing into its own install."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unipers.config import ConfigError, load_config
from unipers.paths import cache_dir, config_file, shipped_configs

REPO = Path(__file__).resolve().parents[1]


def test_a_shipped_config_loads_by_name_as_by_path():
    assert load_config(["personalize"]) == load_config([REPO / "configs" / "personalize.yaml"])
    assert load_config(["configs/backbone/anole-7b.yaml"]) == load_config(["backbone/anole-7b"])
    assert {"base", "personalize", "world", "backbone/anole-7b", "decoder/sd15"} <= set(shipped_configs())


def test_a_file_of_yours_is_read_and_an_unknown_name_is_refused_listing_the_shipped(tmp_path, monkeypatch):
    mine = tmp_path / "personalize.yaml"
    mine.write_text("seed: 11\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(["personalize.yaml"]).seed == 11  # the file here, not the shipped one
    assert config_file("personalize") == REPO / "configs" / "personalize.yaml"
    with pytest.raises(ConfigError, match=r"no shipped config is named 'persnalize' \(shipped: .*personalize"):
        load_config(["persnalize"])


def test_caches_live_under_unipers_home_unless_one_is_set_apart(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIPERS_WORLD_DIR", raising=False)
    monkeypatch.setenv("UNIPERS_HOME", str(tmp_path / "home"))
    assert cache_dir("world") == tmp_path / "home" / "world"
    cfg = load_config(["world"])
    assert cfg.backbone.path == str(tmp_path / "home" / "world" / "backbone")
    assert cfg.connector.path == str(tmp_path / "home" / "world" / "align" / "connector.safetensors")
    monkeypatch.setenv("UNIPERS_WORLD_DIR", str(tmp_path / "w"))
    assert load_config(["world"]).decoder.path == str(tmp_path / "w" / "decoder")
    monkeypatch.setenv("UNIPERS_TINY_DIR", str(tmp_path / "t"))
    assert cache_dir("tiny") == tmp_path / "t"
    monkeypatch.delenv("UNIPERS_HOME")
    monkeypatch.delenv("UNIPERS_TINY_DIR")
    assert cache_dir("tiny") == Path.home() / ".cache" / "unipers" / "tiny"


def test_a_logger_that_is_not_installed_fails_before_any_model_loads(monkeypatch):
    import importlib.util

    from unipers.training import run

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    monkeypatch.setattr(run, "run_personalize", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r'trainer.logger=wandb: .*pip install "unipers\[wandb\]"'):
        run.train(load_config([], ["trainer.logger=wandb"]))


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_wheel_runs_tiny_check_from_an_empty_folder_and_writes_only_to_unipers_home(tmp_path):
    """`pip install .` (a wheel, not the checkout): configs come as package data, the tiny models are built
    under $UNIPERS_HOME, and the installed files stay byte-identical."""
    wheels, target, empty, home = (tmp_path / n for n in ("wheels", "site", "empty", "home"))
    empty.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(wheels)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("unipers-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (target / "unipers" / "configs" / "personalize.yaml").is_file()
    before = _tree_digest(target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIPERS_")}
    env.update(PYTHONPATH=str(target), UNIPERS_HOME=str(home), OMP_NUM_THREADS="1")
    probe = "import unipers, unipers.paths as p; print(unipers.__file__); print(p.config_dir())"
    where = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True)
    assert where.stdout.splitlines() == [str(target / "unipers" / "__init__.py"), str(target / "unipers" / "configs")]
    out = subprocess.run([sys.executable, "-m", "unipers.cli", "tiny", "--check"], cwd=empty, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "check passed" in out.stdout and str(home / "tiny" / "backbone") in out.stdout
    assert list(empty.iterdir()) == []
    after = _tree_digest(target)
    assert {k for k in after if "__pycache__" not in k} == {k for k in before if "__pycache__" not in k}
    assert all(after[k] == v for k, v in before.items())
