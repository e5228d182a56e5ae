"""Copy detection: how close each generated image comes to any of the concept's train photos.

A decoder that memorised its five training photos scores a high CLIP-I and DINO by reproducing them, which
is not what the metrics are meant to reward. Each generated image gets its highest similarity to any train
photo by three measures, and is a copy when one of them reaches its threshold (``eval.copy_thresholds``):

    clip    cosine of CLIP image embeddings (the CLIP-I model)
    dino    cosine of DINO CLS embeddings (the DINO model)
    pixel   normalized cross-correlation of 64 x 64 RGB thumbnails, both centre-cropped to a square: 1 for
            the same picture at any brightness and contrast, near 0 for unrelated ones

    sims = {"clip": max_cosine_rows(gen, refs), "pixel": max_pixel_similarity(drawn, thumbs)}
    copies = flag_copies(sims, {"clip": 0.95, "pixel": 0.95})
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unipers.eval.metrics import normalize

THUMB = 64


def max_cosine_rows(a: Tensor, b: Tensor) -> list[float]:
    """Per row of a, its highest cosine with any row of b."""
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("max_cosine_rows needs at least one embedding on each side")
    return (normalize(a.float()) @ normalize(b.float()).T).max(1).values.tolist()


def thumbnails(images: Tensor | Sequence) -> Tensor:
    """(N, 3 * 64 * 64) zero-mean, unit-norm thumbnails of 8-bit images: a uint8 (N, 3, H, W) tensor or
    PIL images (any size; each is centre-cropped to a square first, as the decoder's training crops are)."""
    if isinstance(images, Tensor):
        batch = [img for img in images]
    else:
        import numpy as np

        batch = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]
    out = []
    for img in batch:
        _, h, w = img.shape
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = img[:, top:top + side, left:left + side].float()[None] / 255.0
        thumb = F.interpolate(square, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False)
        flat = thumb.flatten()
        out.append(flat - flat.mean())
    stacked = torch.stack(out)
    return stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-8)


def max_pixel_similarity(generated: Tensor, reference_thumbs: Tensor) -> list[float]:
    """Per generated uint8 image, its highest normalized cross-correlation with any reference thumbnail."""
    return (thumbnails(generated) @ reference_thumbs.T).max(1).values.tolist()


def flag_copies(similarities: Mapping[str, Sequence[float]], thresholds: Mapping[str, float]) -> list[bool]:
    """Per image: does any measure with a threshold reach it? (Measures without one are not judged.)"""
    judged = [(similarities[k], float(thresholds[k])) for k in similarities if k in thresholds]
    n = len(next(iter(similarities.values()))) if similarities else 0
    return [any(values[i] >= limit for values, limit in judged) for i in range(n)]


def without(values: Sequence[float], ids: Sequence[str], copies: Sequence[bool]) -> tuple[list[float], list[str]]:
    """The values (and ids) of the images that are not copies."""
    kept = [(v, i) for v, i, c in zip(values, ids, copies) if not c]
    return [v for v, _ in kept], [i for _, i in kept]
