"""Connector: the AR model's last hidden states -> what the diffusion decoder is conditioned on.

Trained once per (backbone, decoder) pair in the *align* stage, then frozen while personalizing. It is saved
alone as safetensors with its constructor arguments and the caller's base fingerprints in the metadata, so a
concept run can check that it was aligned on the same bases before building anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONNECTOR_KINDS = ("linear", "mlp", "queries")
_CONFIG_KEY = "unipers.connector"
_FORMAT_KEY = "unipers.format"
_FORMAT = "connector-v1"


@dataclass
class Conditioning:
    """What the decoder is conditioned on; a batch of them moves, slices and concatenates as one."""

    embeds: Tensor
    """(B, L, D) cross-attention sequence."""
    mask: Tensor
    """(B, L) bool, True = keep. Masked positions must not change the decoder's output."""
    pooled: Tensor | None = None
    """(B, P) pooled vector, fed to the UNet as a projection class embedding; None if the UNet has none."""

    def __post_init__(self) -> None:
        if self.embeds.ndim != 3 or self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(f"embeds must be (B, L, D) and mask (B, L); got {tuple(self.embeds.shape)} "
                             f"and {tuple(self.mask.shape)}")
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != self.embeds.shape[0]):
            raise ValueError(f"pooled must be (B, P) with B={self.embeds.shape[0]}; got {tuple(self.pooled.shape)}")

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Conditioning:
        """Select samples along the batch; an int keeps the batch dimension (size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Conditioning(self.embeds[index], self.mask[index],
                            None if self.pooled is None else self.pooled[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move; ``dtype`` applies to the float tensors only (the mask stays bool)."""
        return Conditioning(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device),
                            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype))

    def pad_to(self, length: int) -> Conditioning:
        """Append masked zero positions up to ``length`` (batching sequences of different lengths)."""
        extra = length - self.seq_len
        if extra < 0:
            raise ValueError(f"cannot pad a length-{self.seq_len} conditioning to {length}")
        if extra == 0:
            return self
        b, _, d = self.embeds.shape
        embeds = torch.cat([self.embeds, self.embeds.new_zeros(b, extra, d)], dim=1)
        mask = torch.cat([self.mask, self.mask.new_zeros(b, extra)], dim=1)
        return Conditioning(embeds, mask, self.pooled)

    def expand(self, batch_size: int) -> Conditioning:
        """Broadcast a batch of one to ``batch_size`` (e.g. one unconditional embedding for a whole batch)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a batch of {self.batch_size} to {batch_size}")
        return Conditioning(self.embeds.expand(batch_size, -1, -1), self.mask.expand(batch_size, -1),
                            None if self.pooled is None else self.pooled.expand(batch_size, -1))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch, padding shorter sequences with masked positions."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        has_pooled = {c.pooled is not None for c in items}
        if len(has_pooled) != 1:
            raise ValueError("cannot concatenate conditionings with and without a pooled vector")
        length = max(c.seq_len for c in items)
        padded = [c.pad_to(length) for c in items]
        pooled = torch.cat([c.pooled for c in padded]) if has_pooled == {True} else None
        return Conditioning(torch.cat([c.embeds for c in padded]), torch.cat([c.mask for c in padded]), pooled)


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class Connector(nn.Module):
    """AR hidden states -> decoder conditioning. kind: "linear" | "mlp" | "queries".

    Hidden states at masked positions are zeroed on entry, so padding can never leak into the output
    (even NaN/inf there); per-token kinds emit zeros at masked positions and keep the input mask.
    "queries" resamples any prompt length to ``num_queries`` tokens (all kept).
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, pooled_dim: int | None = None,
                 num_queries: int = 16, num_layers: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in CONNECTOR_KINDS:
            raise ValueError(f"unknown connector kind {kind!r}; valid kinds: {', '.join(CONNECTOR_KINDS)}")
        self.config = dict(kind=kind, in_dim=in_dim, out_dim=out_dim, pooled_dim=pooled_dim,
                           num_queries=num_queries, num_layers=num_layers, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, dropout=dropout)
        self.kind = kind
        hidden_dim = int(out_dim * mlp_ratio)
        if kind == "linear":
            self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                      nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))
        else:
            if out_dim % num_heads:
                raise ValueError(f"out_dim={out_dim} must be divisible by num_heads={num_heads}")
            self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
            self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
            layer = nn.TransformerDecoderLayer(out_dim, num_heads, hidden_dim, dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.resampler = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(out_dim))
        self.pool = (nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, pooled_dim))
                     if pooled_dim is not None else None)

    def forward(self, hidden: Tensor, mask: Tensor) -> Conditioning:
        mask = mask.bool()
        hidden = torch.where(mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        pooled = self.pool(_masked_mean(hidden, mask)) if self.pool is not None else None
        if self.kind != "queries":
            embeds = self.proj(hidden) * mask.unsqueeze(-1).to(hidden.dtype)
            return Conditioning(embeds, mask, pooled)
        memory = self.proj(hidden)
        queries = self.queries.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        embeds = self.resampler(queries, memory, memory_key_padding_mask=~mask)
        out_mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return Conditioning(embeds, out_mask, pooled)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write weights + constructor kwargs + caller metadata (e.g. base fingerprints) as safetensors."""
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if key in (_CONFIG_KEY, _FORMAT_KEY):
                raise ValueError(f"metadata key {key!r} is reserved")
            if not isinstance(value, str):
                raise TypeError(f"metadata values must be str; {key!r} is {type(value).__name__}")
        metadata[_CONFIG_KEY] = json.dumps(self.config, sort_keys=True)
        metadata[_FORMAT_KEY] = _FORMAT
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Connector:
        metadata = read_connector_metadata(path)
        connector = cls(**json.loads(metadata[_CONFIG_KEY]))
        state = load_file(str(path), device=str(map_location))
        dtypes = {t.dtype for t in state.values()}
        connector.to(device=map_location, dtype=dtypes.pop() if len(dtypes) == 1 else None)
        connector.load_state_dict(state, strict=True)
        return connector


def read_connector_metadata(path: str | Path) -> dict[str, str]:
    """The saved metadata (caller keys plus ``unipers.connector``: the kwargs as JSON), without the weights."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get(_FORMAT_KEY) != _FORMAT or _CONFIG_KEY not in metadata:
        raise ValueError(f"{path} is not a unipers connector file (format {metadata.get(_FORMAT_KEY)!r})")
    return dict(metadata)
