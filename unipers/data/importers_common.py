"""What the Yo'LLaVA and Yo'Chameleon importers share: issue records, image paths looked up only inside a
root, the error that lists every record an import could not use, and the held-out split."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from unipers.errors import UnipersError


class ImportRefused(UnipersError, ValueError):
    """An import that cannot go ahead; the message is one line naming the file or option. ``details`` are
    the lines the command prints before it (every record that could not be used: file, index, reason)."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        super().__init__(message)
        self.details = list(details)


def issue(where: str, problem: str) -> dict:
    return {"where": where, "problem": problem}


def issue_lines(issues: Iterable[dict]) -> list[str]:
    return [f"  {d['where']}: {d['problem']}" for d in issues]


def lexical(path: Path | str) -> Path:
    """Absolute, with ``..`` folded but symlinks kept: a dataset may link its images in from elsewhere,
    but a path may not climb out of its root by name."""
    return Path(os.path.normpath(Path(path).absolute()))


def inside(path: Path | str, root: Path | str) -> bool:
    return lexical(path).is_relative_to(lexical(root))


def resolve_under(ref: str, root: Path | str) -> Path | None:
    """The file an image reference names, looked up under ``root`` only.

    An existing path inside ``root`` is taken as it is. Otherwise the reference's tails are tried under
    ``root``, longest first, so the authors' ``/mnt/x/yochameleon-data/train/bo/0.png`` or the published
    ``./yollava-data/test/bo/0.png`` find ``ROOT/train/bo/0.png`` / ``ROOT/test/bo/0.png``. None when nothing
    under ``root`` matches: a copy elsewhere (the current folder, a sibling copy of the dataset, the
    original absolute path outside ``root``) is never used, so a missing image is reported instead of
    being taken from another dataset."""
    root = lexical(root)
    path = Path(ref)
    if path.is_absolute() and inside(path, root) and path.is_file():
        return lexical(path)
    parts = [p for p in PurePosixPath(ref.replace("\\", "/")).parts if p not in ("/", ".", "")]
    for i in range(len(parts)):
        tail = parts[i:]
        if ".." in tail:
            continue  # a '..' could climb out of the root
        cand = root.joinpath(*tail)
        if cand.is_file():
            return cand
    return None


def held_out_split(n: int, val_fraction: float, seed: int, min_val: int = 1) -> tuple[list[int], list[int]]:
    """``split_indices``, except that two photos already give one held-out photo when ``val_fraction`` > 0:
    an imported concept without held-out photos could never have its recognition scored."""
    import random

    from unipers.data.prepare import split_indices

    tr, va = split_indices(n, val_fraction, seed, min_val)
    if not va and n >= 2 and val_fraction > 0:
        va = [random.Random(f"{seed}/split").randrange(n)]
        tr = [i for i in range(n) if i not in va]
    return tr, va


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ImportRefused(f"--val-fraction must be in [0, 1), got {val_fraction}")


def read_facts_option(facts: Path | str | None, name: str) -> tuple[list, list, str | None]:
    """(facts, question/answer pairs, source name) of ``--facts``; a missing file names the option."""
    from unipers.data.samples import read_facts

    if facts is None:
        return [], [], None
    if not Path(facts).is_file():
        raise ImportRefused(f"--facts {facts}: file not found")
    fact_list, pairs = read_facts(facts, name)
    return fact_list, pairs, Path(facts).name
