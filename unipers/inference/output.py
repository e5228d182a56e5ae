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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from torch import Tensor

from unipers.io import write_new

if TYPE_CHECKING:
    import PIL.Image


@dataclass
class GenerationOutput:
    """What `InferenceSession.generate` returns: one entry per image, prompts x ``num_images`` in order."""

    tensors: Tensor
    """(N, 3, H, W), float in [0, 1]."""
    settings: list["GenerationSettings"]
    """Everything that determines each image (prompt, seed, steps, ...): enough to make it again."""

    @property
    def images(self) -> list["PIL.Image.Image"]:
        """The images as PIL RGB images."""
        from torchvision.transforms.functional import to_pil_image

        return [to_pil_image(t.clamp(0, 1).cpu()) for t in self.tensors]

    def __len__(self) -> int:
        return len(self.settings)


@dataclass
class GenerationSettings:
    """Everything that determines a generated image: saved beside it, enough to regenerate it exactly."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    size: Optional[int] = None
    scheduler: Optional[str] = None
    concept_files: list[str] = field(default_factory=list)
    thought_from: Optional[str] = None
    """With --think: the prompt as given, which the AR model rewrote into ``prompt``."""

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_SECTIONS = ("backbone", "decoder", "connector")
"""The config sections that pick the models an image was drawn with; a sidecar records them as ``models``."""


def model_settings(cfg) -> dict:
    """The model sections of `cfg` as a sidecar records them: every field, with model paths made absolute
    ("tiny" stays), so ``--from-sidecar`` rebuilds the same models from any folder."""
    from dataclasses import asdict

    sections = {name: asdict(getattr(cfg, name)) for name in MODEL_SECTIONS}
    for section in sections.values():
        path = section.get("path")
        if path and path != "tiny":
            section["path"] = str(Path(path).expanduser().absolute())
    return sections


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


def save_images(output: "GenerationOutput", out_dir: str | os.PathLike, fingerprints: dict[str, str],
                models: Optional[dict] = None) -> SavedImages:
    """PNG + JSON sidecar per image, and a grid for the call, under fresh names (see the module's doc).
    A sidecar holds the settings, the models' `fingerprints` and, given `models` (``model_settings(cfg)``),
    the config sections that load those models again."""
    from torchvision.utils import make_grid, save_image

    from unipers import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = SavedImages()
    extra = {"models": models} if models is not None else {}
    for image, s in zip(output.tensors, output.settings):
        sidecar = json.dumps({**s.to_dict(), **extra, "fingerprints": fingerprints, "unipers_version": __version__},
                             indent=2) + "\n"
        for stem in _candidates(f"{slug(s.thought_from or s.prompt)}_seed{s.seed}"):  # named as the user wrote it
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
