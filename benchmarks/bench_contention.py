"""The tiny world's build and a personalization, on a quiet machine and beside one competing process, under
several CPU thread settings: how much a busy box slows each stage.

    python benchmarks/bench_contention.py                               # every setting, quiet and busy, ~25 min
    python benchmarks/bench_contention.py --settings unipers --scale 0.1

Each arm runs in a fresh process: ``unipers world build`` with every stage's steps scaled by ``--scale``
(default 0.05: 30 tokenizer, 100 pre-training, 30 VAE, 100 align, 20 classifier steps) into a new folder,
then the demo's personalization for ``2400 * scale`` steps on it. The stage times are the build's own
(``stages.json``: the training loops) and the demo's ``personalize`` time. "busy" starts one competing
process first and stops it after the arm: ``--competitor spin`` (default), a pure-Python loop that keeps
one core busy (another user's job); ``--competitor torch``, a torch loop of small matmuls on torch's
default threads (a second test run or training job).

Settings (what the arm's process is given; the competitor is the same in every arm):

- ``default``: torch's own choice: one intra-op thread per core, libgomp's spin-then-sleep wait. What
  unipers did before it set its own threads.
- ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once instead of spinning).
- ``one``: ``OMP_NUM_THREADS=1``.
- ``unipers``: no variables set: whatever unipers itself decides (``unipers.runtime``).

The world build trains its decoder side (VAE, judge) in a second process, on one thread in every arm; the
settings apply to the main process (tokenizer, pre-training, align) and to the personalization.

Prints a markdown table and writes JSON (default benchmarks/results/contention.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "unipers": {},
}
# Variables the parent's environment may carry that would blur the arms.
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
COMPETITORS = {
    "spin": "while True: pass",  # one core held by a pure-Python loop
    # another torch job with torch's default threads (one per core), small ops: a second test run
    "torch": "import torch\nx = torch.randn(64, 64)\nwhile True: x = torch.tanh(x @ x) * 0.5",
}
STAGES = ("tokenizer", "pretrain", "vae", "align", "classifier", "personalize")


def child(scale: float, out: Path, raw_threads: bool) -> None:
    """One arm: a scaled build, then a scaled personalization; prints its timings as one JSON line."""
    sys.path.insert(0, str(REPO))
    import torch

    from unipers.world import build
    from unipers.world.demo import DemoSettings, prepare, demo_config, write_photos
    from unipers.training.run import train

    recipe = build.RECIPE.scaled(scale)
    if raw_threads:  # the other arms: torch's own thread choice (or the variables'), not unipers'
        from unipers import runtime

        recipe = build.RECIPE.scaled(scale, threads=torch.get_num_threads())  # the process's own count
        runtime.threads_for = lambda setting, n_params: None
    t0 = time.perf_counter()
    root = build.build_world(out / "world", recipe, quiet=True)
    total_build = time.perf_counter() - t0
    stages = json.loads((root / "world.json").read_text())["stages"]
    times = {
        "tokenizer": stages["backbone"]["tokenizer"]["seconds"], "pretrain": stages["backbone"]["pretrain"]["seconds"],
        "vae": stages["decoder"]["seconds"], "align": stages["align"]["seconds"],
        "classifier": stages["classifier"]["seconds"], "build": round(total_build, 1),
    }
    s = DemoSettings(steps=max(3, round(2400 * scale)), quiet=True)
    photos_dir = out / "demo"
    write_photos(photos_dir / "photos", s.seed)
    prepare(photos_dir / "photos", photos_dir / "data" / "bo", s.seed)
    cfg = demo_config(root, photos_dir, s)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    train(cfg)
    times["personalize"] = round(time.perf_counter() - t0, 1)
    times["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(times), flush=True)


def run_arm(setting: str, busy: bool, scale: float, competitor_kind: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(SETTINGS[setting])
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor_kind]],
                                      env={k: v for k, v in os.environ.items() if k not in CLEARED})
    try:
        with tempfile.TemporaryDirectory(prefix="unipers-contention-") as tmp:
            cmd = [sys.executable, __file__, "--child", tmp, "--scale", str(scale)]
            if setting != "unipers":
                cmd.append("--raw-threads")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"arm {setting}/{'busy' if busy else 'quiet'} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="default,passive,one,unipers", help="comma list of " + ", ".join(SETTINGS))
    p.add_argument("--scale", type=float, default=0.05, help="share of every stage's steps (default 0.05)")
    p.add_argument("--competitor", default="spin", choices=sorted(COMPETITORS),
                   help="spin: a pure-Python loop on one core; torch: a torch loop on torch's default threads")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "contention.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--raw-threads", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.scale, Path(args.child), args.raw_threads)
        return 0
    rows = []
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            raise SystemExit(f"--settings: unknown setting {setting!r} (known: {', '.join(SETTINGS)})")
        arm = {"setting": setting}
        for busy in (False, True):
            arm["busy" if busy else "quiet"] = run_arm(setting, busy, args.scale, args.competitor)
            print(f"{setting:8s} {'busy' if busy else 'quiet':5s} {arm['busy' if busy else 'quiet']}", file=sys.stderr, flush=True)
        rows.append(arm)
    header = "| setting | load | threads | " + " | ".join(STAGES) + " | build + personalize |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for arm in rows:
        for load in ("quiet", "busy"):
            t = arm[load]
            total = t["build"] + t["personalize"]
            ratio = "" if load == "quiet" else f" ({total / (arm['quiet']['build'] + arm['quiet']['personalize']):.2f}x)"
            print(f"| {arm['setting']} | {load} | {t['threads']} | " + " | ".join(f"{t[s]:.1f}" for s in STAGES)
                  + f" | {total:.1f}{ratio} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "scale": args.scale, "competitor": args.competitor, "cpu": platform.processor() or platform.machine(),
                               "cores": os.cpu_count(), "arms": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
