"""Writes that a killed job cannot leave half-done: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _remove_stale_tmp(out: Path) -> None:
    """Remove temporary folders left by a killed run on this host (their pid is gone)."""
    prefix = _tmp_prefix(out)
    for p in out.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    On any exception (or Ctrl-C) the temporary folder is removed and `path` is untouched, so a failed
    job leaves nothing half-written. `path` existing is an error unless `overwrite`.
    """
    out = Path(path).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder already exists: {out} (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like a mkdir
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)  # a non-empty folder cannot be replaced in place: move it aside first
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path, suffix=".safetensors.tmp") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)
