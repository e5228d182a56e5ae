"""Writing generated images: a PNG and a JSON sidecar per image and a grid per call, never over a file that
is already there.

A name is ``<prompt slug>_seed<N>.png``; when that name (or its sidecar) exists, from an earlier run or an
earlier image of the same call (two prompts can slug alike: "<bo> reading" and "<bo>  reading!"), the image
gets the first free ``_2``, ``_3``, ... suffix. The grid is ``grid.png``, else ``grid_2.png``, ... Each file
is written beside its target and then hard-linked into place, which fails instead of replacing when the
name was taken meanwhile (a concurrent run), so a file appears whole or not at all and nothing is overwritten.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from unipers.inference.session import GenerationOutput


class SavedImages(list):
    """The image paths, in the order of the images; ``.grid`` is the grid's path."""

    grid: Path


def slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48] or "image"


def _candidates(stem: str) -> Iterator[str]:
    yield stem
    n = 2
    while True:
        yield f"{stem}_{n}"
        n += 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def save_images(output: "GenerationOutput", out_dir: str | os.PathLike, fingerprints: dict[str, str]) -> SavedImages:
    """PNG + JSON sidecar per image, and a grid for the call, under fresh names (see the module's doc)."""
    from torchvision.utils import make_grid, save_image

    from unipers import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = SavedImages()
    for image, s in zip(output.tensors, output.settings):
        sidecar = json.dumps({**s.to_dict(), "fingerprints": fingerprints, "unipers_version": __version__},
                             indent=2) + "\n"
        for stem in _candidates(f"{slug(s.prompt)}_seed{s.seed}"):
            png, side = out / f"{stem}.png", out / f"{stem}.json"
            # Both names must be free (a sidecar without its image still belongs to someone); checking here,
            # before write_new's race-safe check, saves encoding a PNG per taken name.
            if any(p.exists() or p.is_symlink() for p in (png, side)):
                continue
            if not write_new(png, lambda tmp, image=image: save_image(image, tmp, format="png")):
                continue
            if write_new(side, lambda tmp, text=sidecar: tmp.write_text(text)):
                written.append(png)
                break
            png.unlink()  # ours, just linked: a concurrent run took the sidecar's name, so move on
    grid = make_grid(output.tensors, nrow=min(len(output), 8), padding=2)
    for stem in _candidates("grid"):
        path = out / f"{stem}.png"
        if not (path.exists() or path.is_symlink()) and write_new(path, lambda t: save_image(grid, t, format="png")):
            written.grid = path
            break
    return written
