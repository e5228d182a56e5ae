"""Negative pools: unipers' streamed, cached CLIP embedding against loading every image first.

    OMP_NUM_THREADS=1 python benchmarks/bench_pool.py       # N = 1k, 10k, 100k; 3 processes per cell, ~8 min
    python benchmarks/bench_pool.py --quick                 # N = 1k, 5k; 1 repeat (~1 min once the pools exist)
    python benchmarks/bench_pool.py --sizes 1000,20000 --repeats 1 --naive-max 20000

The data issue asks that pools of 100k+ images work and that memory grow with the embedding matrix, not
with the images. For each pool size N this measures, each in a fresh subprocess (1 torch thread, CPU):

- **unipers / cold**: ``unipers.data.retrieval.embed_pool`` on the pool with an empty cache (the path
  ``unipers prepare --negatives POOL --clip CLIP`` takes), then ``select_from_pool`` with a 5-photo
  concept and the default ``PrepareOptions`` counts. Wall time, images/s, peak RSS, the float16
  embedding matrix and the cache file it writes. ``list_pool``, the embedding itself, every cache write
  (``_save_cache``: checkpoints every 20k new images plus the final one) and the selection are timed
  separately by wrapping those module functions (retrieval.py itself is not changed).
- **unipers / hit**: the same call again on the unchanged pool: must reuse every row (0 images embedded,
  0 CLIP forward calls, the cache file is not rewritten). Then one end-to-end ``prepare_concept`` with
  the pool (also from the cache), timed too.
- **unipers / update**: ``--touch`` existing files get a new mtime and ``--add`` new files appear in a
  sub-folder; reports whether only those were embedded (incremental) or the whole pool (full).
- **naive**: read every pool image into a list of PIL images first, then embed them in batches with the
  same ``PoolEmbedder`` (no cache), then the same selection. Run for N <= ``--naive-max``.

Memory: the peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs once imports, the CLIP model
and the concept photos are loaded (a first CLIP forward and a first DataLoader pass are done before it
too), so *peak RSS delta* is what the pool pass and the selection add: their peak minus the RSS at that
point (the JSON splits it: the counter is reset again between the two). The pools are synthetic 48x48
PNGs of random coloured shapes, 1,000 per sub-folder, cached in ``--root``/<N> (generated once with 2
processes; reruns reuse them). The CLIP is a tiny random vision tower (hidden 32, 2 layers, 32 px input,
projection_dim 64) saved locally with its processor, so the time is image decoding + preprocessing, not
the model. Medians over ``--repeats`` processes; the table is printed as markdown and the JSON goes to
``--out`` (benchmarks/results/ is not versioned).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _memory import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402  (benchmarks/ is on sys.path)

MiB = 1024**2
POOL_VERSION = "shapes48-v1"  # bump when the generator changes, so cached pools are rebuilt
PER_DIR = 1000
CONCEPT_PHOTOS = 5


# ---- synthetic data ---------------------------------------------------------------------------------------
def shape_image(seed: int, size: int = 48):
    """A distinct small image: random background with 1-3 random coloured ellipses / rectangles / triangles."""
    from PIL import Image, ImageDraw

    r = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(r.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(1 + r.randrange(3)):
        x0, y0 = r.randrange(size - 8), r.randrange(size - 8)
        x1, y1 = x0 + 6 + r.randrange(size - x0 - 5), y0 + 6 + r.randrange(size - y0 - 5)
        fill = tuple(r.randrange(256) for _ in range(3))
        kind = r.randrange(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return img


def _write_chunk(job: tuple[str, int, int, int]) -> int:
    folder, start, stop, seed0 = job
    out = Path(folder)
    for i in range(start, stop):
        d = out / f"d{i // PER_DIR:03d}"
        d.mkdir(parents=True, exist_ok=True)
        shape_image(seed0 + i).save(d / f"img_{i:06d}.png")
    return stop - start


def ensure_pool(root: Path, n: int, procs: int) -> tuple[Path, float]:
    """``root/<n>`` with n PNGs; reused when its ``.complete`` marker matches. Returns (folder, seconds spent)."""
    from multiprocessing import Pool

    folder = root / str(n)
    marker = folder / ".complete"  # hidden: list_pool skips it
    if marker.is_file() and marker.read_text().strip() == f"{POOL_VERSION} {n}":
        return folder, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = [(str(folder), a, min(a + PER_DIR, n), 0) for a in range(0, n, PER_DIR)]
    with Pool(procs) as p:
        done = sum(p.imap_unordered(_write_chunk, jobs))
    assert done == n
    marker.write_text(f"{POOL_VERSION} {n}\n")
    return folder, time.perf_counter() - t0


def ensure_concept(root: Path) -> Path:
    folder = root / "concept"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(CONCEPT_PHOTOS):
        p = folder / f"photo_{i}.png"
        if not p.exists():
            shape_image(10**9 + i, 96).save(p)
    return folder


def ensure_clip(root: Path, proj: int) -> Path:
    """A tiny random CLIP vision tower + processor saved like a real local checkpoint (as in tests/data)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = root / f"clip_p{proj}"
    if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
        return path
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=proj)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# ---- worker -------------------------------------------------------------------------------------------------
class Timer:
    """Wraps a module-level function: counts calls, sums seconds (and bytes written, for _save_cache)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.real = module, name, getattr(module, name)
        self.calls, self.seconds, self.rows = 0, 0.0, []
        setattr(module, name, self)

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.real(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1
            if self.name == "_save_cache":
                self.rows.append(len(a[1]))  # files written by this call

    def summary(self) -> dict:
        out = {"calls": self.calls, "s": self.seconds}
        if self.name == "_save_cache":
            out["rows_written"] = self.rows
        return out


def worker(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from unipers.data import retrieval
    from unipers.data.images import open_rgb
    from unipers.data.prepare import PrepareOptions, prepare_concept

    root = Path(args.root)
    pool = root / str(args.n)
    clip = Path(args.clip)
    concept = root / "concept"
    opts = PrepareOptions(quiet=True, device="cpu", batch_size=args.batch)
    cache_dir = pool / retrieval.CACHE_DIRNAME
    phase = args.worker
    info: dict = {"phase": phase, "n": args.n}

    if phase == "cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    if phase == "update":  # touch some files, add some new ones (in a sub-folder removed by the driver)
        listing = sorted(pool.rglob("img_*.png"))
        step = max(1, len(listing) // args.touch)
        touched = listing[args.rep::step][:args.touch]
        for p in touched:
            os.utime(p)  # mtime = now: differs from the cached one
        added = pool / "_added"
        added.mkdir(exist_ok=True)
        for i in range(args.add):
            shape_image(2 * 10**9 + 1000 * args.rep + i).save(added / f"r{args.rep}_{i:03d}.png")
        info |= {"touched": len(touched), "added": args.add}

    fp = retrieval.clip_fingerprint(clip)
    embedder = retrieval.PoolEmbedder(clip, device="cpu", batch_size=opts.batch_size, num_workers=opts.num_workers)
    photos = [open_rgb(p) for p in sorted(concept.glob("*.png"))]
    cache_file = cache_dir / f"{fp}.npz"
    cache_mtime = cache_file.stat().st_mtime_ns if cache_file.exists() else None
    # Warm-up outside the measured window: first forward, DataLoader / tqdm imports, the concept rows (as
    # prepare embeds them too), so the peak below is what the pool pass itself adds.
    embedder.embed_files(sorted(concept.glob("*.png"))[:1], quiet=True)
    train_emb = embedder.embed_images(photos[:-1])
    pos_emb = embedder.embed_images(photos)
    retrieval.select_from_pool(np.concatenate([pos_emb] * 50), np.ones(250, bool), train_emb, pos_emb, n_soft=2,
                               n_hard=2, n_easy=2, near_duplicate=0.95, seed=0)
    import gc

    gc.collect()
    timers = {name: Timer(retrieval, name) for name in ("list_pool", "_load_cache", "_save_cache", "select_from_pool")}
    rss0 = rss_bytes()
    info["rss_before_bytes"] = rss0
    info["peak_reset_ok"] = reset_hwm()
    sel_kw = dict(n_soft=opts.n_soft, n_hard=opts.n_hard, n_easy=opts.n_easy, near_duplicate=opts.near_duplicate,
                  seed=0)

    t0 = time.perf_counter()
    if phase == "naive":
        paths = sorted(p for p in pool.rglob("*") if p.is_file() and p.suffix == ".png" and
                       not any(part.startswith(".") for part in p.relative_to(pool).parts))
        images = [open_rgb(p) for p in paths]
        t_loaded = time.perf_counter()
        info["rss_images_loaded_bytes"] = rss_bytes()
        emb = embedder.embed_images(images)
        ok = np.ones(len(images), bool)
        t_embedded = time.perf_counter()
        n_images = len(images)
        info |= {"load_s": t_loaded - t0, "embed_s": t_embedded - t_loaded, "pool_s": t_embedded - t0}
    else:
        calls0 = embedder.forward_calls
        pe = retrieval.embed_pool(pool, embedder, fp, quiet=True)
        t_embedded = time.perf_counter()
        emb, ok, n_images = pe.emb, pe.ok, len(pe.files)
        info |= {"pool_s": t_embedded - t0, "embedded": pe.embedded, "reused": pe.reused,
                 "forward_calls": embedder.forward_calls - calls0, "notes": pe.notes,
                 "cache_file": str(pe.cache_file) if pe.cache_file else None}
    peak_pool = hwm_bytes()  # the pool pass alone; then the selection's own peak
    info["rss_after_pool_bytes"] = rss_bytes()
    reset_hwm()
    sel = retrieval.select_from_pool(emb, ok, train_emb, pos_emb, **sel_kw)
    t_end = time.perf_counter()
    peak_select = hwm_bytes()
    peak = max(peak_pool, peak_select)
    info |= {"peak_rss_pool_delta_bytes": peak_pool - rss0, "peak_rss_select_delta_bytes": peak_select - rss0}
    info |= {"wall_s": t_end - t0, "images": n_images, "images_per_s": n_images / info["pool_s"],
             "peak_rss_bytes": peak, "peak_rss_delta_bytes": peak - rss0, "emb_bytes": int(emb.nbytes),
             "emb_shape": list(emb.shape), "emb_dtype": str(emb.dtype),
             "selected": {"soft": len(sel.soft), "hard": len(sel.hard), "easy": len(sel.easy),
                          "near_duplicates": len(sel.near_duplicates)},
             "timers": {k: t.summary() for k, t in timers.items()}}
    info["select_s"] = timers["select_from_pool"].seconds
    if phase != "naive":
        info["cache_bytes"] = cache_file.stat().st_size if cache_file.exists() else None
        info["cache_rewritten"] = (cache_file.stat().st_mtime_ns if cache_file.exists() else None) != cache_mtime
    if phase == "update":
        expected = info["touched"] + info["added"]
        info["update_kind"] = ("incremental" if info["embedded"] == expected else
                               "full" if info["embedded"] >= n_images else f"partial ({info['embedded']})")
    if phase == "hit":  # end to end: prepare with the pool (from the cache), 5 photos, default counts
        out = root / "out" / f"{args.n}"
        t = time.perf_counter()
        prepare_concept(concept, "bo", out, negatives=pool, clip_path=clip, options=opts, overwrite=True)
        info["prepare_s"] = time.perf_counter() - t
        report = (out / "report.txt").read_text()
        info["prepare_pool_note"] = next((ln.strip() for ln in report.splitlines() if "embeddings reused" in ln), None)
        info["prepare_peak_rss_bytes"] = hwm_bytes()
    return info


# ---- driver -------------------------------------------------------------------------------------------------
def fmt_n(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def med(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def run_worker(base_cmd: list[str], phase: str, n: int, rep: int, env: dict) -> dict:
    proc = subprocess.run([*base_cmd, "--worker", phase, "--n", str(n), "--rep", str(rep)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{phase} N={n}: worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for phase, rs in runs.items():
        if not rs:
            continue
        s = {k: med(rs, k) for k in ("wall_s", "pool_s", "images_per_s", "peak_rss_delta_bytes", "peak_rss_bytes",
                                      "rss_before_bytes", "emb_bytes", "cache_bytes", "select_s", "load_s",
                                      "embed_s", "prepare_s", "embedded", "reused", "forward_calls",
                                      "rss_images_loaded_bytes", "peak_rss_pool_delta_bytes",
                                      "peak_rss_select_delta_bytes", "rss_after_pool_bytes")}
        s["min_wall_s"] = min(r["wall_s"] for r in rs)
        s["max_peak_rss_delta_bytes"] = max(r["peak_rss_delta_bytes"] for r in rs)
        s["repeats"] = len(rs)
        for k in ("list_pool", "_load_cache", "_save_cache"):
            s[f"{k}_s"] = statistics.median(r["timers"][k]["s"] for r in rs)
        s["save_rows_written"] = rs[0]["timers"]["_save_cache"].get("rows_written")
        if phase == "update":
            s["update_kind"] = sorted({r["update_kind"] for r in rs})
        if phase == "hit":
            s["cache_rewritten"] = any(r["cache_rewritten"] for r in rs)
        out[phase] = s
    return out


def table(results: dict) -> str:
    head = ("| N | method | wall s | images/s | peak RSS Δ MiB | Δ / image | embedding MiB | cache MiB | "
            "cache hit s (Δ MiB) | update s (re-embedded) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for n, r in results.items():
        n = int(n)
        c = r.get("cold")
        if c:
            h, u = r.get("hit"), r.get("update")
            hit = (f"{h['wall_s']:.2f} ({h['peak_rss_delta_bytes'] / MiB:.1f})"
                   + ("" if h["embedded"] == 0 and h["forward_calls"] == 0 else " RE-EMBEDDED")) if h else "—"
            upd = (f"{u['wall_s']:.2f} ({int(u['embedded'])}: {'/'.join(u['update_kind'])})") if u else "—"
            lines.append(f"| {fmt_n(n)} | unipers (embed_pool) | {c['wall_s']:.1f} | {c['images_per_s']:,.0f} | "
                         f"{c['peak_rss_delta_bytes'] / MiB:.1f} | {c['peak_rss_delta_bytes'] / n:,.0f} B | "
                         f"{c['emb_bytes'] / MiB:.2f} | {c['cache_bytes'] / MiB:.2f} | {hit} | {upd} |")
        v = r.get("naive")
        if v:
            lines.append(f"| {fmt_n(n)} | naive (all images first) | {v['wall_s']:.1f} | {v['images_per_s']:,.0f} | "
                         f"{v['peak_rss_delta_bytes'] / MiB:.1f} | {v['peak_rss_delta_bytes'] / n:,.0f} B | "
                         f"{v['emb_bytes'] / MiB:.2f} | — | — | — |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="pool sizes, comma separated")
    p.add_argument("--quick", action="store_true", help="sizes 1000,5000 and 1 repeat")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per (N, phase); medians reported")
    p.add_argument("--naive-max", type=int, default=100_000, help="largest N for the naive method")
    p.add_argument("--phases", default="cold,hit,update,naive")
    p.add_argument("--root", default="/tmp/unipers_bench_pool", help="pools, CLIP and outputs live here")
    p.add_argument("--proj", type=int, default=64, help="CLIP projection_dim (embedding width)")
    p.add_argument("--batch", type=int, default=32, help="CLIP batch size (PrepareOptions default)")
    p.add_argument("--touch", type=int, default=10, help="update phase: existing files given a new mtime")
    p.add_argument("--add", type=int, default=10, help="update phase: new files added")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the workers")
    p.add_argument("--gen-procs", type=int, default=2, help="processes writing the synthetic pools")
    p.add_argument("--out", default=None)
    # worker-only
    p.add_argument("--worker", choices=("cold", "hit", "update", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--clip", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "1000,5000", 1
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("pool_quick.json" if args.quick else "pool.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    clip = ensure_clip(root, args.proj)
    ensure_concept(root)
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--clip", str(clip),
                "--batch", str(args.batch), "--touch", str(args.touch), "--add", str(args.add),
                "--threads", str(args.threads)]
    t_start = time.perf_counter()
    results, raw, gen = {}, {}, {}
    for n in sizes:
        folder, gen_s = ensure_pool(root, n, args.gen_procs)
        gen[n] = gen_s
        print(f"N={n}: pool {folder} ({'generated in %.1f s' % gen_s if gen_s else 'reused'})", flush=True)
        shutil.rmtree(folder / "_added", ignore_errors=True)
        runs: dict[str, list[dict]] = {ph: [] for ph in ("cold", "hit", "update", "naive")}
        pair = [ph for ph in ("cold", "naive") if ph in phases and (ph != "naive" or n <= args.naive_max)]
        for rep in range(args.repeats):
            for ph in (pair if rep % 2 == 0 else pair[::-1]):  # alternate, so drifting load hits both sides
                r = run_worker(base_cmd, ph, n, rep, env)
                runs[ph].append(r)
                print(f"  [{rep + 1}/{args.repeats}] {ph:6s} {r['wall_s']:7.2f} s  {r['images_per_s']:7.0f} img/s  "
                      f"peak RSS Δ {r['peak_rss_delta_bytes'] / MiB:7.1f} MiB"
                      + (f"  embedded {r['embedded']}" if "embedded" in r else "")
                      + (f"  (load {r['load_s']:.1f} s, images held "
                         f"{(r['rss_images_loaded_bytes'] - r['rss_before_bytes']) / MiB:.0f} MiB)"
                         if ph == "naive" else ""), flush=True)
        if "cold" in phases and not runs["cold"]:
            raise SystemExit("cold phase needed before hit/update")
        for ph in ("hit", "update"):
            if ph not in phases:
                continue
            for rep in range(args.repeats):
                r = run_worker(base_cmd, ph, n, rep, env)
                runs[ph].append(r)
                extra = (f"  embedded {r['embedded']} reused {r['reused']} forward calls {r['forward_calls']}"
                         + (f"  {r['update_kind']}" if ph == "update" else f"  prepare {r['prepare_s']:.2f} s"))
                print(f"  [{rep + 1}/{args.repeats}] {ph:6s} {r['wall_s']:7.2f} s  "
                      f"peak RSS Δ {r['peak_rss_delta_bytes'] / MiB:7.1f} MiB{extra}", flush=True)
        shutil.rmtree(folder / "_added", ignore_errors=True)
        raw[n] = runs
        results[n] = summarize(runs)
    md = table(results)
    print()
    print(md)
    import numpy
    import PIL
    import torch
    import transformers

    payload = {
        "benchmark": "pool",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: getattr(args, k) for k in ("sizes", "repeats", "naive_max", "phases", "root", "proj", "batch",
                                                 "touch", "add", "threads", "gen_procs")}
        | {"image_size": 48, "image_format": "png", "clip": "tiny random CLIPVisionModelWithProjection "
           "(hidden 32, 2 layers, 32 px, patch 8)", "concept_photos": CONCEPT_PHOTOS, "pool_version": POOL_VERSION},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "numpy": numpy.__version__, "pillow": PIL.__version__,
                        "python": platform.python_version(), "cpus": os.cpu_count(),
                        "machine": platform.machine()},
        "pool_generation_s": gen,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
        "runs": raw,
        "table_markdown": md,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
