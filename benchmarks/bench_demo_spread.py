"""The demo's claims over many draws: world bases built from several world seeds, each personalized with
several demo seeds, on this CPU's own kernels and with AVX2-only kernels (what another CPU does).

    python benchmarks/bench_demo_spread.py                                  # 5 world x 2 demo seeds, default kernels
    python benchmarks/bench_demo_spread.py --kernels default,avx2 --jobs 2  # both kernel sets, two runs at a time
    python benchmarks/bench_demo_spread.py --summary                        # the table of what is already there

Every world is built once (``unipers world build --root OUT/worlds/<kernels>-w<seed> --seed <seed>``) and
kept, and every demo run writes ``OUT/runs/<kernels>-w<seed>-d<seed>/report.json``; a run whose report
exists is not run again, so an interrupted sweep resumes. ``--jobs 2`` runs two chains (a world, then its
demos) at once: unipers trains the tiny world with one thread, so two fit on two cores.

Kernel sets (environment of the world build and of its demos):

- ``default``: this CPU's own (torch picks its widest vector unit: AVX-512 where there is one).
- ``avx2``: ``ATEN_CPU_CAPABILITY=avx2`` (torch's own vectorized kernels), ``MKL_ENABLE_INSTRUCTIONS=AVX2``
  (MKL's matmuls) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's convolutions): a CPU without AVX-512 or AMX.

Prints one row per run and each claim's min / median / max, and writes OUT/spread.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# What the demo claims, read off a report.json: (column, function of the report).
CLAIMS = {
    "recognition before": lambda r: r["results"]["before"]["eval"]["recognition/weighted"],
    "recognition after": lambda r: r["results"]["after"]["eval"]["recognition/weighted"],
    "rise": lambda r: r["results"]["after"]["eval"]["recognition/weighted"] - r["results"]["before"]["eval"]["recognition/weighted"],
    "positives": lambda r: r["results"]["after"]["recognition"]["pos"],
    "negatives": lambda r: r["results"]["after"]["recognition"]["neg"],
    "near-misses": lambda r: r["results"]["after"]["recognition"]["near_miss_neg"],
    "facts before": lambda r: r["results"]["before"]["facts_right"],
    "facts after": lambda r: r["results"]["after"]["facts_right"],
    "match before": lambda r: r["results"]["before"]["generation"]["mean"],
    "match <bo>": lambda r: r["results"]["after"]["generation"]["mean"],
    "match class word": lambda r: r["results"]["class_word"]["mean"],
    "gap": lambda r: r["results"]["after"]["generation"]["mean"] - r["results"]["class_word"]["mean"],
    "shape": lambda r: r["results"]["after"]["generation"]["shape"],
}


def _run(cmd: list[str], env: dict, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def chain(out: Path, kernels: str, world_seed: int, demo_seeds: list[int], steps: int | None) -> list[str]:
    """Build one world (unless built), then run each demo seed on it (unless reported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                             "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")}
    env.update(KERNELS[kernels])
    name = f"{kernels}-w{world_seed}"
    root = out / "worlds" / name
    done = []
    if not (root / "world.json").is_file():
        t = time.perf_counter()
        _run([sys.executable, "-m", "unipers.cli", "world", "build", "--root", str(root), "--seed", str(world_seed),
              "--quiet"], env, out / "logs" / f"{name}.log")
        done.append(f"{name}: world built in {time.perf_counter() - t:.0f} s")
    for d in demo_seeds:
        run = out / "runs" / f"{name}-d{d}"
        if (run / "report.json").is_file():
            continue
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "unipers.cli", "demo", "--root", str(root), "--seed", str(d), "--out", str(run),
               "--quiet"] + (["--steps", str(steps)] if steps else [])
        _run(cmd, env, out / "logs" / f"{name}-d{d}.log")
        done.append(f"{name}-d{d}: demo in {time.perf_counter() - t:.0f} s")
    return done


def summary(out: Path) -> dict:
    rows = []
    for report in sorted((out / "runs").glob("*/report.json")):
        r = json.loads(report.read_text())
        row = {"run": report.parent.name, "cpu": r["cpu"]["model"], "kernels": r["cpu"]["torch_capability"],
               "world_version": r["world_version"], "steps": r["settings"]["steps"]}
        row.update({k: round(f(r), 3) for k, f in CLAIMS.items()})
        row["personalize_s"] = r["seconds"]["personalize"]
        rows.append(row)
    spread = {}
    if rows:
        for k in CLAIMS:
            values = [row[k] for row in rows]
            spread[k] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return {"runs": rows, "spread": spread}


def print_table(s: dict) -> None:
    cols = list(CLAIMS)
    print("| run | kernels | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for row in s["runs"]:
        print(f"| {row['run']} | {row['kernels']} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    if s["spread"]:
        print(f"\n{len(s['runs'])} runs: min / median / max\n")
        print("| claim | min | median | max |\n|---|---|---|---|")
        for c in cols:
            v = s["spread"][c]
            print(f"| {c} | {v['min']:.2f} | {v['median']:.2f} | {v['max']:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-seeds", default="0,1,2,3,4")
    p.add_argument("--demo-seeds", default="0,1")
    p.add_argument("--kernels", default="default", help="comma list of " + ", ".join(KERNELS))
    p.add_argument("--steps", type=int, default=None, help="personalization steps (default: the demo's)")
    p.add_argument("--jobs", type=int, default=1, help="chains run at once (each one thread)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spread"))
    p.add_argument("--summary", action="store_true", help="only print the table of the runs already there")
    args = p.parse_args()
    out = Path(args.out).absolute()
    if not args.summary:
        kernels = args.kernels.split(",")
        unknown = [k for k in kernels if k not in KERNELS]
        if unknown:
            raise SystemExit(f"--kernels: unknown {unknown[0]!r} (known: {', '.join(KERNELS)})")
        demo_seeds = [int(x) for x in args.demo_seeds.split(",")]
        jobs = [(k, int(w)) for k in kernels for w in args.world_seeds.split(",")]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(chain, out, k, w, demo_seeds, args.steps) for k, w in jobs]
            for f in futures:
                for line in f.result():
                    print(line, file=sys.stderr, flush=True)
    s = summary(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spread.json").write_text(json.dumps({"command": " ".join(sys.argv), **s}, indent=2) + "\n")
    print_table(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
