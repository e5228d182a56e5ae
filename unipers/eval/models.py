"""The metric models of the benchmark (CLIP for CLIP-I / CLIP-T, DINO for DINO similarity) are
`unipers.models.embedders`; reference photos load here through `unipers prepare`'s photo loader."""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

from unipers.models.embedders import ClipEmbedder, DinoEmbedder, MetricModelError, to_pil  # noqa: F401

__all__ = ["ClipEmbedder", "DinoEmbedder", "MetricModelError", "open_photos", "to_pil"]


def open_photos(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    """Reference photos through the same loader as `unipers prepare` (EXIF, CMYK, 16-bit -> RGB)."""
    from unipers.data.images import open_rgb

    return [open_rgb(p, max_side=4096) for p in paths]
