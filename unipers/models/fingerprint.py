"""Base-model fingerprints: concept files and connectors record the bases they were trained on.

A fingerprint hashes the architecture-defining config fields plus a strided sample of every weight (at
most 64 values per tensor, rounded to bfloat16 so the same checkpoint loaded in fp32 or bf16 agrees).
It costs milliseconds at 7B and tells apart two checkpoints of the same shape.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

SAMPLES_PER_TENSOR = 64


def fingerprint(module: nn.Module, config: dict[str, Any] | None = None) -> str:
    """A 16-hex-digit digest of `module`'s weights (sampled) and the given config fields."""
    h = hashlib.sha256()
    h.update(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        if not torch.is_floating_point(tensor):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "cross_attention_dim", "block_out_channels", "latent_channels",
             "in_channels", "out_channels", "sample_size")


def config_fields(config: Any) -> dict[str, Any]:
    """The architecture-defining subset of a transformers / diffusers config."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return {k: get(k) for k in ARCH_KEYS if get(k) is not None}
