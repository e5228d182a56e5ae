"""The decoder side of the align stage, in the models layer: LoRA adapters (peft) on the UNet's attention
projections, and the decoder delta file (``*.decoder.safetensors`` beside an aligned connector) that holds
only the trained decoder tensors and is applied to the stock decoder when a model is built.

    factors = add_lora(decoder.unet, rank=8)                      # training: {module path: LoraFactors}
    apply_decoder_delta(decoder, decoder_delta_path("aligned/connector.safetensors"))   # loading

A delta records the fingerprint of the decoder it was trained on and is refused on any other, including a
decoder it was already applied to. Before any weight changes, the header is checked against the metadata
and the decoder, reading no tensor data: a LoRA delta holds exactly an ``A`` (rank, in) and ``B`` (out, rank)
factor for every attention projection of the UNet, and a scale for each; a blocks delta names its UNet
blocks (``blocks``, JSON) and holds exactly their parameters, each of its shape (one written before the
list was recorded: only decoder parameters, each of its shape); all of float dtypes. Then every tensor read must be finite.
A failure is a ``DecoderDeltaError`` naming the file, key and problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from unipers.concepts.io import ConceptFileError
from unipers.models.fingerprint import config_fields, fingerprint
from unipers.safetensors_checks import Header, read_header, short

DECODER_MODES = ("none", "lora", "blocks")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DELTA_FORMAT = "decoder-delta-v1"
MAX_LORA_RANK = 4096


class DecoderDeltaError(ConceptFileError):
    """A decoder delta that cannot be applied; the message names the file, the key and the problem. A
    ConceptFileError, so every command that reports a bad concept file reports it the same way."""


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


def lora_targets(decoder) -> list[str]:
    """The paths in `decoder` of the modules `add_lora` puts adapters on (peft's rule: the path is a target
    or ends in ``.<target>``), as the delta names them (``unet.down_blocks.0....to_q``)."""
    return [name for name, module in decoder.named_modules()
            if name.startswith("unet.") and isinstance(module, nn.Linear)
            and any(name.endswith("." + t) for t in LORA_TARGETS)]


def _expected_tensors(header: Header, decoder, kind: str) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """(key -> shape) of the tensors a delta of `kind` for `decoder` holds, and the LoRA scales; checks the
    metadata they come from on the way."""
    if kind == "blocks" and "blocks" not in header.metadata:  # written before the list was recorded
        params = {name: tuple(p.shape) for name, p in decoder.named_parameters()}
        unknown = [k for k in header.shapes if k not in params]
        if unknown:
            header.fail(f"unexpected tensor {short(unknown[0])}: the decoder has no such parameter")
        if not header.shapes:
            header.fail("holds no tensors (a blocks delta holds the trained decoder parameters)")
        return {k: params[k] for k in header.shapes}, {}
    if kind == "blocks":
        blocks = header.json("blocks")
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) and b for b in blocks):
            header.fail(f"metadata 'blocks' must be a JSON list of UNet block names, got {short(blocks)}")
        modules = dict(decoder.unet.named_modules())
        missing = [b for b in blocks if b not in modules]
        if missing:
            header.fail(f"metadata 'blocks' names {short(missing[0])}: the decoder's UNet has no such block")
        prefixes = tuple(f"unet.{b}." for b in blocks)
        expected = {name: tuple(p.shape) for name, p in decoder.named_parameters() if name.startswith(prefixes)}
        unknown = [k for k in header.shapes if k not in expected]
        if unknown:
            header.fail(f"unexpected tensor {short(unknown[0])}: no parameter of the blocks {', '.join(blocks)}")
        return expected, {}
    rank = header.integer("lora_rank", 1, MAX_LORA_RANK)
    expected, scales = {}, {}
    for name in lora_targets(decoder):
        out_features, in_features = decoder.get_submodule(name).weight.shape
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = (rank, in_features), (out_features, rank)
        scales[name] = header.number(f"scale.{name}", -1e6, 1e6)
    extra = sorted(k for k in header.metadata if k.startswith("scale.") and k[len("scale."):] not in scales)
    if extra:
        header.fail(f"unexpected metadata {short(extra[0])}: the decoder has no such attention projection")
    return expected, scales


@torch.no_grad()
def apply_decoder_delta(decoder, path: str | os.PathLike):
    """Apply an align-stage decoder delta to a stock ``DiffusionDecoder`` in place (LoRA merged into the
    weights), after checking it was trained on this very decoder and holds what its metadata says (see the
    module docstring). Returns the decoder."""
    header = read_header(path, DecoderDeltaError, what="decoder delta")
    meta = header.metadata
    if meta.get("unipers.format") != DELTA_FORMAT:
        header.fail(f"not a unipers decoder delta (format {short(meta.get('unipers.format'))})")
    kind = header.text("kind")
    if kind not in ("lora", "blocks"):
        header.fail(f"metadata 'kind' is {short(kind)}, not one of lora, blocks")
    theirs, ours = header.text("decoder_fingerprint"), fingerprint(decoder, config_fields(decoder.unet.config))
    if theirs != ours:
        header.fail(f"delta trained on decoder {short(theirs)}, but this decoder is {ours} (another decoder, "
                    "or a delta already applied)")
    expected, scales = _expected_tensors(header, decoder, kind)
    header.expect_tensors(expected, exact=True)
    tensors = header.read(expected)
    if kind == "blocks":
        params = dict(decoder.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)
    else:
        for name, scale in scales.items():
            weight = decoder.get_submodule(name).weight
            delta = scale * (tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"])
            weight.copy_((weight.float() + delta.float().to(weight.device)).to(weight.dtype))
    return decoder
