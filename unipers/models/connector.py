"""Connector: the AR model's last hidden states -> what the diffusion decoder is conditioned on.

Trained once per (backbone, decoder) pair in the *align* stage, then frozen while personalizing. It is saved
alone as safetensors with its constructor arguments and the caller's base fingerprints in the metadata, so a
concept run can check that it was aligned on the same bases before building anything.

Loading trusts nothing before the header has been checked against itself (`read_connector_metadata`, no
tensor data read): the constructor arguments present, well-typed and bounded, then exactly the tensors a
connector of that config has, each of exactly its shape and of a float dtype; then every tensor read must be
finite. A failure is a ``ConnectorFileError`` naming the file, key and problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from unipers.concepts.io import ConceptFileError
from unipers.safetensors_checks import Header, read_header, short

CONNECTOR_KINDS = ("linear", "mlp", "queries")
_CONFIG_KEY = "unipers.connector"
_FORMAT_KEY = "unipers.format"
_FORMAT = "connector-v1"
MAX_DIM = 65536
"""The largest in/out/pooled width a connector file may declare; its other arguments have bounds in
``_CONFIG_BOUNDS``. They keep a corrupt config from building a huge module before its shapes are compared."""
_CONFIG_BOUNDS = {"in_dim": (1, MAX_DIM), "out_dim": (1, MAX_DIM), "num_queries": (1, 4096), "num_layers": (0, 64),
                  "num_heads": (1, 1024)}


class ConnectorFileError(ConceptFileError):
    """A connector file that cannot be loaded; the message names the file, the key and the problem. A
    ConceptFileError, so every command that reports a bad concept file reports it the same way."""


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
        """The connector saved at `path`, after its header is checked against its config (nothing is built
        before) and every tensor is checked finite."""
        header, config = _checked_header(path)
        connector = cls(**config)
        state = header.read(header.shapes, device=map_location)
        dtypes = {t.dtype for t in state.values()}
        connector.to(device=map_location, dtype=dtypes.pop() if len(dtypes) == 1 else None)
        connector.load_state_dict(state, strict=True)
        return connector


def _checked_config(header: Header) -> dict:
    """The constructor arguments in the header: every one present, of its type and within its bounds."""
    where = f"metadata {_CONFIG_KEY!r}"
    config = header.check_keys(header.json(_CONFIG_KEY), where,
                               ("kind", "in_dim", "out_dim", "pooled_dim", "num_queries", "num_layers", "num_heads",
                                "mlp_ratio", "dropout"))
    if config["kind"] not in CONNECTOR_KINDS:
        header.fail(f"{where} kind is {short(config['kind'])}, not one of {', '.join(CONNECTOR_KINDS)}")
    for key, (low, high) in _CONFIG_BOUNDS.items():
        header.check_int(config[key], f"{where} {key}", low, high)
    if config["pooled_dim"] is not None:
        header.check_int(config["pooled_dim"], f"{where} pooled_dim", 1, MAX_DIM)
    header.check_number(config["mlp_ratio"], f"{where} mlp_ratio", 1 / 64, 64)
    header.check_number(config["dropout"], f"{where} dropout", 0, 1)
    if int(config["out_dim"] * config["mlp_ratio"]) < 1:
        header.fail(f"{where} mlp_ratio {config['mlp_ratio']} leaves out_dim {config['out_dim']} no hidden width")
    if config["kind"] == "queries" and config["out_dim"] % config["num_heads"]:
        header.fail(f"{where} out_dim {config['out_dim']} is not divisible by num_heads {config['num_heads']}")
    return config


def _checked_header(path: str | Path) -> tuple[Header, dict]:
    """The header of a connector file checked against itself, and the constructor arguments it holds."""
    header = read_header(path, ConnectorFileError, what="connector file")
    if header.metadata.get(_FORMAT_KEY) != _FORMAT or _CONFIG_KEY not in header.metadata:
        header.fail(f"not a unipers connector file (format {short(header.metadata.get(_FORMAT_KEY))})")
    config = _checked_config(header)
    # The shapes a connector of this config has, from one built on the meta device: no memory, and no
    # second list of shapes to keep in step with __init__.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Connector(**config).state_dict().items()}
    header.expect_tensors(expected)
    return header, config


def read_connector_metadata(path: str | Path) -> dict[str, str]:
    """The saved metadata (caller keys plus ``unipers.connector``: the kwargs as JSON), without the weights,
    after checking the file against it (``ConnectorFileError`` otherwise)."""
    return dict(_checked_header(path)[0].metadata)
