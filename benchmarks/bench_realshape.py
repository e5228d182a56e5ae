"""Memory and time recipe for personalizing Anole-7B + SD1.5 at real shapes, per GPU class.

    python benchmarks/bench_realshape.py            # prints a markdown table, writes benchmarks/results/realshape.json

Measured per layer at the published widths (unipers/models/presets), on the meta device: shapes, dtypes,
saved tensors and FLOPs are exact, and nothing is computed, so the whole recipe takes seconds on a CPU.

* weights: parameter bytes at bf16 of one Chameleon decoder layer, the embedding + head, the VQ encoder,
  the SD1.5 UNet and VAE;
* activations: bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), with the
  frozen weights (and views of them) excluded, for one decoder layer at batch 1/2/4 and for the whole UNet;
  with gradient checkpointing a layer keeps only its input, and one layer's activations exist at a time
  while it is recomputed. The UNet is also measured as ``decoder.gradient_checkpointing`` runs it
  (diffusers' checkpointing with unipers' checkpoint function): what autograd then saves (the checkpointed
  blocks' inputs and the ops outside them) plus the largest block's recompute;
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward to the inputs (the base is
  frozen, so there are no weight gradients; checkpointing adds one more forward, counted as it runs for
  the UNet).

The full step is then composed: 32 layers of the understanding sequence (an image of 1,024 tokens and ~80
tokens of prompt and answer), a short generation prompt, and the UNet forward + backward at 64x64 latents
(512 px), batch B of each. GPU time is FLOPs / (peak bf16 x MFU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without an install
    sys.path.insert(0, str(REPO))

LAYERS = 32
UND_LEN = 1024 + 2 + 80    # one image (begin, 1,024 tokens, end) and the prompt + answer with the concept prefix
GEN_LEN = 40               # "<bo> is <shared..><gen..>. A photo of <bo> on a beach."
BATCHES = (1, 2, 4)
# Dense bf16 peaks (vendor datasheets, no sparsity) and memory; the CUDA context and allocator slack are
# budgeted as OVERHEAD.
GPUS = {
    "24 GB (RTX 4090 / A10 / L4 class)": {"memory_gb": 24, "peak_tflops": 165},
    "40/48 GB (A100-40GB / A6000 / L40S)": {"memory_gb": 40, "peak_tflops": 312},
    "80 GB (A100-80GB / H100)": {"memory_gb": 80, "peak_tflops": 989},
}
OVERHEAD_GB = 1.5
GB = 1e9


def _saved_bytes(run, frozen: list[torch.Tensor]) -> int:
    """Bytes autograd saves during `run()`, not counting the frozen tensors (or views of them)."""
    frozen_ids = {id(t) for t in frozen}
    total = 0

    def pack(t):
        nonlocal total
        base = t._base if t._base is not None else t
        if id(base) not in frozen_ids and id(t) not in frozen_ids:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def _flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def ar_layer(batch: int, length: int) -> dict:
    from transformers import ChameleonConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer, ChameleonRotaryEmbedding

    from unipers.models.realshape import load_preset

    fields = {k: v for k, v in load_preset("anole-7b")["config"].items()
              if k not in ("architectures", "model_type", "image_token_id", "rope_theta")}
    config = ChameleonConfig(**fields)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = ChameleonDecoderLayer(config, 0).to(torch.bfloat16).requires_grad_(False)
        rotary = ChameleonRotaryEmbedding(config)
        x = torch.randn(batch, length, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(length)[None].expand(batch, -1)
    frozen = list(layer.parameters())

    def forward():
        cos_sin = rotary(x, pos)
        return layer(x, position_embeddings=cos_sin, attention_mask=None, position_ids=pos)

    def step():
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return {"params": sum(p.numel() for p in frozen), "saved_bytes": _saved_bytes(forward, frozen),
            "input_bytes": x.numel() * x.element_size(), "flops_fwd_bwd": _flops(step), "flops_fwd": _flops(forward)}


def ar_rest() -> dict:
    """Parameters outside the decoder layers: embedding, head, final norm, VQ encoder."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from unipers.models.realshape import load_preset

    fields = {k: v for k, v in load_preset("anole-7b")["config"].items()
              if k not in ("architectures", "model_type", "image_token_id", "rope_theta")}
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(ChameleonConfig(**{**fields, "num_hidden_layers": 1,
                                                                         "vocabulary_map": {"<image>": 8711}}))
    layer = sum(p.numel() for p in model.model.layers.parameters())
    return {"params_total_1_layer": sum(p.numel() for p in model.parameters()), "params_layer": layer,
            "params_vq": sum(p.numel() for p in model.model.vqmodel.parameters())}


def unet(batch: int, text_len: int = GEN_LEN, checkpointing: bool = False) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from unipers.models.decoder import _checkpoint
    from unipers.models.realshape import load_preset

    spec = load_preset("sd15")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        model = UNet2DConditionModel(**strip(spec["unet"])).to(torch.bfloat16).requires_grad_(False)
        vae = AutoencoderKL(**strip(spec["vae"]))
        size = spec["unet"]["sample_size"]
        lat = torch.randn(batch, 4, size, size, dtype=torch.bfloat16)
        cond = torch.randn(batch, text_len, spec["unet"]["cross_attention_dim"], dtype=torch.bfloat16,
                           requires_grad=True)
        t = torch.full((batch,), 500)
    frozen = list(model.parameters())

    def forward():
        return model(lat, t, encoder_hidden_states=cond).sample

    def step():
        forward().float().pow(2).mean().backward()

    result = {"params": sum(p.numel() for p in frozen), "params_vae": sum(p.numel() for p in vae.parameters())}
    if checkpointing:
        # Pass 1 only records what each checkpointed block saves when backward recomputes it: the nested
        # hooks of _saved_bytes take precedence, so the throwaway graph never reaches pass 2's count.
        blocks: list[int] = []

        def recording(module, *args):
            blocks.append(_saved_bytes(lambda: module(*args), frozen))
            return _checkpoint(module, *args)

        model.enable_gradient_checkpointing(recording)
        forward()
        model.enable_gradient_checkpointing(_checkpoint)
        result.update(checkpointed_blocks=len(blocks), block_peak_bytes=max(blocks))
    # With checkpointing on, the count includes the blocks' inputs: the checkpoint saves them for backward.
    result.update(saved_bytes=_saved_bytes(forward, frozen), flops_fwd_bwd=_flops(step), flops_fwd=_flops(forward))
    return result


# Which models checkpoint: none, decoder.gradient_checkpointing, backbone.gradient_checkpointing, both.
VARIANTS = {"none": (False, False), "unet": (False, True), "backbone": (True, False), "both": (True, True)}


def recipe(measured: dict, mfu: float) -> list[dict]:
    """Per batch and variant: activations and FLOPs; per GPU class, the fastest variant that fits.

    With both switches the backbone's and the UNet's one-block recompute are both counted, though backward
    recomputes one block at a time: an upper bound by the smaller of the two."""
    rest, rows = measured["ar_rest"], []
    weights = 2 * (rest["params_total_1_layer"] + (LAYERS - 1) * rest["params_layer"]
                   + measured["unet"]["1"]["params"] + measured["unet"]["1"]["params_vae"])
    for b in BATCHES:
        und, gen, u = measured["ar_und"][str(b)], measured["ar_gen"][str(b)], measured["unet"][str(b)]
        uc = measured["unet_ckpt"][str(b)]
        ar_act = {False: LAYERS * (und["saved_bytes"] + gen["saved_bytes"]),
                  True: LAYERS * (und["input_bytes"] + gen["input_bytes"]) + und["saved_bytes"] + gen["saved_bytes"]}
        unet_act = {False: u["saved_bytes"], True: uc["saved_bytes"] + uc["block_peak_bytes"]}
        ar_flops = {False: LAYERS * (und["flops_fwd_bwd"] + gen["flops_fwd_bwd"]),
                    True: LAYERS * (und["flops_fwd_bwd"] + gen["flops_fwd_bwd"] + und["flops_fwd"] + gen["flops_fwd"])}
        unet_flops = {False: u["flops_fwd_bwd"], True: uc["flops_fwd_bwd"]}
        variants = {}
        for v, (ar, un) in VARIANTS.items():
            act, flops = ar_act[ar] + unet_act[un], ar_flops[ar] + unet_flops[un]
            variants[v] = {"act_gb": act / GB, "need_gb": (weights + act) / GB + OVERHEAD_GB,
                           "tflop_step": flops / 1e12}
        row = {"batch": b, "weights_gb": weights / GB, "unet_act_gb": unet_act[False] / GB,
               "unet_act_ckpt_gb": unet_act[True] / GB, "variants": variants, "gpus": {}}
        for name, gpu in GPUS.items():
            fits = {v: variants[v]["need_gb"] <= gpu["memory_gb"] for v in variants}
            fitting = sorted((v for v in variants if fits[v]), key=lambda v: variants[v]["tflop_step"])
            row["gpus"][name] = {
                "fits": fits, "fastest_fitting": fitting[0] if fitting else None,
                "s_per_step": {v: variants[v]["tflop_step"] / (gpu["peak_tflops"] * mfu) for v in variants}}
        rows.append(row)
    return rows


CKPT_NAMES = {"none": "no ckpt", "unet": "UNet ckpt", "backbone": "backbone ckpt", "both": "both ckpt"}


def table(rows: list[dict], mfu: float) -> str:
    names = list(GPUS)
    order = " / ".join(VARIANTS)
    head = (f"| batch | weights bf16 | activations: {order} (UNet part: plain / ckpt) | TFLOP per step: {order} | "
            + " | ".join(f"{n}: both ckpt (shipped configs); the fastest that fits, s/step at {mfu:.0%} MFU"
                         for n in names) + " |")
    lines = [head, "|" + "---|" * (4 + len(names))]
    for r in rows:
        v = r["variants"]
        cells = []
        for n in names:
            g = r["gpus"][n]
            best = g["fastest_fitting"]
            cell = (f"{v['both']['need_gb']:.1f} GB, {g['s_per_step']['both']:.2f} s" if g["fits"]["both"]
                    else f"no ({v['both']['need_gb']:.1f} GB)")
            if best not in (None, "both"):
                cell += f"; {CKPT_NAMES[best]}: {v[best]['need_gb']:.1f} GB, {g['s_per_step'][best]:.2f} s"
            cells.append(cell)
        lines.append(f"| {r['batch']} | {r['weights_gb']:.1f} GB | "
                     + " / ".join(f"{v[k]['act_gb']:.1f}" for k in VARIANTS)
                     + f" GB ({r['unet_act_gb']:.1f} / {r['unet_act_ckpt_gb']:.1f}) | "
                     + " / ".join(f"{v[k]['tflop_step']:.1f}" for k in VARIANTS) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.30, help="model FLOPs utilisation for the time column")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "realshape.json"))
    args = parser.parse_args(argv)
    measured = {"ar_rest": ar_rest(),
                "ar_und": {str(b): ar_layer(b, UND_LEN) for b in BATCHES},
                "ar_gen": {str(b): ar_layer(b, GEN_LEN) for b in BATCHES},
                "unet": {str(b): unet(b) for b in BATCHES},
                "unet_ckpt": {str(b): unet(b, checkpointing=True) for b in BATCHES}}
    rows = recipe(measured, args.mfu)
    print(f"Anole-7B ({LAYERS} layers) + SD1.5 personalize step: understanding sequence {UND_LEN} tokens, "
          f"generation prompt {GEN_LEN}, 512 px; bf16; +{OVERHEAD_GB} GB CUDA context\n")
    print(table(rows, args.mfu))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/bench_realshape.py", "mfu": args.mfu,
                               "layers": LAYERS, "und_len": UND_LEN, "gen_len": GEN_LEN,
                               "overhead_gb": OVERHEAD_GB, "gpus": GPUS, "measured": measured, "recipe": rows},
                              indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
