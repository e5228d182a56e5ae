"""The tiny world: procedurally drawn objects, each a shape x colour x pattern, on varied backgrounds.

    from unipers.world.synth import WorldObject, render, sample_objects
    obj = WorldObject("star", "purple", "striped")
    img = render(obj, random.Random(0))          # a 32x32 PIL image, the object at a random place and size
    obj.describe()                               # "purple striped star"

Everything is drawn from the ``random.Random`` passed in, so a seed reproduces an image bit for bit. Drawing
happens at 4x resolution and is box-filtered down, so edges and patterns are anti-aliased.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS}
IMAGE_SIZE = 32
_SUPER = 4  # supersampling factor


@dataclass(frozen=True, order=True)
class WorldObject:
    shape: str
    colour: str
    pattern: str

    def __post_init__(self) -> None:
        for key, value in self.attributes().items():
            if value not in ATTRIBUTES[key]:
                raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(ATTRIBUTES[key])}")

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}

    def labels(self) -> tuple[int, int, int]:
        """Class indices (shape, colour, pattern)."""
        return (SHAPES.index(self.shape), tuple(COLOURS).index(self.colour), PATTERNS.index(self.pattern))

    def describe(self, keep: Sequence[str] = ("colour", "pattern", "shape")) -> str:
        """Words in English order, e.g. "purple striped star"; ``keep`` drops the others (shape always stays)."""
        words = [self.colour if "colour" in keep else None, self.pattern if "pattern" in keep else None, self.shape]
        return " ".join(w for w in words if w)

    def shared(self, other: WorldObject) -> int:
        """How many of the three attributes the two objects share."""
        return sum(a == b for a, b in zip(self.labels(), other.labels()))

    def __str__(self) -> str:
        return self.describe()


def all_objects() -> list[WorldObject]:
    return [WorldObject(s, c, p) for s, c, p in itertools.product(SHAPES, COLOURS, PATTERNS)]


def near_misses(obj: WorldObject) -> list[WorldObject]:
    """Every object sharing exactly two of ``obj``'s three attributes."""
    return [o for o in all_objects() if o.shared(obj) == 2]


def with_article(words: str) -> str:
    return f"{'an' if words[:1] in 'aeiou' else 'a'} {words}"


# ---- drawing ---------------------------------------------------------------------------------------------

def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` centred at the origin (y grows downwards)."""
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return np.maximum(abs(x), abs(y)) <= 0.82 * r
    if shape == "diamond":
        return abs(x) + abs(y) <= 1.1 * r
    if shape == "triangle":
        top, bottom = -r, 0.75 * r
        half_width = (y - top) / (bottom - top) * 1.05 * r
        return (y >= top) & (y <= bottom) & (abs(x) <= half_width)
    if shape == "cross":
        arm = 0.36 * r
        return ((abs(x) <= arm) & (abs(y) <= r)) | ((abs(y) <= arm) & (abs(x) <= r))
    if shape == "star":
        theta = np.arctan2(x, -y)  # 0 = pointing up
        rho = np.sqrt(x**2 + y**2)
        spike = np.abs(np.cos(2.5 * theta)) ** 1.5  # five points
        return rho <= r * (0.48 + 0.62 * spike)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Where the pattern's second colour goes, in the object's own coordinates."""
    if pattern == "plain":
        return np.zeros_like(x, dtype=bool)
    if pattern == "striped":
        return np.floor((x + y) / (period * math.sqrt(2) / 2)) % 2 == 1
    if pattern == "dotted":
        spacing = period * 1.3
        gx = (x / spacing) - np.round(x / spacing)
        gy = (y / spacing) - np.round(y / spacing)
        return gx**2 + gy**2 <= 0.22**2
    if pattern == "checkered":
        return (np.floor(x / (period * 0.9)) + np.floor(y / (period * 0.9))) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def _background(rng: random.Random, size: int, tint: Sequence[float] | None = None) -> np.ndarray:
    """A muted, darkish background: a tinted base, a linear gradient and fine noise (float, 0..255).
    ``tint``: the base colour (an RGB triple, jittered by up to 10 per channel) instead of a drawn grey;
    the draws are the same, so a seed puts the object at the same place, size and colour on any tint."""
    grey = rng.uniform(35, 120)
    jitter = np.array([rng.uniform(-18, 18) for _ in range(3)])
    base = np.array([grey] * 3) + jitter if tint is None else np.asarray(tint, dtype=float) + jitter * (10 / 18)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size)
    gx, gy = np.meshgrid(ramp, ramp)
    grad = (math.cos(angle) * gx + math.sin(angle) * gy)[..., None] * rng.uniform(0, 30)
    nprng = np.random.default_rng(rng.getrandbits(32))
    noise = nprng.normal(0, rng.uniform(0, 7), (size, size, 1))
    return np.clip(base + grad + noise, 0, 255)


def render(obj: WorldObject, rng: random.Random, size: int = IMAGE_SIZE, tint: Sequence[float] | None = None):
    """One photo of ``obj``: random position, size, small colour jitter and background (of colour ``tint``
    when given, else a drawn grey); a PIL RGB image."""
    from PIL import Image

    big = size * _SUPER
    canvas = _background(rng, big, tint)
    radius = rng.uniform(0.28, 0.37) * size * _SUPER
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    coords = np.arange(big) + 0.5
    x, y = np.meshgrid(coords - cx, coords - cy)
    mask = _shape_mask(obj.shape, x, y, radius)
    colour = np.array(COLOURS[obj.colour], dtype=float) + np.array([rng.uniform(-14, 14) for _ in range(3)])
    period = 4.0 * _SUPER * rng.uniform(0.9, 1.1)
    second = _pattern_mask(obj.pattern, x + rng.uniform(0, period), y + rng.uniform(0, period), period)
    accent = colour * 0.28 if obj.colour != "white" else np.array([60.0, 60.0, 70.0])
    canvas[mask] = colour
    canvas[mask & second] = accent
    small = canvas.reshape(size, _SUPER, size, _SUPER, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), "RGB")


def render_many(objects: Iterable[WorldObject], seed: int | str, size: int = IMAGE_SIZE,
                tints: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """(N, size, size, 3) uint8, one seeded image per object (image i depends only on seed and i);
    ``tints``: image i's background colour (see `render`)."""
    objects = list(objects)
    tints = tints if tints is not None else [None] * len(objects)
    out = [np.asarray(render(o, random.Random(f"{seed}/{i}"), size, t)) for i, (o, t) in enumerate(zip(objects, tints))]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def sample_objects(n: int, seed: int | str, exclude: Iterable[WorldObject] = ()) -> list[WorldObject]:
    """``n`` objects drawn uniformly (seeded) from the world, never one of ``exclude``."""
    banned = set(exclude)
    pool = [o for o in all_objects() if o not in banned]
    rng = random.Random(f"objects/{seed}")
    return [rng.choice(pool) for _ in range(n)]
