"""The decoder side of the align stage, in the models layer: LoRA adapters (peft) on the UNet's attention
projections, and the decoder delta file (``*.decoder.safetensors`` beside an aligned connector) that holds
only the trained decoder tensors and is applied to the stock decoder when a model is built.

    factors = add_lora(decoder.unet, rank=8)                      # training: {module path: LoraFactors}
    apply_decoder_delta(decoder, decoder_delta_path("aligned/connector.safetensors"))   # loading

A delta records the fingerprint of the decoder it was trained on and is refused on any other, including a
decoder it was already applied to.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from unipers.concepts.io import ConceptFileError
from unipers.models.fingerprint import config_fields, fingerprint

DECODER_MODES = ("none", "lora", "blocks")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DELTA_FORMAT = "decoder-delta-v1"


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> dict[str, nn.Module]:
    """LoRA adapters (peft, through diffusers' ``add_adapter``) on every attention projection
    (``to_q, to_k, to_v, to_out.0``) of ``unet``: {module path: its peft LoRA layer}; `lora_factors` reads one. B starts at zero, so training
    starts at the base; the factors are float32 whatever the base dtype, so AdamW never steps bf16 weights."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(LORA_TARGETS),
                        init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial factors on every rank
        try:
            unet.add_adapter(config)
        except ValueError as err:  # peft: no module matched the targets
            raise ValueError(f"the UNet has no attention projections to put LoRA on ({err})") from None
    cast_training_params(unet, dtype=torch.float32)
    return {name: m for name, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def lora_factors(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float]:
    """(A (rank, in), B (out, rank), scale) of a peft LoRA layer: it computes ``W + scale * B @ A``."""
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, float(layer.scaling["default"])


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
