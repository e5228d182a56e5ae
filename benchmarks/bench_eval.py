"""`unipers eval` for one concept: what the baselines and the bootstrap intervals cost.

    python benchmarks/bench_eval.py --data /tmp/demo_out/data/bo --concept /tmp/demo_out/bo.safetensors \\
        --config /tmp/demo_out/config.yaml                      # 5 rounds of 4 arms, 1000 resamples
    python benchmarks/bench_eval.py ... --rounds 2 --resamples 200 --generation   # with CLIP / DINO in the config

Arms, each one whole ``run_eval`` (what ``unipers eval`` runs once its models are loaded: targets, every
question, the report files, samples.jsonl, the output folder written and renamed), in alternating order over
``--rounds`` rounds after one untimed warm-up run:

- **plain**: the concept file alone, ``--bootstrap 0``;
- **bootstrap**: the concept file, ``--bootstrap N`` (N = ``--resamples``);
- **baselines**: with ``--baselines``, ``--bootstrap 0``; the baselines are this script's ``--baselines``
  (default all five: they replace the config's ``eval.baselines``);
- **baselines + bootstrap**: both.

As ``held_out_eval`` in unipers/world/demo.py, the default is ``--no-generation`` (the demo world has no
CLIP) and one session is built once and reused (its load time is reported apart), on the CPU with the
config's thread count (``trainer.cpu_threads``; 0: one thread under 50M parameters). Prints a markdown table
of median and fastest seconds per arm, with "intervals alone": the median seconds of ``add_intervals`` +
``add_separation`` on a bootstrap arm's samples.jsonl, the bootstrap's own cost without the run's noise;
writes JSON to ``--out`` (benchmarks/results/ is not versioned).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARMS = {"plain": (False, False), "bootstrap": (False, True), "baselines": (True, False),
        "baselines + bootstrap": (True, True)}


def run_arm(cfg, session, args, arm: str, out: Path) -> tuple[float, dict]:
    from unipers.eval.runner import EvalRequest, run_eval

    baselines, boot = ARMS[arm]
    request = EvalRequest(concept_files=[args.concept], data=[args.data], out=out, baselines=baselines,
                          generation=args.generation, device=args.device,
                          bootstrap=args.resamples if boot else 0)
    t = time.perf_counter()
    result = run_eval(cfg, request, session=session, log=lambda m: None)
    seconds = time.perf_counter() - t
    lines = (out / "samples.jsonl").read_text().splitlines()
    info = {"samples_lines": len(lines), "samples_values": sum(len(json.loads(x)["values"]) for x in lines),
            "samples_bytes": (out / "samples.jsonl").stat().st_size,
            "metrics_bytes": (out / "metrics.json").stat().st_size,
            "recognition_weighted": (result.get("mean") or {}).get("recognition/weighted"),
            "ci": (result.get("ci") or {}).get("mean", {}).get("recognition/weighted"),
            "intervals_alone_s": intervals_alone(out / "samples.jsonl", args.resamples) if boot else None}
    shutil.rmtree(out)
    return seconds, info


def intervals_alone(path: Path, resamples: int) -> float:
    """Seconds of `add_intervals` + `add_separation` on a run's samples.jsonl: the bootstrap's own cost."""
    from unipers.eval.uncertainty import add_intervals, add_separation, read_samples

    by_block = read_samples(path)
    blocks = [{"method": m, "checkpoint": c} for m, c in by_block]
    t = time.perf_counter()
    add_intervals(blocks, list(by_block.values()), resamples, seed=0)
    add_separation(blocks)
    return time.perf_counter() - t


def table(summary: dict, resamples: int, baselines: list[str]) -> str:
    lines = ["| arm | median s | fastest s | per-sample values | vs plain | intervals alone |",
             "|---|---|---|---|---|---|"]
    base = summary["plain"]["median_s"]
    for arm, s in summary.items():
        alone = f"{s['intervals_alone_s']:.3f} s" if s["intervals_alone_s"] is not None else "–"
        lines.append(f"| {arm} | {s['median_s']:.3f} | {s['fastest_s']:.3f} | {s['samples_values']:,} "
                     f"| {s['median_s'] / base:.2f}x | {alone} |")
    boot = summary["bootstrap"]["median_s"] - summary["plain"]["median_s"]
    both = summary["baselines + bootstrap"]["median_s"] - summary["baselines"]["median_s"]
    lines += ["", f"Bootstrap ({resamples} resamples) adds {boot:+.3f} s to one method's eval and {both:+.3f} s "
                  f"with the baselines ({', '.join(baselines)}; medians)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared concept folder")
    p.add_argument("--concept", required=True, help="concept file")
    p.add_argument("--config", required=True, help="the config the concept was trained with")
    p.add_argument("--rounds", type=int, default=5, help="rounds, arms in alternating order")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the bootstrap arms")
    p.add_argument("--generation", action="store_true", help="also generate (needs eval.clip_path, eval.dino_path)")
    p.add_argument("--baselines", default="none,class,text,image,token", help="eval.baselines of the baseline arms")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_timing.json"))
    args = p.parse_args(argv)

    import torch

    from unipers.config import load_config
    from unipers.inference.session import InferenceSession
    from unipers.runtime import cpu_threads, threads_for

    cfg = load_config([args.config], [f"eval.baselines=[{args.baselines}]"])
    t0 = time.perf_counter()
    session = InferenceSession.from_config(cfg, device=args.device)
    load_s = time.perf_counter() - t0
    n_params = sum(t.numel() for t in session.model.parameters())
    threads = threads_for(cfg.trainer.cpu_threads, n_params) if args.device == "cpu" else None
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    info: dict[str, dict] = {}
    alone: dict[str, list[float]] = {a: [] for a in ARMS}
    names = list(ARMS)
    with cpu_threads(threads), tempfile.TemporaryDirectory() as tmp:
        run_arm(cfg, session, args, "baselines + bootstrap", Path(tmp) / "warmup")  # caches, allocator
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate, then reverse every other round
            for arm in order if r % 2 == 0 else order[::-1]:
                seconds, info[arm] = run_arm(cfg, session, args, arm, Path(tmp) / f"r{r}")
                times[arm].append(seconds)
                if info[arm]["intervals_alone_s"] is not None:
                    alone[arm].append(info[arm]["intervals_alone_s"])
                print(f"  round {r} {arm}: {seconds:.3f} s", flush=True)
    summary = {a: {"median_s": statistics.median(ts), "fastest_s": min(ts), "runs_s": ts, **info[a],
                   "intervals_alone_s": statistics.median(alone[a]) if alone[a] else None}
               for a, ts in times.items()}
    md = table(summary, args.resamples, args.baselines.split(","))
    print()
    print(md)
    payload = {
        "benchmark": "eval_timing",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"data": args.data, "concept": args.concept, "config": args.config, "rounds": args.rounds,
                   "resamples": args.resamples, "generation": args.generation, "baselines": cfg.eval.baselines, "device": args.device,
                   "torch_threads": threads or torch.get_num_threads(), "base_parameters": n_params},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "machine": platform.machine(), "processor": platform.processor()},
        "session_load_s": load_s,
        "wall_s": time.perf_counter() - t0,
        "results": summary,
        "table_markdown": md,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
