"""Memory and time recipe for personalizing Anole-7B + SD1.5 at real shapes, per GPU class.

    python benchmarks/bench_realshape.py            # prints a markdown table, writes benchmarks/results/realshape.json

Measured per layer at the published widths (unipers/models/presets), on the meta device: shapes, dtypes,
saved tensors and FLOPs are exact, and nothing is computed, so the whole recipe takes seconds on a CPU.

* weights: parameter bytes at bf16 of one Chameleon decoder layer, the embedding + head, the VQ encoder,
  the SD1.5 UNet and VAE;
* activations: bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), with the
  frozen weights (and views of them) excluded, for one decoder layer at batch 1/2/4 and for the whole UNet;
  with gradient checkpointing a layer keeps only its input, and one layer's activations exist at a time
  while it is recomputed;
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward to the inputs (the base is
  frozen, so there are no weight gradients; checkpointing adds one more forward).

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


def unet(batch: int, text_len: int = GEN_LEN) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

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

    return {"params": sum(p.numel() for p in frozen), "params_vae": sum(p.numel() for p in vae.parameters()),
            "saved_bytes": _saved_bytes(forward, frozen), "flops_fwd_bwd": _flops(step), "flops_fwd": _flops(forward)}


def recipe(measured: dict, mfu: float) -> list[dict]:
    rest, rows = measured["ar_rest"], []
    weights = 2 * (rest["params_total_1_layer"] + (LAYERS - 1) * rest["params_layer"]
                   + measured["unet"]["1"]["params"] + measured["unet"]["1"]["params_vae"])
    for b in BATCHES:
        und, gen, u = measured["ar_und"][str(b)], measured["ar_gen"][str(b)], measured["unet"][str(b)]
        act_plain = LAYERS * (und["saved_bytes"] + gen["saved_bytes"]) + u["saved_bytes"]
        act_ckpt = (LAYERS * (und["input_bytes"] + gen["input_bytes"]) + und["saved_bytes"] + gen["saved_bytes"]
                    + u["saved_bytes"])
        flops_plain = LAYERS * (und["flops_fwd_bwd"] + gen["flops_fwd_bwd"]) + u["flops_fwd_bwd"]
        flops_ckpt = flops_plain + LAYERS * (und["flops_fwd"] + gen["flops_fwd"])
        row = {"batch": b, "weights_gb": weights / GB, "act_gb": act_plain / GB, "act_ckpt_gb": act_ckpt / GB,
               "unet_act_gb": u["saved_bytes"] / GB, "tflop_step": flops_plain / 1e12,
               "tflop_step_ckpt": flops_ckpt / 1e12, "gpus": {}}
        for name, gpu in GPUS.items():
            need, need_ckpt = (weights + act_plain) / GB + OVERHEAD_GB, (weights + act_ckpt) / GB + OVERHEAD_GB
            ckpt = need > gpu["memory_gb"]
            row["gpus"][name] = {
                "need_gb": need, "need_ckpt_gb": need_ckpt, "fits": need <= gpu["memory_gb"],
                "fits_ckpt": need_ckpt <= gpu["memory_gb"],
                "s_per_step": (flops_ckpt if ckpt else flops_plain) / (gpu["peak_tflops"] * 1e12 * mfu)}
        rows.append(row)
    return rows


def table(rows: list[dict], mfu: float) -> str:
    names = list(GPUS)
    head = ("| batch | weights bf16 | activations (no ckpt / ckpt; UNet part) | TFLOP per step (no ckpt / ckpt) | "
            + " | ".join(f"{n}: fits? s/step at {mfu:.0%} MFU" for n in names) + " |")
    lines = [head, "|" + "---|" * (4 + len(names))]
    for r in rows:
        cells = []
        for n in names:
            g = r["gpus"][n]
            fit = "yes" if g["fits"] else ("with ckpt" if g["fits_ckpt"] else "no")
            cells.append(f"{fit} ({g['need_gb']:.1f} / {g['need_ckpt_gb']:.1f} GB), {g['s_per_step']:.2f} s"
                         if fit != "no" else f"no ({g['need_ckpt_gb']:.1f} GB with ckpt)")
        lines.append(f"| {r['batch']} | {r['weights_gb']:.1f} GB | {r['act_gb']:.1f} / {r['act_ckpt_gb']:.1f} GB "
                     f"({r['unet_act_gb']:.1f}) | {r['tflop_step']:.1f} / {r['tflop_step_ckpt']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.30, help="model FLOPs utilisation for the time column")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "realshape.json"))
    args = parser.parse_args(argv)
    measured = {"ar_rest": ar_rest(),
                "ar_und": {str(b): ar_layer(b, UND_LEN) for b in BATCHES},
                "ar_gen": {str(b): ar_layer(b, GEN_LEN) for b in BATCHES},
                "unet": {str(b): unet(b) for b in BATCHES}}
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
