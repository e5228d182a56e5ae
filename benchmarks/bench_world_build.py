"""The tiny world's two longest training loops, each beside the naive way (``unipers world build``).

    python benchmarks/bench_world_build.py               # both comparisons, about 3 min on 2 cores
    python benchmarks/bench_world_build.py --steps 10    # fewer timed steps per arm
    python benchmarks/bench_world_build.py --only align

1. **pretrain**: one AR pre-training step of the world's base (4 layers, 128 wide, vocab 1536, batch 32 of
   `world_example` texts with 16-token images), three ways:
   - *stock, re-tokenized*: ``ChameleonForConditionalGeneration.forward`` (LM head at every position,
     image logits masked) and `weighted_answer_loss`, every text piece tokenized again (before the
     ``PromptBuilder`` text cache);
   - *stock + text cache*: the same with the cache warm (world-v5's build);
   - *selected head + text cache*: the LM head run at the labelled positions only
     (``base.selected_answer_loss``: the same loss and gradients up to float rounding): what
     ``unipers world build`` runs since world-v6.
   Check: at the same weights the three losses agree to 1e-5.
2. **align**: one align step of the world's decoder (connector + every UNet block trained, batch 32 of
   32 px pairs) reading PNGs and encoding them with the frozen VAE every step, vs reading
   ``data.cache_latents``' file (encoded once): what ``unipers world build`` runs (the world's VAE gives
   the same bits in a cache chunk as in a batch, so the build's align ends where per-batch encoding
   ends). Check: at the same weights and noise the losses agree to 1e-4. The one-off encoding of the
   whole folder is reported beside it.

The weights are the world's seeded initial ones (their values do not change the cost). Step times are the
median and the fastest of the timed steps; the arms alternate A B C A B C, each step's batch the same in
every arm. Prints markdown tables and writes JSON (default benchmarks/results/world_build.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def _summary(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 1), "fastest_ms": round(min(times), 1), "steps": len(times)}


def bench_pretrain(root: Path, steps: int) -> dict:
    import torch
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.concepts.bank import ConceptBank
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.tiny import build_tiny_chameleon
    from unipers.models.padding import pad_batch
    from unipers.world import base, tokenizer
    from unipers.world.build import RECIPE, demo_object, training_photos, world_corpus

    build_tiny_chameleon(root / "backbone", seed=0, corpus=world_corpus(), **RECIPE.backbone)
    model = ChameleonForConditionalGeneration.from_pretrained(root / "backbone", local_files_only=True)
    processor = AutoProcessor.from_pretrained(root / "backbone", local_files_only=True)
    objects, images = training_photos(0)
    objects, images = objects[:256], images[:256]
    tokens = tokenizer.image_tokens(model, tokenizer.to_pixels(images, processor.image_processor))
    bank = ConceptBank(model.config.vocab_size, model.config.hidden_size)

    def builder():
        return PromptBuilder(processor.tokenizer, bank, boi_id=processor.image_start_token_id,
                             eoi_id=processor.image_end_token_id)

    uncached = builder()
    rng = random.Random(0)
    examples = [[(i, base.world_example(objects[i], rng, [demo_object()]))
                 for i in (rng.randrange(len(objects)) for _ in range(32))] for _ in range(steps + 1)]
    params = [p for n, p in model.named_parameters() if ".vqmodel." not in f".{n}"]
    for p in params:
        p.requires_grad_(True)
    model.train()
    pad = processor.tokenizer.pad_token_id
    cached = builder()
    for batch in examples:  # warm the text cache once over every batch (training sees each template often)
        for i, ex in batch:
            base.encode_example(cached, ex, tokens[i])

    def batch_tensors(prompts, batch):
        if prompts is uncached:
            uncached._text_ids.clear()  # every piece tokenized again, as before the cache
        seqs, labs = zip(*(base.encode_example(prompts, ex, tokens[i]) for i, ex in batch))
        ids, mask = pad_batch(seqs, pad)
        return ids, mask, pad_batch(labs, pad, labels=True)[0]

    def stock(prompts):
        def loss(batch):
            ids, mask, labels = batch_tensors(prompts, batch)
            return base.weighted_answer_loss(model(input_ids=ids, attention_mask=mask).logits, labels, 5.0, 20.0)
        return loss

    def selected_cached(batch):
        ids, mask, labels = batch_tensors(cached, batch)
        return base.selected_answer_loss(model, ids, mask, labels, 5.0, 20.0)

    arms = {"stock forward, re-tokenized": stock(uncached), "stock forward + text cache": stock(cached),
            "selected head + text cache (the build)": selected_cached}
    with torch.no_grad():
        losses = {name: fn(examples[0]).item() for name, fn in arms.items()}
    ref = losses["stock forward, re-tokenized"]
    if any(abs(v - ref) > 1e-5 * max(1.0, abs(ref)) for v in losses.values()):
        raise SystemExit(f"pretrain: the arms' losses differ at the same weights: {losses}")
    times: dict[str, list[float]] = {name: [] for name in arms}
    lengths = []
    for batch in examples[1:]:
        lengths.append(max(len(base.encode_example(cached, ex, tokens[i])[0]) for i, ex in batch))
        for name, fn in arms.items():
            def step():
                model.zero_grad(set_to_none=True)
                fn(batch).backward()
            times[name].append(_timed(step))
    return {"batch_size": 32, "seq_len_median": statistics.median(lengths), "loss_at_same_weights": losses,
            "arms": {name: _summary(t) for name, t in times.items()}}


def bench_align(root: Path, steps: int) -> dict:
    import shutil

    import torch
    from PIL import Image

    from unipers.config import load_config
    from unipers.data.collate import latent_cache
    from unipers.data.pairs import CaptionFolderDataset, build_align_data
    from unipers.models.tiny import build_tiny_chameleon
    from unipers.models.tiny_decoder import build_tiny_decoder
    from unipers.models.unified import UnifiedModel
    from unipers.training.align import AlignModule
    from unipers.world.build import RECIPE, align_caption, training_photos, world_corpus

    if not (root / "backbone" / "config.json").is_file():
        build_tiny_chameleon(root / "backbone", seed=0, corpus=world_corpus(), **RECIPE.backbone)
    build_tiny_decoder(root / "decoder", seed=0, **RECIPE.decoder)
    objects, images = training_photos(0)
    n = 32 * (steps + 1)
    pairs = root / "pairs"
    (pairs / "images").mkdir(parents=True)
    rng = random.Random(0)
    with open(pairs / "captions.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(images[i]).save(pairs / "images" / f"{i:05d}.png")
            f.write(json.dumps({"image": f"images/{i:05d}.png", "caption": align_caption(objects[i], rng)}) + "\n")
    cfg = load_config(["world"], [
        f"backbone.path={root / 'backbone'}", f"decoder.path={root / 'decoder'}", "connector.path=null"])
    model = UnifiedModel.from_config(cfg)
    blocks = [name for name, m in model.decoder.unet.named_children() if any(True for _ in m.parameters())]
    module = AlignModule(model, lr=1e-3, weight_decay=0.0, warmup_steps=1, max_steps=steps, train_decoder="blocks",
                         unfreeze_blocks=tuple(blocks), caption_dropout=0.1, seed=0)
    paths = CaptionFolderDataset(pairs, pairs / "captions.jsonl", model.decoder.image_size).image_paths
    t = time.perf_counter()
    latents = latent_cache(model, paths, root=pairs)
    encode_once = time.perf_counter() - t
    loaders = {
        "PNG + VAE every step": build_align_data("folder", pairs, image_size=model.decoder.image_size, batch_size=32,
                                                 rank=0, world_size=1),
        "cached latents": build_align_data("folder", pairs, image_size=model.decoder.image_size, batch_size=32,
                                           rank=0, world_size=1, latents=latents),
    }
    iters = {name: iter(loader) for name, loader in loaders.items()}
    with torch.no_grad():
        first = {name: module.shared_step(next(it), torch.Generator().manual_seed(0)).item() for name, it in iters.items()}
    a, b = first.values()
    if abs(a - b) > 1e-4 * max(1.0, abs(a)):
        raise SystemExit(f"align: the arms' losses differ at the same weights: {first}")
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for k in range(steps):
        for name, it in iters.items():
            def step():
                batch = next(it)
                module.zero_grad(set_to_none=True)
                module.shared_step(batch, torch.Generator().manual_seed(k + 1)).backward()
            times[name].append(_timed(step))
    shutil.rmtree(pairs)
    return {"batch_size": 32, "images": n, "loss_at_same_weights": first,
            "encode_whole_folder_once_s": round(encode_once, 2),
            "arms": {name: _summary(t) for name, t in times.items()}}


def table(title: str, result: dict) -> str:
    arms = result["arms"]
    base = next(iter(arms.values()))["median_ms"]
    lines = [f"### {title}", "", "| arm | step (ms, median) | fastest (ms) | x step time |", "|---|---:|---:|---:|"]
    for name, r in arms.items():
        lines.append(f"| {name} | {r['median_ms']} | {r['fastest_ms']} | {r['median_ms'] / base:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--only", choices=["pretrain", "align"], default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "world_build.json"))
    args = parser.parse_args()
    import torch

    results = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "pretrain"):
            results["pretrain"] = bench_pretrain(Path(tmp), args.steps)
            print(table(f"AR pre-training step (batch 32, median length {results['pretrain']['seq_len_median']})",
                        results["pretrain"]))
        if args.only in (None, "align"):
            results["align"] = bench_align(Path(tmp), args.steps)
            print(table("Align step (batch 32, connector + every UNet block)", results["align"]))
            print(f"Encoding the {results['align']['images']} images once: "
                  f"{results['align']['encode_whole_folder_once_s']} s\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
