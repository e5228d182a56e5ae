"""Writes that a killed job cannot leave half-done (write beside the target, then rename over it), and that
never replace what unipers did not write.

Every folder written through ``atomic_directory`` carries a marker file (``MARKER``). Replacing an existing
folder needs ``overwrite=True`` and that marker, and is refused when the folder is, or holds, one of the
inputs or the working directory: a mistyped ``--out`` can fail, never delete a user's photos. Files are
created with the permissions the umask gives (teammates can read shared concept files), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from unipers.errors import UnipersError

MARKER = ".unipers-output"
"""The file that marks a folder as written by unipers, so a later ``--overwrite`` may replace it."""


class OutputError(UnipersError, FileExistsError):
    """An output path that unipers will not write to or replace; the message names it and why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_replaceable(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      flag: str = "--overwrite") -> None:
    """Refuse (OutputError) to replace `out` unless it is a folder unipers wrote (it holds ``MARKER``) and it is
    neither an input, nor holds one, nor the working directory or one of its parents."""
    out = Path(out).absolute()
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{out}: is the working directory or holds it; choose another output folder")
    for item in inputs:
        item = Path(item).absolute().resolve()
        if item == real or real in item.parents:
            raise OutputError(f"{out}: holds the input {item}; choose another output folder")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder unipers wrote; {flag} replaces only those")
    if not (out / MARKER).is_file():
        raise OutputError(f"{out}: exists and was not written by unipers (no {MARKER} in it); {flag} replaces "
                          "only folders unipers wrote. Move it away or choose another output folder")


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                 flag: str = "--overwrite") -> None:
    """Before the slow part of a command: may `out` be written? Refuses an existing `out` without
    `overwrite`, and otherwise what ``check_replaceable`` refuses."""
    out = Path(out).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{out}: already exists ({flag} replaces a folder unipers wrote)")
    check_replaceable(out, inputs=inputs, flag=flag)


def mark_output(folder: str | os.PathLike, kind: str) -> None:
    """Write ``MARKER`` into `folder`: unipers wrote it, as `kind` (a prepared concept, an export, ...)."""
    import json

    from unipers import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind, "unipers_version": __version__}) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if Path(tmp).exists():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give what an open() would
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
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, kind: str = "output",
                     inputs: Iterable[str | os.PathLike] = (), flag: str = "--overwrite",
                     cache: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    On any exception (or Ctrl-C) the temporary folder is removed and `path` is untouched, so a failed
    job leaves nothing half-written. `path` existing is an error unless `overwrite`, and then only a folder
    unipers wrote may be replaced (``check_replaceable``). The new folder is marked as `kind`.
    `cache=True`: `path` is a fixed sub-folder of one of unipers' own caches (the tiny models, the world),
    rebuilt in place whatever an older version left there.
    """
    out = Path(path).absolute()
    if not cache:
        check_output(out, overwrite=overwrite, inputs=inputs, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like a mkdir
        mark_output(tmp, kind)
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


LOCK = ".unipers-lock"


class FolderBusyError(UnipersError):
    """Another process is writing to the folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, first_process: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (creating it) while the block runs: a second run started in the
    same folder fails at once (FolderBusyError naming the holder) instead of mixing its files with the first
    one's. The lock is released when the process ends, however it ends. `first_process=False` (a worker of
    a run its launcher already locked) takes no lock."""
    import fcntl

    if not first_process:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise FolderBusyError(f"{folder}: in use by {holder}; wait for it to finish or give another run_dir")
        except OSError as err:  # a file system without locks: run, and say that nothing guards the folder
            print(f"unipers: {folder}: cannot lock ({err.strerror}); make sure no other run writes here",
                  flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def write_new(path: Path, write: Callable[[Path], None]) -> bool:
    """Write `path` through `write(tmp)` unless it exists: True when written, False when the name is taken.
    The file appears whole (one link of a finished temporary file) and never replaces another."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give what an open() would
        try:
            os.link(tmp, path)  # unlike a rename, a link refuses an existing name
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename after a check, racy only against others
            if path.exists() or path.is_symlink():
                return False
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path, suffix=".safetensors.tmp") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)
