"""Random base models at the published shapes (Anole-7B / Chameleon-7B, Stable Diffusion 1.5 / 2.1), built offline.

    build_realshape_backbone("rs/anole", preset="anole-7b", num_layers=1)   # a HF Chameleon folder
    build_realshape_decoder("rs/sd15", preset="sd15")                       # a diffusers SD folder

The configs come from ``presets/*.json`` (their sources: ``presets/README.md``). Only the number of
transformer layers (and, on request, the UNet's ``layers_per_block``) is reduced: widths, head counts, the
65,536-token vocabulary, the VQ tokenizer, 512 px images and their 1,024 image tokens stay as published, so
the real code paths (the vocabulary-wide head, image sequences, the UNet at 64x64 latents) run at real size.
The folders are written with ``save_pretrained`` and read back by ``ARBackbone.from_pretrained`` and
``DiffusionDecoder.from_pretrained`` like a downloaded checkpoint.

Weights are random but cheap: models are built on the meta device and filled from one fixed-seed pool of
normal draws (a prime length, so no two rows of a table repeat the same window), scaled to keep
activations near unit variance. Initialising 1.7B parameters with ``normal_`` takes tens of seconds on
two cores; tiling the pool is a memory copy. The same seed gives bit-identical weights, hence the same
fingerprint.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

BACKBONE_PRESETS = ("anole-7b", "chameleon-7b")
DECODER_PRESETS = ("sd15", "sd21")
PRESETS = BACKBONE_PRESETS + DECODER_PRESETS
_POOL = (1 << 20) + 7  # prime: a row of 4,096 or 11,008 values never lines up with the pool's period


def load_preset(name: str) -> dict:
    """The preset's JSON (``unipers/models/presets/NAME.json``, shipped as package data)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    text = resources.files("unipers.models").joinpath("presets", f"{name}.json").read_text()
    return json.loads(text)


def _dtype(name):
    import torch

    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(table)}")
    return table[name]


def fill_random(model, seed: int = 0, dtype=None):
    """Materialise a meta-device `model` on the CPU in `dtype` and fill it deterministically: norms at 1,
    biases at 0, every other tensor a window of the seeded pool times 1/sqrt(fan_in)."""
    import torch

    dtype = _dtype(dtype) if dtype is not None else torch.float32
    model.to(dtype)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=gen)
    with torch.no_grad():
        for module_name, module in sorted(model.named_modules(), key=lambda m: m[0]):
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or p.ndim == 1:
                    p.zero_()
                else:
                    fan_in = p[0].numel()
                    window = pool.roll(-int(torch.randint(_POOL, (1,), generator=gen))) / math.sqrt(fan_in)
                    flat = p.view(-1)
                    for start in range(0, flat.numel(), _POOL):
                        piece = flat[start:start + _POOL]
                        piece.copy_(window[: piece.numel()])
            for _, b in module.named_buffers(recurse=False):
                if b.is_floating_point() and not torch.isfinite(b).all():
                    b.zero_()
    return model


# ---- backbone ---------------------------------------------------------------------------------------------

def realshape_tokenizer(spec: dict, vocab_size: int, corpus: str = ""):
    """A byte-level BPE in Chameleon's layout, exactly `vocab_size` long: the specials at their published ids,
    image codes ``IMGIMG...Z`` at ``image_token_range``, a small BPE (trained on the tiny corpus) from
    ``text_start``, and ``<reservedNNNNN>`` (NNNNN = id - 4, Chameleon's numbering) everywhere else.

    Fillers are plain vocabulary entries that no merge produces, so text never tokenises into them and
    building the 65,536 entries takes well under a second; only the specials are added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from unipers.models.tiny import _CORPUS, image_token_name

    trainer = trainers.BpeTrainer(vocab_size=2048, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.train_from_iterator([_CORPUS + corpus] * 4, trainer=trainer)
    learned = json.loads(small.to_str())["model"]
    text = sorted(learned["vocab"], key=learned["vocab"].get)

    vocab: dict[str, int] = dict(spec["specials"])
    lo, hi = spec["image_token_range"]
    vocab.update({image_token_name(i): lo + i for i in range(hi - lo)})
    start = spec["text_start"]
    if start + len(text) > vocab_size:
        raise ValueError(f"text tokens do not fit: {start} + {len(text)} > {vocab_size}")
    vocab.update({t: start + i for i, t in enumerate(text)})
    taken = set(vocab.values())
    offset = spec["reserved_offset"]
    vocab.update({spec["reserved_name"].format(i - offset): i for i in range(vocab_size) if i not in taken})
    if len(vocab) != vocab_size or sorted(vocab.values()) != list(range(vocab_size)):
        raise ValueError("the preset's token layout does not fill the vocabulary exactly once")

    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    bos = spec["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=spec["eos"], pad_token=spec["pad"],
                                   unk_token=spec["unk"], sep_token=spec["sep"], padding_side="left")


def build_realshape_backbone(out_dir: str | os.PathLike, preset: str = "anole-7b", num_layers: int = 1,
                             dtype="bfloat16", seed: int = 0) -> Path:
    """Write a random ChameleonForConditionalGeneration at `preset`'s shape with `num_layers` decoder layers,
    plus its tokenizer and processor, to `out_dir` (weights saved in `dtype`)."""
    import torch
    from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, ChameleonImageProcessor,
                              ChameleonProcessor)

    spec = load_preset(preset)
    if spec["_kind"] != "backbone":
        raise ValueError(f"preset {preset!r} is a decoder; backbones: {', '.join(BACKBONE_PRESETS)}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    fields = {k: v for k, v in spec["config"].items() if k not in ("architectures", "model_type", "image_token_id")}
    tokenizer = realshape_tokenizer(spec["tokenizer"], fields["vocab_size"])
    vocab = tokenizer.get_vocab()
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    config = ChameleonConfig(**{**fields, "num_hidden_layers": num_layers, "vocabulary_map": vocab})
    if config.image_token_id != spec["config"]["image_token_id"]:
        raise ValueError(f"<image> landed at {config.image_token_id}, not {spec['config']['image_token_id']}")
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(config)
    fill_random(model, seed, dtype)
    config.dtype = _dtype(dtype)

    proc = spec["processor"]
    image_processor = ChameleonImageProcessor(**proc["image_processor"])
    processor = ChameleonProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   image_seq_length=proc["image_seq_length"], image_token=proc["image_token"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_provenance(out, preset, {"num_hidden_layers": num_layers}, dtype, seed)
    return out


# ---- decoder ----------------------------------------------------------------------------------------------

def build_realshape_decoder(out_dir: str | os.PathLike, preset: str = "sd15", layers_per_block: int | None = None,
                            dtype="bfloat16", seed: int = 0) -> Path:
    """Write vae/, unet/, scheduler/ and model_index.json at `preset`'s shape (the layout of
    ``tiny_decoder.build_tiny_decoder``). `layers_per_block` reduces the UNet's resnet+attention layers per
    block (published: 2); the VAE is never reduced."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from unipers.models.tiny_decoder import _write_model_index

    spec = load_preset(preset)
    if spec["_kind"] != "decoder":
        raise ValueError(f"preset {preset!r} is a backbone; decoders: {', '.join(DECODER_PRESETS)}")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    unet_cfg = strip(spec["unet"])
    if layers_per_block is not None:
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}")
        unet_cfg["layers_per_block"] = layers_per_block
    with torch.device("meta"):
        vae = AutoencoderKL(**strip(spec["vae"]))
        unet = UNet2DConditionModel(**unet_cfg)
    fill_random(vae, seed, dtype)
    fill_random(unet, seed + 1, dtype)
    scheduler = getattr(diffusers, spec["scheduler"]["_class_name"]).from_config(strip(spec["scheduler"]))
    out = Path(out_dir)
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    _write_model_index(out, type(scheduler).__name__)
    _write_provenance(out, preset, {"layers_per_block": unet_cfg["layers_per_block"]}, dtype, seed)
    return out


def build_realshape(out_dir: str | os.PathLike, preset: str, layers: int | None = None, dtype="bfloat16",
                    seed: int = 0) -> Path:
    """Either builder by preset name: `layers` is the backbone's decoder layers (default 1) or the UNet's
    ``layers_per_block`` (default: as published)."""
    if preset in BACKBONE_PRESETS:
        return build_realshape_backbone(out_dir, preset, num_layers=layers or 1, dtype=dtype, seed=seed)
    return build_realshape_decoder(out_dir, preset, layers_per_block=layers, dtype=dtype, seed=seed)


def _write_provenance(out: Path, preset: str, reduced: dict, dtype, seed: int) -> None:
    # Marks the folder as random weights, so nobody mistakes it for a checkpoint.
    info = {"preset": preset, "reduced": reduced, "dtype": str(dtype).replace("torch.", ""), "seed": seed,
            "weights": "random (unipers.models.realshape)"}
    (out / "unipers_realshape.json").write_text(json.dumps(info, indent=2) + "\n")
