"""Augmented views of training photos: a few seeded crops and flips of each image, tokenized once.

    from unipers.data.augment import ViewSpec, view_key, split_view_key, augment_view
    spec = ViewSpec(views=8)                       # data.augment in the config
    key = view_key("data/bo/images/train_000.png", spec, 3)   # ".../train_000.png#rrc0.7-1r0.9-1.1-flip/3"
    img = augment_view(pil_image, spec, seed_text)  # the same view for the same seed, every run

Five photos show the concept at five positions and sizes; soft tokens fitted on them alone learn those
positions too and miss new views of the same object. Each training image of an understanding task
(recognition, caption, VQA) therefore gets ``views`` extra variants: a random resized crop (area share in
``scale``, aspect in ``ratio``) back to the original size, mirrored with probability one half when
``flip``. Colour is never changed: it is part of a concept's identity. Negatives are augmented the same
way, so an augmentation artefact is no cue for "yes".

A view is fully determined by the image's path inside its prepared folder, the spec and the view index,
so its VQ tokens are cached like the original's (``cache/image_tokens-*.safetensors``) and a resumed run
sees the same views. The spec's tag is part of the cache key: changing ``scale`` makes new views.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from unipers.config import check_augment

if TYPE_CHECKING:
    from PIL import Image

SEP = "#"


@dataclass(frozen=True)
class ViewSpec:
    """How many augmented views per training image, and how they are drawn."""

    views: int = 0
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    flip: bool = True

    def __post_init__(self) -> None:
        check_augment(self.views, self.scale, self.ratio)

    @classmethod
    def from_config(cls, cfg) -> ViewSpec:
        """From ``data.augment`` (the loaded DictConfig or an AugmentConfig)."""
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        return cls(views=int(get("views", 0)), scale=tuple(float(x) for x in get("scale", (0.7, 1.0))),
                   ratio=tuple(float(x) for x in get("ratio", (0.9, 1.1))), flip=bool(get("flip", True)))

    @property
    def tag(self) -> str:
        """Names the view distribution in cache keys."""
        lo, hi = (_num(x) for x in self.scale)
        return f"rrc{lo}-{hi}r{_num(self.ratio[0])}-{_num(self.ratio[1])}" + ("-flip" if self.flip else "")


def _num(x: float) -> str:
    """A float exactly (its shortest round-trip digits) in fixed notation, no exponent (its "-" would split
    the tag): 0.7 -> "0.7", 1.0 -> "1", 1e-7 -> "0.0000001"."""
    s = format(Decimal(repr(float(x))), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def view_key(path: str, spec: ViewSpec, view: int) -> str:
    """The feature-cache key of view ``view`` of ``path`` (view 0 is the photo itself: the plain path)."""
    return path if view == 0 else f"{path}{SEP}{spec.tag}/{view}"


def split_view_key(key: str) -> tuple[str, ViewSpec | None, int]:
    """(image path, spec, view) from a key written by ``view_key``; (key, None, 0) for a plain path."""
    if SEP not in key:
        return key, None, 0
    path, rest = key.rsplit(SEP, 1)
    tag, view = rest.rsplit("/", 1)
    flip = tag.endswith("-flip")
    s, r = tag.removesuffix("-flip").removeprefix("rrc").split("r")
    # the tag names the distribution only: how many views a run draws is not part of a view's identity
    return path, ViewSpec(scale=_pair(s), ratio=_pair(r), flip=flip), int(view)


def _pair(text: str) -> tuple[float, float]:
    lo, hi = text.split("-")
    return float(lo), float(hi)


def crop_box(width: int, height: int, spec: ViewSpec, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area share in ``spec.scale`` and aspect in ``spec.ratio``."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


def augment_view(img: "Image.Image", spec: ViewSpec, seed: str) -> "Image.Image":
    """One view of ``img``: crop, resize back to the original size, maybe mirror. Seeded by ``seed``."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    rng = random.Random(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    top, left, h, w = crop_box(img.width, img.height, spec, rng)
    out = TF.resized_crop(img, top, left, h, w, [img.height, img.width],
                          interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if spec.flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out
