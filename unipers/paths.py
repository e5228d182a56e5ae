"""Where unipers finds its shipped configs and keeps what it builds, whether it runs from a source checkout
or from an installed wheel.

    config_file("personalize")            # the shipped configs/personalize.yaml
    config_file("my/run.yaml")            # a file of yours wins over a shipped name
    cache_dir("tiny")                     # $UNIPERS_TINY_DIR, else $UNIPERS_HOME/tiny (~/.cache/unipers/tiny)

Built models (the tiny presets, the demo world) are caches: they go under ``$UNIPERS_HOME`` (default
``~/.cache/unipers``), never inside the installed package, where they would be lost on upgrade or refused
by a read-only site-packages.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def home() -> Path:
    """``$UNIPERS_HOME``, default ``~/.cache/unipers``."""
    return Path(os.environ.get("UNIPERS_HOME") or Path.home() / ".cache" / "unipers").expanduser()


def cache_dir(name: str) -> Path:
    """One cache's folder: ``$UNIPERS_<NAME>_DIR`` when set, else ``home() / name``."""
    return Path(os.environ.get(f"UNIPERS_{name.upper()}_DIR") or home() / name).expanduser()


def source_checkout() -> Path | None:
    """The repository root when this package is imported from a git checkout of unipers (``pip install -e .``
    or ``python -m`` from the root), else None."""
    root = PACKAGE.parent
    return root if (root / "setup.py").is_file() and (root / ".git").exists() else None


def config_dir() -> Path:
    """The shipped configs: package data in an installed wheel; ``configs/`` beside the package in a
    checkout (and in a Slurm job's code snapshot)."""
    for folder in (PACKAGE / "configs", PACKAGE.parent / "configs"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no shipped configs in {PACKAGE}: reinstall unipers")


def shipped_configs() -> list[str]:
    """Names of the shipped configs, e.g. ``personalize``, ``backbone/anole-7b``."""
    root = config_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def config_file(name_or_path: str | os.PathLike) -> Path:
    """A config given as a path (a file that exists) or as a shipped name (``personalize``,
    ``backbone/anole-7b``, ``configs/personalize.yaml``). FileNotFoundError names both places looked in."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    name = name[len("configs/"):] if name.startswith("configs/") else name
    shipped = config_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    if path.is_absolute():
        raise FileNotFoundError(f"config file not found: {path}")
    raise FileNotFoundError(f"config file not found: {path}, and no shipped config is named {name!r} "
                            f"(shipped: {', '.join(shipped_configs())})")
