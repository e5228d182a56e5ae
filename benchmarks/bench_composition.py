"""Concepts trained apart, loaded together, against one joint run, on the tiny world (unipers.world.compose).

    python benchmarks/bench_composition.py                       # 3 concepts, 2,400 steps each, seed 0
    python benchmarks/bench_composition.py --concepts 4 --steps 2400 --seed 1 --out runs/composition-s1
    python benchmarks/bench_composition.py --root ~/.cache/unipers/world   # the demo's base (it saw all but <bo>)
    python benchmarks/bench_composition.py --steps 30 --world-share 0.02 --out /tmp/compose_smoke \\
        --json benchmarks/results/composition_smoke.json          # end to end in minutes: numbers mean nothing

By default it builds (once; cached under $UNIPERS_HOME/world-compose/) a base by the demo world's recipe and
seed with every chosen object held out, about 20 minutes on 2 cores. Then it trains each concept alone
(the demo's settings) and all of them jointly (steps x concepts), the joint run in a second process
meanwhile (--jobs 1: one after the other; every run uses one thread, so the numbers are the same), and
measures held-out recognition alone / together / joint. Prints a markdown table; JSON (per-photo P(yes)
too) in benchmarks/results/composition.json and OUT/composition.json. `--summary JSON` prints a saved
result's table again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unipers.world.compose import CONDITIONS, run_composition, summarize  # noqa: E402  (after the path above)

RESULTS = Path(__file__).resolve().parent / "results"


def format_table(r: dict) -> str:
    """The markdown table of a result: one row per concept, then "which of these is it?"."""
    names, w, c, st = list(r["concepts"]), r["held_out_recognition"], r["conditions"], r["settings"]
    ev = r["eval_weighted"]
    n_neg = {k: c[k][names[0]].get("eval_counts", {}).get("recognition/n_neg", "?") for k in CONDITIONS}
    lines = [
        f"{st['concepts']} concepts, {st['steps_separate']} steps each alone, {st['steps_joint']} steps joint, batch "
        f"{st['batch_size']}, seed {st['seed']}; world {r['world']['version']} seed {r['world']['seed']}. Held-out "
        "recognition, weighted, on each concept's own 24 test photos and 24 test negatives (14 near-misses) in "
        "every condition.",
        "",
        "| concept | object | base saw it | alone | together | together − alone | joint "
        "| near-misses rejected: alone / together / joint "
        f"| `unipers eval`: alone / together / joint ({n_neg['alone']} / {n_neg['together']} / {n_neg['joint']} "
        "negatives) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for nm in names:
        info = r["concepts"][nm]
        near = " / ".join(f"{c[k][nm]['recognize']['near_miss_neg']:.2f}" for k in CONDITIONS)
        evs = " / ".join(f"{ev[k][nm]:.2f}" for k in CONDITIONS)
        lines.append(f"| `<{nm}>` | {info['describe']} | {'yes' if info['base_saw'] else 'no'} "
                     f"| {w['alone'][nm]:.2f} | {w['together'][nm]:.2f} | {r['together_minus_alone'][nm]:+.2f} "
                     f"| {w['joint'][nm]:.2f} | {near} | {evs} |")
    wi = r["which_is"]
    lines += [f"| which of these is it? ({wi['together']['n_photos']} test photos, highest P(yes)) | | "
              f"| ({wi['alone']['accuracy']:.2f}: files scored apart) | {wi['together']['accuracy']:.2f} | "
              f"| {wi['joint']['accuracy']:.2f} | | |", ""]
    held = "yes" if r["together_within_0.02_of_alone"] else "no"
    shift = max(r["max_abs_p_yes_change_together_vs_alone"].values())
    pairs = ", ".join(" & ".join(f"<{x}>" for x in p) for p in r["near_miss_pairs"]) or "none"
    lines += [f"Together within 0.02 of alone for every concept: **{held}** (largest change of any test photo's "
              f"P(yes), together vs alone: {shift:.2g}). Alone equals `unipers eval`'s figure: "
              f"{'yes' if r['alone_equals_eval'] else 'no'}. Near-miss pair(s): {pairs}.",
              f"CPU: {r['cpu']['model']} (torch kernels {r['cpu']['torch_capability']}), {r['threads']} thread "
              "per run. Time (s): " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, default=3, help="2 to 4 concepts (default 3)")
    p.add_argument("--steps", type=int, default=2400, help="steps of each separate run (joint: steps x concepts)")
    p.add_argument("--seed", type=int, default=0, help="demo seed: photos, training, the objects after <bo>'s")
    p.add_argument("--out", default="runs/composition", help="work folder (replaced when an earlier run wrote it)")
    p.add_argument("--json", default=str(RESULTS / "composition.json"))
    p.add_argument("--root", default=None, help="a built world to use instead of the held-out one")
    p.add_argument("--world-share", type=float, default=1.0, help="held-out world at this share of the steps")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2))
    p.add_argument("--verbose", action="store_true", help="progress bars")
    p.add_argument("--summary", metavar="JSON", help="print the table of a saved result (its figures re-derived)")
    args = p.parse_args(argv)
    if args.summary:
        result = summarize(json.loads(Path(args.summary).read_text()))
        Path(args.summary).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n`{result.get('command', '')}`\n")
        print(format_table(result))
        return 0
    command = "python benchmarks/bench_composition.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_composition(Path(args.out), n=args.concepts, steps=args.steps, seed=args.seed,
                             root=args.root and Path(args.root).expanduser(), world_share=args.world_share,
                             jobs=args.jobs, quiet=not args.verbose, overwrite=True)
    result["command"] = command.strip()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n`{result['command']}`\n")
    print(format_table(result))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
