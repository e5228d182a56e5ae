"""Training data path: dynamic padding, cached image tokens, many concepts per run (tiny and medium CPU models).

    python benchmarks/bench_training.py                 # full run, tiny + medium, ~6.5 min on 2 cores
    python benchmarks/bench_training.py --quick         # smoke run: tiny only, N=2, one repeat, < 60 s
    python benchmarks/bench_training.py --configs medium --repeats 3 --out /tmp/training.json
    python benchmarks/bench_training.py --threads 0     # torch's default thread count in the workers
    python benchmarks/bench_training.py --keep /tmp/bt  # build models and data there and keep them

Three comparisons, each on two random Chameleons written by ``build_tiny_chameleon`` into a temporary folder
and loaded through ``UnifiedModel.from_config`` (so through ``ARBackbone.from_pretrained``):

- **tiny**: the embedded default (hidden 64, 2 layers, 4 heads, vocab 1024, 128 image codes, 32 px images
  -> 64 image tokens, max_position_embeddings 1024).
- **medium**: hidden 512, 4 layers, 8 heads, vocab 8192, 1024 image codes, 64 px images -> 256 image tokens;
  max_position_embeddings raised from the builder's 1024 to 2048 in config.json so pad-to-1500 is not clamped.

Data: four concepts prepared with ``prepare_concept`` from synthetic photos (8 each, 4 facts each); batches of
4 from ``ConceptDataModule`` (recognition questions with one image each : text-only QA = 3 : 1, concepts
mixed), collated by the ``Collator`` (answer-only labels, dynamic padding). The trainable tensors are the
concept rows only (AdamW, lr 1e-3, weight decay 0.01); a step is forward + backward + optimizer step of
``understanding_loss``.

1. **padding**: the same batches padded to the batch's longest (unipers) vs to 1500 (Yo'Chameleon pads every
   sequence to 1500), with attention_mask; clamped to max_position_embeddings when smaller (tiny: 1024).
   Each arm runs in its own subprocess (peak RSS = VmHWM after resetting it once the model and batches are
   built, minus RSS at that point). Check: step-0 losses of the two arms (identical parameters) agree to
   1e-5, later steps are reported, and the padded worker recomputes batch 0 both ways at the same
   parameters and compares losses (1e-5) and concept-row gradients.
2. **image tokens**: per step, VQ-encode the batch's images again (``backbone.encode_images`` on the
   processor's pixel values, prepared beforehand) vs look them up (``backbone.image_tokens(pixels, keys)``
   after a warm-up). Both arms train from the same initial rows in one process, alternating A B A B. Check:
   cached tokens == re-encoded tokens and the arms' losses are identical. The cost of decoding the PNG and
   running the image processor (per image, measured once) is reported beside it: a data path that re-reads
   images pays that too.
3. **N concepts**: one process that loads the base once, adds N=4 concepts and trains them together for S
   steps on mixed batches, vs N processes that each import, load the base, add one concept and train it for
   S/N steps (same batch size: the same number of optimizer-sample visits per concept in total). Wall time
   is measured by the parent from spawn to exit and includes imports, model load, the DataModule (image
   tokens from the warm on-disk cache), training and saving the concept file. Check: base weights unchanged,
   every concept's rows moved, visit counts add up.

Timing: every worker runs torch with one thread (``--threads``; on this shared 2-core box, two OpenMP
threads made steps up to 10x slower, erratically, whenever another process was running). Step times are
medians over the timed steps of all repeats (the first step of each pass is a warm-up); the tables also give
the step's CPU time (``time.process_time``), which other processes on the machine barely disturb.

Prints a markdown table per comparison and writes JSON (default benchmarks/results/training.json, or
training_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_T_PROCESS = time.time()  # before any heavy import: the N-concepts workers report import time from here

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONCEPTS = (("bo", "dog"), ("mam", "cat"), ("kiki", "mug"), ("toro", "toy"))
COLOURS = ((200, 120, 40), (40, 80, 200), (30, 160, 60), (180, 40, 150))
TASK_WEIGHTS = {"recognition": 0.75, "qa": 0.25}
YOCHAMELEON_LENGTH = 1500
REAL_IMAGE_TOKENS = 1024  # Chameleon-7B/Anole: 512 px -> 32 x 32 VQ tokens
LR, WEIGHT_DECAY, SEED = 1e-3, 0.01, 0
LOSS_TOL = 1e-5
TRAJECTORY_TOL = 1e-4
MiB = 1024**2
THREADS = 0  # torch threads in the workers; 0 = torch's default

CONFIGS = {
    "tiny": {},  # build_tiny_chameleon defaults
    "medium": dict(hidden_size=512, num_layers=4, num_heads=8, vocab_size=8192, num_image_tokens=1024, image_size=64),
}
MEDIUM_MAX_POSITIONS = 2048

# Steps per arm (the first of each pass is a warm-up and not timed), repeats, batch size.
FULL = {
    "batch_size": 4, "repeats": 2,
    "padding_steps": {"tiny": 12, "medium": 4},
    "cache_steps": {"tiny": 12, "medium": 6},
    "multi_steps": {"tiny": 48, "medium": 16}, "n_concepts": 4,
}
QUICK = {
    "batch_size": 4, "repeats": 1,
    "padding_steps": {"tiny": 4, "medium": 3},
    "cache_steps": {"tiny": 4, "medium": 3},
    "multi_steps": {"tiny": 8, "medium": 8}, "n_concepts": 2,
}


from _memory import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402  (benchmarks/ is on sys.path)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---- setup: models and prepared concepts ----------------------------------------------------------------
def build_world(root: Path, configs: list[str]) -> dict:
    """Backbones (one per config), the tiny decoder, four prepared concepts; warm the image-token caches."""
    import torch
    from PIL import Image

    from unipers.data.prepare import prepare_concept
    from unipers.models.tiny import build_tiny_chameleon
    from unipers.models.tiny_decoder import build_tiny_decoder

    world = {"root": str(root), "backbones": {}, "folders": []}
    for name in configs:
        out = root / name
        if not (out / "config.json").is_file():
            build_tiny_chameleon(out, **CONFIGS[name], seed=SEED)
            if name == "medium":
                cfg = json.loads((out / "config.json").read_text())
                cfg["max_position_embeddings"] = MEDIUM_MAX_POSITIONS
                (out / "config.json").write_text(json.dumps(cfg, indent=2))
        world["backbones"][name] = str(out)
    dec = root / "decoder"
    if not (dec / "model_index.json").is_file():
        build_tiny_decoder(dec, cross_attention_dim=64, pooled_dim=64, seed=SEED)
    world["decoder"] = str(dec)

    for (name, word), colour in zip(CONCEPTS, COLOURS):
        folder = root / "data" / name
        if not (folder / "manifest.jsonl").is_file():
            photos = root / "photos" / name
            photos.mkdir(parents=True, exist_ok=True)
            for i in range(8):
                im = Image.new("RGB", (96 + 8 * i, 96), colour)
                im.paste((255 - i * 30, 20 * i, 128), (10 + 5 * i, 20, 50 + 5 * i, 70))
                im.save(photos / f"p{i}.png")
            facts = root / "photos" / f"{name}_facts.txt"
            facts.write_text(f"<{name}> is a {word}.\n<{name}> is 3 years old.\n<{name}> likes the garden.\n"
                             f"<{name}> has a red collar and sleeps on the sofa near the window.\n")
            prepare_concept(photos, name, folder, class_word=word, facts=facts, seed=SEED,
                            options=_quiet_options())
        world["folders"].append(str(folder))

    # Warm the DataModule's on-disk image-token cache for every backbone, so all arms read it the same way.
    torch.manual_seed(SEED)
    for name in configs:
        model = load_model(world, name)
        for c, w in CONCEPTS:
            model.add_concept(c, w)
        datamodule(world, model, 4, 4)
        del model
        gc.collect()
    return world


def _quiet_options():
    from unipers.data.prepare import PrepareOptions

    return PrepareOptions(quiet=True)


def load_model(world: dict, config: str):
    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel

    cfg = load_config([], [f"backbone.path={world['backbones'][config]}", f"decoder.path={world['decoder']}",
                           f"seed={SEED}"])
    return UnifiedModel.from_config(cfg)


def datamodule(world: dict, model, batch_size: int, num_batches: int, folders=None):
    from unipers.data.datamodule import ConceptDataModule

    dm = ConceptDataModule(folders or world["folders"], batch_size=batch_size, seed=SEED, task_weights=TASK_WEIGHTS,
                           samples_per_epoch=batch_size * num_batches)
    dm.attach(model)
    return dm


def train_step(model, opt, und) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model.understanding_loss(und["ids"], und["attention_mask"], und["labels"])
    loss.backward()
    opt.step()
    return loss.item()


def pad_to(und: dict, length: int, pad_id: int) -> dict:
    import torch.nn.functional as F

    extra = length - und["ids"].shape[1]
    if extra < 0:
        raise ValueError(f"a batch of length {und['ids'].shape[1]} does not fit in {length}")
    return {**und, "ids": F.pad(und["ids"], (0, extra), value=pad_id),
            "attention_mask": F.pad(und["attention_mask"], (0, extra), value=0),
            "labels": F.pad(und["labels"], (0, extra), value=-100)}


def optimizer(model):
    import torch

    return torch.optim.AdamW(model.trainable_parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


# ---- worker 1: one padding arm -------------------------------------------------------------------------
def worker_padding(spec: dict) -> dict:
    import torch

    torch.manual_seed(SEED)
    world, arm, steps, B = spec["world"], spec["arm"], spec["steps"], spec["batch_size"]
    model = load_model(world, spec["config"])
    for c, w in CONCEPTS:
        model.add_concept(c, w)
    bb = model.backbone
    pad_id = bb.tokenizer.pad_token_id
    max_pos = bb.model.config.max_position_embeddings
    target = min(YOCHAMELEON_LENGTH, max_pos)
    dm = datamodule(world, model, B, steps)
    dynamic = [b["und"] for b, _ in zip(dm.train_dataloader(), range(steps))]
    batches = dynamic if arm == "dynamic" else [pad_to(b, target, pad_id) for b in dynamic]

    # Token accounting, and what the same batches would be with Chameleon-7B's 1024-token images.
    n_img = [(b["ids"] == bb.boi_id).sum(1) for b in dynamic]
    real_lens = [b["attention_mask"].sum(1) for b in dynamic]
    at_1024 = [int((r + k * (REAL_IMAGE_TOKENS - bb.image_seq_length)).max()) * B for r, k in zip(real_lens, n_img)]

    opt = optimizer(model)
    gc.collect()
    rss0 = rss_bytes()
    hwm_ok = reset_hwm()
    losses, times, cpu = [], [], []
    for und in batches:
        t, c = time.perf_counter(), time.process_time()
        losses.append(train_step(model, opt, und))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = hwm_bytes()
    out = {
        "arm": arm, "config": spec["config"], "pad_target": target if arm == "padded" else None,
        "max_position_embeddings": max_pos, "clamped": arm == "padded" and target < YOCHAMELEON_LENGTH,
        "losses": losses, "step_s": times, "step_s_median": median(times[1:]), "cpu_s": cpu,
        "seq_len": [b["ids"].shape[1] for b in batches],
        "tokens_per_step": [int(b["ids"].numel()) for b in batches],
        "real_tokens_per_step": [int(r.sum()) for r in real_lens],
        "images_per_step": [int(k.sum()) for k in n_img],
        "tokens_per_step_dynamic_at_1024_image_tokens": at_1024,
        "rss_before_mib": rss0 / MiB, "peak_rss_mib": peak / MiB, "peak_rss_delta_mib": (peak - rss0) / MiB,
        "hwm_reset": hwm_ok, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    if arm == "padded" and spec.get("check", True):
        # Same parameters, batch 0 both ways: losses and concept-row gradients must agree.
        params = model.trainable_parameters()
        grads = {}
        for name, und in (("dynamic", dynamic[0]), ("padded", batches[0])):
            for p in params:
                p.grad = None
            loss = model.understanding_loss(und["ids"], und["attention_mask"], und["labels"])
            loss.backward()
            grads[name] = (loss.item(), [None if p.grad is None else p.grad.clone() for p in params])
        (ld, gd), (lp, gp) = grads["dynamic"], grads["padded"]
        if [g is None for g in gd] != [g is None for g in gp]:
            raise AssertionError("padded and dynamic batches reached different concept parameters")
        gdiff = max((float((a - b).abs().max()) for a, b in zip(gd, gp) if a is not None), default=0.0)
        gscale = max((float(a.abs().max()) for a in gd if a is not None), default=0.0)
        out["check"] = {"loss_dynamic": ld, "loss_padded": lp, "loss_abs_diff": abs(ld - lp),
                        "grad_max_abs_diff": gdiff, "grad_max_abs": gscale}
        if abs(ld - lp) > LOSS_TOL:
            raise AssertionError(f"padded loss {lp} != dynamic loss {ld} (diff {abs(ld - lp):.2e} > {LOSS_TOL})")
    return out


# ---- worker 2: cached vs re-encoded image tokens ------------------------------------------------------
def worker_cache(spec: dict) -> dict:
    import torch

    from unipers.data.collate import Collator, UNDERSTANDING_TASKS, _load_rgb

    torch.manual_seed(SEED)
    world, steps, B, repeats = spec["world"], spec["steps"], spec["batch_size"], spec["repeats"]
    model = load_model(world, spec["config"])
    for c, w in CONCEPTS:
        model.add_concept(c, w)
    bb = model.backbone
    dm = datamodule(world, model, B, steps)
    indices = list(dm._sampler())[: steps * B]
    records = [dm.train_records[i] for i in indices]
    batches = [records[i:i + B] for i in range(0, len(records), B)]
    assert all(r.sample.task in UNDERSTANDING_TASKS for r in records)

    keys = sorted({r.image_key for r in records if r.image_key})
    pixels, prep_s = {}, []
    for k in keys:  # PNG decode + ChameleonImageProcessor, once per image (timed, reported separately)
        t = time.perf_counter()
        pixels[k] = bb.processor.image_processor(images=[_load_rgb(k)], return_tensors="pt").pixel_values[0]
        prep_s.append(time.perf_counter() - t)
    per_batch = []
    for recs in batches:
        ks = [r.image_key for r in recs if r.image_key]
        per_batch.append((ks, torch.stack([pixels[k] for k in ks]) if ks else None))

    init = {k: v.clone() for k, v in model.bank.state_dict().items()}
    pad_id = bb.tokenizer.pad_token_id
    reference: list = []

    def run(arm: str) -> dict:
        model.bank.load_state_dict(init)
        opt = optimizer(model)
        bb._image_cache.clear()
        if arm == "cached":
            bb.image_tokens(torch.stack([pixels[k] for k in keys]), keys)  # warm-up, untimed
        losses, step_s, enc_s, cpu_s = [], [], [], []
        for i, (recs, (ks, px)) in enumerate(zip(batches, per_batch)):
            c0 = time.process_time()
            t0 = time.perf_counter()
            if px is None:
                tokens = None
            elif arm == "reencode":
                tokens = bb.encode_images(px)
            else:
                tokens = bb.image_tokens(px, ks)
            t1 = time.perf_counter()
            und = Collator(model.prompts, pad_id, dict(zip(ks, tokens)) if ks else {}, {})(recs)["und"]
            losses.append(train_step(model, opt, und))
            t2 = time.perf_counter()
            cpu_s.append(time.process_time() - c0)
            step_s.append(t2 - t0)
            enc_s.append(t1 - t0)
            if tokens is not None:
                if len(reference) <= i:
                    reference.append(tokens.clone())
                elif not torch.equal(reference[i], tokens):
                    raise AssertionError(f"batch {i}: cached image tokens differ from re-encoded ones")
        return {"losses": losses, "step_s": step_s, "encode_s": enc_s, "cpu_s": cpu_s}

    passes = {"reencode": [], "cached": []}
    for _ in range(repeats):
        for arm in ("reencode", "cached"):
            passes[arm].append(run(arm))
    ref_losses = passes["reencode"][0]["losses"]
    loss_diff = max(abs(a - b) for p in passes["reencode"] + passes["cached"] for a, b in zip(p["losses"], ref_losses))
    if loss_diff > LOSS_TOL:
        raise AssertionError(f"cached and re-encoded arms gave different losses (max diff {loss_diff:.2e})")
    out = {"config": spec["config"], "images_per_step": [len(ks) for ks, _ in per_batch],
           "image_seq_length": bb.image_seq_length, "prep_s_per_image_median": median(prep_s),
           "loss_max_abs_diff": loss_diff, "tokens_equal": True}
    for arm, runs in passes.items():
        steps_s = [s for r in runs for s in r["step_s"][1:]]
        enc = [e for r in runs for e in r["encode_s"][1:]]
        share = [e / s for r in runs for e, s in zip(r["encode_s"][1:], r["step_s"][1:])]
        out[arm] = {"step_s_median": median(steps_s), "encode_s_median": median(enc),
                    "cpu_s_median": median([c for r in runs for c in r["cpu_s"][1:]]),
                    "encode_share_median": median(share), "passes": runs}
    return out


# ---- worker 3: one training run (N concepts, or one of N) ---------------------------------------------
def worker_run(spec: dict) -> dict:
    t_imp0 = time.time()
    import torch

    from unipers.data.datamodule import ConceptDataModule  # noqa: F401  (import cost belongs to the run)
    from unipers.models.unified import UnifiedModel  # noqa: F401

    t_imported = time.time()
    torch.manual_seed(SEED)
    world, steps, B = spec["world"], spec["steps"], spec["batch_size"]
    names = spec["concepts"]
    model = load_model(world, spec["config"])
    for c, w in CONCEPTS:
        if c in names:
            model.add_concept(c, w)
    t_loaded = time.time()
    folders = [f for f in world["folders"] if Path(f).name in names]
    dm = datamodule(world, model, B, steps, folders=folders)
    loader = dm.train_dataloader()
    t_attached = time.time()

    embed_before = model.backbone.model.get_input_embeddings().weight.clone()
    rows_before = {k: v.clone() for k, v in model.bank.state_dict().items()}
    opt = optimizer(model)
    visits = {c: 0 for c in names}
    losses, step_s, n = [], [], 0
    for batch in loader:
        for c in batch["concepts"]:
            visits[c] += 1
        t = time.perf_counter()
        losses.append(train_step(model, opt, batch["und"]))
        step_s.append(time.perf_counter() - t)
        n += 1
    t_trained = time.time()
    path = model.save_concepts(Path(spec["save_dir"]) / f"{'-'.join(names)}.safetensors")
    t_saved = time.time()

    if n != steps or sum(visits.values()) != steps * B:
        raise AssertionError(f"ran {n} steps / {sum(visits.values())} samples, expected {steps} / {steps * B}")
    if not torch.equal(embed_before, model.backbone.model.get_input_embeddings().weight):
        raise AssertionError("the frozen base embedding changed")
    after = model.bank.state_dict()
    moved = {c: any(not torch.equal(v, after[k]) for k, v in rows_before.items() if k.startswith(f"rows.{c}."))
             for c in names}
    if not all(moved[c] for c in names if visits[c]):
        raise AssertionError(f"a trained concept's rows did not move: {moved}")
    return {"concepts": names, "steps": steps, "visits": visits, "losses": losses, "step_s": step_s, "file": str(path),
            "t_process": _T_PROCESS, "t_imports_start": t_imp0, "t_imported": t_imported, "t_loaded": t_loaded,
            "t_attached": t_attached, "t_trained": t_trained, "t_saved": t_saved}


WORKERS = {"padding": worker_padding, "cache": worker_cache, "run": worker_run}


# ---- parent -----------------------------------------------------------------------------------------------
def spawn(mode: str, spec: dict, tmp: Path) -> tuple[dict, float, float]:
    """Run one worker in a fresh Python process: (its result, wall seconds spawn->exit, spawn time)."""
    tag = f"{mode}-{spec.get('config')}-{spec.get('arm', '')}-{time.monotonic_ns()}"
    spec_file, result_file = tmp / f"{tag}.spec.json", tmp / f"{tag}.result.json"
    spec_file.write_text(json.dumps({**spec, "mode": mode, "threads": THREADS}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    t_spawn = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file),
                           "--result", str(result_file)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {tag} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text()), wall, t_spawn


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_padding(world, configs, plan, tmp) -> dict:
    out = {}
    for config in configs:
        runs = {"dynamic": [], "padded": []}
        for r in range(plan["repeats"]):
            order = ("dynamic", "padded") if r % 2 == 0 else ("padded", "dynamic")
            for arm in order:
                spec = {"world": world, "config": config, "arm": arm, "steps": plan["padding_steps"][config],
                        "batch_size": plan["batch_size"], "check": r == 0}
                res, wall, _ = spawn("padding", spec, tmp)
                runs[arm].append(res)
                log(f"  padding/{config}/{arm}: {1e3 * res['step_s_median']:.0f} ms/step, "
                    f"peak dRSS {res['peak_rss_delta_mib']:.0f} MiB ({wall:.0f} s)")
        dyn, pad = runs["dynamic"], runs["padded"]
        if dyn[0]["real_tokens_per_step"] != pad[0]["real_tokens_per_step"]:
            raise AssertionError("the two arms did not see the same batches")
        step0 = abs(dyn[0]["losses"][0] - pad[0]["losses"][0])
        if step0 > LOSS_TOL:
            raise AssertionError(f"{config}: step-0 loss differs between arms by {step0:.2e}")
        all_diff = max(abs(a - b) for d in dyn for p in pad for a, b in zip(d["losses"], p["losses"]))
        if all_diff > TRAJECTORY_TOL:  # after step 0 the parameters may differ by rounding, which Adam can amplify
            raise AssertionError(f"{config}: loss trajectories of the two arms differ by {all_diff:.2e}")
        summary = {}
        for arm, rs in runs.items():
            summary[arm] = {
                "step_s_median": median([t for x in rs for t in x["step_s"][1:]]),
                "cpu_s_median": median([t for x in rs for t in x["cpu_s"][1:]]),
                "peak_rss_delta_mib_median": median([x["peak_rss_delta_mib"] for x in rs]),
                "tokens_per_step_mean": statistics.mean(rs[0]["tokens_per_step"]),
                "real_tokens_per_step_mean": statistics.mean(rs[0]["real_tokens_per_step"]),
                "seq_len_median": median(rs[0]["seq_len"]),
            }
        summary["ratio"] = {k: summary["padded"][k] / summary["dynamic"][k]
                            for k in ("step_s_median", "cpu_s_median", "peak_rss_delta_mib_median",
                                      "tokens_per_step_mean")}
        real = dyn[0]["tokens_per_step_dynamic_at_1024_image_tokens"]
        summary["chameleon_1024_image_tokens"] = {
            "dynamic_tokens_per_step_mean": statistics.mean(real),
            "padded_tokens_per_step": YOCHAMELEON_LENGTH * plan["batch_size"],
            "ratio": YOCHAMELEON_LENGTH * plan["batch_size"] / statistics.mean(real)}
        summary["check"] = {"step0_loss_abs_diff": step0, "all_steps_loss_max_abs_diff": all_diff,
                            **pad[0].get("check", {})}
        summary["pad_target"] = pad[0]["pad_target"]
        summary["clamped"] = pad[0]["clamped"]
        summary["max_position_embeddings"] = pad[0]["max_position_embeddings"]
        out[config] = {"summary": summary, "runs": runs}
    return out


def bench_cache(world, configs, plan, tmp) -> dict:
    out = {}
    for config in configs:
        spec = {"world": world, "config": config, "steps": plan["cache_steps"][config],
                "batch_size": plan["batch_size"], "repeats": plan["repeats"]}
        res, wall, _ = spawn("cache", spec, tmp)
        res["ratio_step_s"] = res["reencode"]["step_s_median"] / res["cached"]["step_s_median"]
        out[config] = res
        log(f"  cache/{config}: re-encode {1e3 * res['reencode']['step_s_median']:.1f} ms, cached "
            f"{1e3 * res['cached']['step_s_median']:.1f} ms ({wall:.0f} s)")
    return out


def bench_multi(world, configs, plan, tmp) -> dict:
    out = {}
    names = [c for c, _ in CONCEPTS][: plan["n_concepts"]]
    N = len(names)
    for config in configs:
        S, B = plan["multi_steps"][config], plan["batch_size"]
        if S % N:
            raise ValueError(f"multi steps {S} must be a multiple of N={N}")
        base = {"world": world, "config": config, "batch_size": B, "save_dir": str(tmp / "concepts")}
        arms = {}
        for r in range(plan["repeats"]):
            order = ("joint", "separate") if r % 2 == 0 else ("separate", "joint")
            for arm in order:
                jobs = [names] if arm == "joint" else [[c] for c in names]
                steps = S if arm == "joint" else S // N
                procs, total = [], 0.0
                for concepts in jobs:
                    res, wall, t_spawn = spawn("run", {**base, "concepts": concepts, "steps": steps}, tmp)
                    res["wall_s"] = wall
                    res["startup_import_s"] = res["t_imported"] - t_spawn
                    res["load_s"] = res["t_loaded"] - res["t_imported"]
                    res["data_s"] = res["t_attached"] - res["t_loaded"]
                    res["train_s"] = res["t_trained"] - res["t_attached"]
                    res["save_s"] = res["t_saved"] - res["t_trained"]
                    res["save_exit_s"] = wall - (res["t_trained"] - t_spawn)
                    procs.append(res)
                    total += wall
                visits = {c: sum(p["visits"].get(c, 0) for p in procs) for c in names}
                arms.setdefault(arm, []).append({
                    "wall_s": total, "processes": len(procs), "visits": visits,
                    "overhead_s": sum(p["wall_s"] - p["train_s"] for p in procs),
                    "train_s": sum(p["train_s"] for p in procs), "procs": procs})
                log(f"  multi/{config}/{arm}: {total:.1f} s wall, {arms[arm][-1]['train_s']:.1f} s training")
        summary = {}
        for arm, rs in arms.items():
            wall = median([x["wall_s"] for x in rs])
            summary[arm] = {"wall_s_median": wall, "overhead_s_median": median([x["overhead_s"] for x in rs]),
                            "train_s_median": median([x["train_s"] for x in rs]), "processes": rs[0]["processes"],
                            "steps_per_process": S if arm == "joint" else S // N,
                            "visits": rs[0]["visits"], "samples_per_s": S * B / wall,
                            "samples_per_s_per_concept": S * B / N / wall}
        summary["ratio_wall"] = summary["separate"]["wall_s_median"] / summary["joint"]["wall_s_median"]
        summary["N"], summary["S"], summary["batch_size"] = N, S, B
        out[config] = {"summary": summary, "runs": arms}
    return out


# ---- tables -----------------------------------------------------------------------------------------------
def table_padding(res: dict, B: int) -> str:
    lines = ["| config | arm | seq len (median) | tokens/step | real tokens/step | step (ms, median) | "
             "step CPU (ms) | peak RSS Δ (MiB) | × tokens | × step time | × memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for config, r in res.items():
        s = r["summary"]
        for arm in ("dynamic", "padded"):
            a = s[arm]
            label = "dynamic (batch's longest)" if arm == "dynamic" else (
                f"pad to {s['pad_target']}" + (" (clamped from 1500)" if s["clamped"] else ""))
            rt = f"{s['ratio']['step_s_median']:.2f}" if arm == "padded" else "1.00"
            rm = f"{s['ratio']['peak_rss_delta_mib_median']:.2f}" if arm == "padded" else "1.00"
            rk = f"{s['ratio']['tokens_per_step_mean']:.2f}" if arm == "padded" else "1.00"
            lines.append(f"| {config} | {label} | {a['seq_len_median']:.0f} | {a['tokens_per_step_mean']:.0f} | "
                         f"{a['real_tokens_per_step_mean']:.0f} | {1e3 * a['step_s_median']:.1f} | "
                         f"{1e3 * a['cpu_s_median']:.1f} | "
                         f"{a['peak_rss_delta_mib_median']:.1f} | {rk} | {rt} | {rm} |")
        c, ch = s["check"], s["chameleon_1024_image_tokens"]
        notes.append(f"- {config}: loss |dynamic − padded| at step 0 = {c['step0_loss_abs_diff']:.1e}, over all "
                     f"steps ≤ {c['all_steps_loss_max_abs_diff']:.1e}; same-parameter recheck of batch 0: loss diff "
                     f"{c.get('loss_abs_diff', float('nan')):.1e}, concept-row grad max diff "
                     f"{c.get('grad_max_abs_diff', float('nan')):.1e} (grad max {c.get('grad_max_abs', float('nan')):.1e})"
                     f"; max_position_embeddings = {s['max_position_embeddings']}. With Chameleon-7B's 1024-token "
                     f"images the same batches would be {ch['dynamic_tokens_per_step_mean']:.0f} tokens/step dynamic "
                     f"vs {ch['padded_tokens_per_step']} padded (×{ch['ratio']:.2f}).")
    return "\n".join(lines + [""] + notes)


def table_cache(res: dict) -> str:
    lines = ["| config | arm | images/step | step (ms, median) | step CPU (ms) | encode (ms/step) | encode share | "
             "× step time | PNG decode + processor (ms/step, not in step) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for config, r in res.items():
        ips = statistics.mean(r["images_per_step"])
        for arm, label in (("cached", "cached tokens (lookup)"), ("reencode", "re-encode (VQ every step)")):
            a = r[arm]
            ratio = f"{r['ratio_step_s']:.2f}" if arm == "reencode" else "1.00"
            prep = f"{1e3 * r['prep_s_per_image_median'] * ips:.1f}" if arm == "reencode" else "0"
            lines.append(f"| {config} | {label} | {ips:.1f} | {1e3 * a['step_s_median']:.1f} | "
                         f"{1e3 * a['cpu_s_median']:.1f} | "
                         f"{1e3 * a['encode_s_median']:.2f} | {100 * a['encode_share_median']:.1f}% | {ratio} | {prep} |")
        notes.append(f"- {config}: {r['image_seq_length']} tokens per image; cached tokens == re-encoded tokens "
                     f"on every batch; loss max diff between arms {r['loss_max_abs_diff']:.1e}.")
    return "\n".join(lines + [""] + notes)


def table_multi(res: dict) -> str:
    lines = ["| config | arm | processes × steps | samples/concept | wall (s, median) | import+load+data+save (s) | "
             "training (s) | samples/s | samples/s per concept | × wall |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config, r in res.items():
        s = r["summary"]
        for arm, label in (("joint", f"{s['N']} concepts in one run"), ("separate", f"{s['N']} separate runs")):
            a = s[arm]
            visits = "/".join(str(v) for v in a["visits"].values())
            ratio = f"{s['ratio_wall']:.2f}" if arm == "separate" else "1.00"
            lines.append(f"| {config} | {label} | {a['processes']} × {a['steps_per_process']} | {visits} | "
                         f"{a['wall_s_median']:.1f} | {a['overhead_s_median']:.1f} | {a['train_s_median']:.1f} | "
                         f"{a['samples_per_s']:.1f} | {a['samples_per_s_per_concept']:.2f} | {ratio} |")
    notes = []
    for config, r in res.items():
        procs = [p for rs in r["runs"].values() for x in rs for p in x["procs"]]
        parts = {k: median([p[k] for p in procs])
                 for k in ("startup_import_s", "load_s", "data_s", "save_s", "save_exit_s")}
        notes.append(f"- {config}, per process (median of {len(procs)}): interpreter start + imports "
                     f"{parts['startup_import_s']:.2f} s, model load (backbone + decoder) {parts['load_s']:.2f} s, "
                     f"DataModule (warm on-disk token cache) {parts['data_s']:.2f} s, save concept file "
                     f"{parts['save_s']:.2f} s, save + checks + interpreter exit {parts['save_exit_s']:.2f} s; base weights unchanged and every trained concept's rows moved "
                     f"in every process.")
    return "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny only, few steps, one repeat (< 60 s)")
    p.add_argument("--configs", default=None, help="comma-separated subset of tiny,medium (default: both; quick: tiny)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per arm (default 2; quick 1)")
    p.add_argument("--only", default="padding,cache,multi", help="comparisons to run (padding,cache,multi)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/training[_quick].json)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1: on a shared 2-core box, 2 OpenMP threads\n"
                        "slowed steps up to 10x whenever another process ran; 0 = torch's default)")
    p.add_argument("--n-concepts", type=int, default=None, help="N for comparison 3 (default 4; quick 2)")
    p.add_argument("--keep", default=None, help="build models and data in this folder and keep them")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        load_before = os.getloadavg()[0]
        result = WORKERS[spec["mode"]](spec)
        result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        Path(args.result).write_text(json.dumps(result))
        return 0

    t_start = time.perf_counter()
    plan = dict(QUICK if args.quick else FULL)
    if args.repeats:
        plan["repeats"] = args.repeats
    if args.n_concepts:
        if not 1 <= args.n_concepts <= len(CONCEPTS):
            p.error(f"--n-concepts must be in 1..{len(CONCEPTS)}")
        plan["n_concepts"] = args.n_concepts
    global THREADS
    THREADS = args.threads
    configs = (args.configs or ("tiny" if args.quick else "tiny,medium")).split(",")
    if unknown := set(configs) - set(CONFIGS):
        p.error(f"unknown config(s) {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    only = args.only.split(",")
    out_path = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        "training_quick.json" if args.quick else "training.json")

    with tempfile.TemporaryDirectory(prefix="unipers-bench-training-") as tmpdir:
        root = Path(args.keep) if args.keep else Path(tmpdir)
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tmpdir) / "scratch"
        scratch.mkdir()
        log(f"setup in {root} ...")
        t = time.perf_counter()
        world = build_world(root, configs)
        setup_s = time.perf_counter() - t
        log(f"setup {setup_s:.1f} s")
        import torch
        import transformers

        results = {"meta": {
            "command": " ".join([Path(sys.executable).name, "benchmarks/bench_training.py", *(argv or sys.argv[1:])]),
            "quick": args.quick, "plan": plan, "configs": {c: {**CONFIGS[c], "defaults": "build_tiny_chameleon"}
                                                           for c in configs},
            "medium_max_position_embeddings": MEDIUM_MAX_POSITIONS, "task_weights": TASK_WEIGHTS,
            "concepts": [c for c, _ in CONCEPTS], "lr": LR, "weight_decay": WEIGHT_DECAY,
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": THREADS or torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "setup_s": setup_s}}
        del torch, transformers
        if "padding" in only:
            log("1. dynamic padding vs pad-to-1500")
            results["padding"] = bench_padding(world, configs, plan, scratch)
        if "cache" in only:
            log("2. cached image tokens vs re-encoding")
            results["image_cache"] = bench_cache(world, configs, plan, scratch)
        if "multi" in only:
            log("3. N concepts in one run vs N separate runs")
            results["multi_concept"] = bench_multi(world, configs, plan, scratch)
    results["meta"]["total_s"] = time.perf_counter() - t_start

    print(f"# Training data path ({'quick' if args.quick else 'full'}; batch {plan['batch_size']}, "
          f"{plan['repeats']} repeat(s); {results['meta']['threads']} threads)\n")
    if "padding" in results:
        print("## 1. Dynamic padding vs pad-to-1500 (understanding step: forward + backward + AdamW)\n")
        print(table_padding(results["padding"], plan["batch_size"]) + "\n")
    if "image_cache" in results:
        print("## 2. Cached image tokens vs VQ re-encoding every step\n")
        print(table_cache(results["image_cache"]) + "\n")
    if "multi_concept" in results:
        n = plan["n_concepts"]
        print(f"## 3. N = {n} concepts in one run vs {n} separate runs (same sample visits per concept)\n")
        print(table_multi(results["multi_concept"]) + "\n")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"total {results['meta']['total_s']:.0f} s; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
