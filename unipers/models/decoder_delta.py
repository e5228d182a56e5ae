"""The decoder side of the align stage, in the models layer: LoRA wrappers for the UNet's attention
projections, and the decoder delta file (``*.decoder.safetensors`` beside an aligned connector) that holds
only the trained decoder tensors and is applied to the stock decoder when a model is built.

    wrapped = add_lora(decoder.unet, rank=8)                      # training: {module path: LoRALinear}
    apply_decoder_delta(decoder, decoder_delta_path("aligned/connector.safetensors"))   # loading

A delta records the fingerprint of the decoder it was trained on and is refused on any other, including a
decoder it was already applied to.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from unipers.concepts.io import ConceptFileError
from unipers.models.fingerprint import config_fields, fingerprint

DECODER_MODES = ("none", "lora", "blocks")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DELTA_FORMAT = "decoder-delta-v1"


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` around a frozen ``nn.Linear``. B starts at zero (training starts at the
    base); the factors are float32 whatever the base dtype, so AdamW never steps bf16 weights."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}")
        self.base, self.rank = base, rank
        self.scale = (alpha if alpha is not None else rank) / rank
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        return out + (F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale).to(out.dtype)

    def delta(self) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_A)


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap every attention projection (``to_q, to_k, to_v, to_out.0``) of ``unet``: {module path: wrapper}."""
    generator = torch.Generator().manual_seed(seed)  # the same initial factors on every rank
    attentions = [(name, m) for name, m in unet.named_modules() if hasattr(m, "to_q") and hasattr(m, "to_out")]
    wrapped: dict[str, LoRALinear] = {}
    for name, attn in attentions:
        for target in LORA_TARGETS:
            parent, _, leaf = f"{name}.{target}".rpartition(".")
            holder = unet.get_submodule(parent)
            base = holder[int(leaf)] if leaf.isdigit() else getattr(holder, leaf)
            if not isinstance(base, nn.Linear):
                continue
            lora = LoRALinear(base, rank, alpha, generator)
            if leaf.isdigit():
                holder[int(leaf)] = lora
            else:
                setattr(holder, leaf, lora)
            wrapped[f"{name}.{target}"] = lora
    if not wrapped:
        raise ValueError("the UNet has no attention projections to put LoRA on")
    return wrapped


def decoder_delta_path(connector_path: str | os.PathLike) -> Path:
    """``aligned/connector.safetensors`` -> ``aligned/connector.decoder.safetensors``."""
    return Path(connector_path).with_suffix(".decoder.safetensors")


@torch.no_grad()
def apply_decoder_delta(decoder, path: str | os.PathLike):
    """Apply an align-stage decoder delta to a stock ``DiffusionDecoder`` in place (LoRA merged into the
    weights), after checking it was trained on this very decoder. Returns the decoder."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("unipers.format") != DELTA_FORMAT:
        raise ConceptFileError(f"{path} is not a unipers decoder delta (format {meta.get('unipers.format')!r})")
    ours = fingerprint(decoder, config_fields(decoder.unet.config))
    if meta.get("decoder_fingerprint") != ours:
        raise ConceptFileError(f"{path}: delta trained on decoder {meta.get('decoder_fingerprint')}, but this "
                               f"decoder is {ours} (another decoder, or a delta already applied)")
    tensors = load_file(str(path))
    if meta["kind"] == "blocks":
        params = dict(decoder.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ConceptFileError(f"{path}: the decoder has no parameters {unknown[:3]}")
        for name, value in tensors.items():
            params[name].copy_(value)
    elif meta["kind"] == "lora":
        for key in [k for k in tensors if k.endswith(".lora_A")]:
            name = key[: -len(".lora_A")]
            weight = decoder.get_submodule(name).weight
            delta = float(meta[f"scale.{name}"]) * (tensors[f"{name}.lora_B"] @ tensors[key])
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    else:
        raise ConceptFileError(f"{path}: unknown delta kind {meta['kind']!r}")
    return decoder
