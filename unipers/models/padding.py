"""Dynamic padding of token-id lists into one batch: used by the models' own prompt encoding, and by data,
eval and inference above them."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", labels: bool = False) -> tuple[Tensor, Tensor]:
    """Pad to the longest sequence (dynamic padding): (ids, attention_mask)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), -100 if labels else pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
