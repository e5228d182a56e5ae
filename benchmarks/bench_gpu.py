"""The real thing on a CUDA machine: a personalize step of Anole-7B (32 layers) + SD1.5 at real shapes.

    python benchmarks/bench_gpu.py [--layers 32] [--batch 1 2] [--steps 5] [--workdir /tmp/unipers-gpu]

Random weights at the published shapes are written by ``unipers.models.realshape`` (bf16, ~16 GB on disk)
and loaded through ``UnifiedModel.from_config``, the path a real checkpoint takes. A step is unipers'
objective on a synthetic batch: the understanding loss on sequences with one 512 px image (1,024 image
tokens) and a question/answer about ``<bo>``, plus the diffusion loss through the connector and the UNet at
64x64 latents, then AdamW on the concept rows. Reported per batch size, with and without the backbone's
gradient checkpointing: seconds per step, peak GPU memory (``torch.cuda.max_memory_allocated``), FLOPs
(``FlopCounterMode``) and MFU against ``--peak-tflops`` (default: looked up from the device name).

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without an install
    sys.path.insert(0, str(REPO))

# Dense bf16 peaks from vendor datasheets (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A6000": 155, "4090": 165, "A10": 125, "L4": 121}


def build(workdir: Path, layers: int) -> tuple[Path, Path]:
    from unipers.models.realshape import build_realshape_backbone, build_realshape_decoder

    backbone, decoder = workdir / f"anole-7b-{layers}", workdir / "sd15"
    if not (backbone / "config.json").is_file():
        build_realshape_backbone(backbone, "anole-7b", num_layers=layers)
    if not (decoder / "model_index.json").is_file():
        build_realshape_decoder(decoder, "sd15")
    return backbone, decoder


def step_once(model, opt, batch: dict):
    opt.zero_grad(set_to_none=True)
    und = model.understanding_loss(batch["ids"], batch["mask"], batch["labels"])
    dif = model.diffusion_loss(batch["gen_ids"], batch["gen_mask"], batch["latents"])
    (und + dif).backward()
    opt.step()


def make_batch(model, size: int, device) -> dict:
    import torch

    from unipers.models.padding import pad_batch

    bb = model.backbone
    image = torch.randint(0, len(bb.image_token_ids), (bb.image_seq_length,))
    qa = model.prompts.encode_qa("<image>Is <bo> in this photo?", "Yes, <bo> is in this photo.",
                                 images=[bb.image_token_ids[image].cpu()])
    ids, mask = pad_batch([qa.ids] * size, bb.tokenizer.pad_token_id)
    labels, _ = pad_batch([qa.labels] * size, 0, labels=True)
    gen_ids, gen_mask = model.encode_batch(["A photo of <bo> on a beach."] * size, mode="gen")
    d = model.decoder
    latents = torch.randn(size, d.latent_channels, d.latent_size, d.latent_size, device=device)
    return {"ids": ids.to(device), "mask": mask.to(device), "labels": labels.to(device), "gen_ids": gen_ids,
            "gen_mask": gen_mask, "latents": latents}


def measure(backbone: Path, decoder: Path, batch: int, checkpointing: bool, steps: int, peak: float) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel

    cfg = load_config([], [f"backbone.path={backbone}", f"decoder.path={decoder}", "backbone.dtype=bfloat16",
                           "decoder.dtype=bfloat16", f"backbone.gradient_checkpointing={str(checkpointing).lower()}"])
    device = torch.device("cuda")
    model = UnifiedModel.from_config(cfg).to(device)
    model.add_concept("bo", "dog")
    model.bank.to(device)
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    data = make_batch(model, batch, device)
    torch.cuda.reset_peak_memory_stats()
    try:
        step_once(model, opt, data)  # warm-up: kernels chosen, optimizer state allocated
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step_once(model, opt, data)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        counter = FlopCounterMode(display=False)
        with counter:
            step_once(model, opt, data)
        flops = counter.get_total_flops()
        result = {"batch": batch, "checkpointing": checkpointing, "s_per_step": seconds, "tflop_step": flops / 1e12,
                  "mfu": flops / seconds / (peak * 1e12), "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    except torch.cuda.OutOfMemoryError:
        result = {"batch": batch, "checkpointing": checkpointing, "oom": True,
                  "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    del model, opt, data
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--workdir", default=None, help="where the random checkpoints are built (kept)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured. On CPU, benchmarks/bench_realshape.py gives the "
              "recipe from shapes alone.")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"bench_gpu: unknown peak for {name!r}; pass --peak-tflops", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="unipers-gpu-"))
    t0 = time.perf_counter()
    backbone, decoder = build(workdir, args.layers)
    built = time.perf_counter() - t0
    rows = [measure(backbone, decoder, b, ckpt, args.steps, peak) for b in args.batch for ckpt in (True, False)]
    print(f"{name}, peak {peak} TFLOP/s bf16; Anole-7B with {args.layers} layers + SD1.5, built in {built:.0f} s\n")
    print("| batch | backbone checkpointing | s/step | TFLOP/step | MFU | peak GB |\n|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['batch']} | {r['checkpointing']} | out of memory | | | >{r['peak_gb']:.1f} |")
        else:
            print(f"| {r['batch']} | {r['checkpointing']} | {r['s_per_step']:.3f} | {r['tflop_step']:.1f} | "
                  f"{r['mfu']:.1%} | {r['peak_gb']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/bench_gpu.py " + " ".join(argv or sys.argv[1:]),
                               "device": name, "peak_tflops": peak, "layers": args.layers, "build_s": built,
                               "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
