"""`generate --think` on the facts world: images of a fact's place with and without the AR model's rewrite.

    python benchmarks/bench_think.py                         # facts world (built once, cached), <bo> 2,400 steps
    python benchmarks/bench_think.py --seeds 0 1 2           # three demo seeds, and a table across them
    python benchmarks/bench_think.py --steps 30 --world-share 0.02 --out /tmp/think_smoke \\
        --json /tmp/think_smoke.json                         # end to end in minutes: numbers mean nothing
    python benchmarks/bench_think.py --summary benchmarks/results/think.json

The facts world (unipers.world.facts) is the demo world's base where a photo's place sets its background
and the base also learned to rewrite image prompts; it is built by the demo world's recipe and seed, about
17 minutes on 2 cores, and cached under $UNIPERS_HOME/world-facts/. `<bo>` (the demo's object, facts and
settings; photos taken in random places) is trained, then each place fact is drawn three ways from the same
seeds: the prompt as written, its `--think` rewrite, and the place spelled out. Prints a markdown table;
JSON in benchmarks/results/think.json and OUT/seedN/think.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unipers.world.think import format_seeds, format_table, run_think  # noqa: E402  (after the path above)

RESULTS = Path(__file__).resolve().parent / "results"


def report(runs: list) -> str:
    """Each run's table, then the table across seeds."""
    return "\n".join(format_table(r) for r in runs) + ("\n" + format_seeds(runs) if len(runs) > 1 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2400, help="personalization steps of <bo>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="demo seeds, one run each (photos, training, image seeds); default 0")
    p.add_argument("--images", type=int, default=48, help="seeded images per prompt and condition")
    p.add_argument("--out", default="runs/think", help="work folder: OUT/seedN per seed (replaced when an earlier run wrote it)")
    p.add_argument("--json", default=str(RESULTS / "think.json"))
    p.add_argument("--root", default=None, help="a built facts world (default: build or reuse the cached one)")
    p.add_argument("--world-share", type=float, default=1.0, help="facts world at this share of the steps")
    p.add_argument("--no-captions", action="store_true",
                   help='every photo of <bo> captioned "A photo of <bo>." (default: its place named, prepare --captions)')
    p.add_argument("--no-recall", action="store_true",
                   help="--think rewrites without first recalling what the model knows (session.think(recall=False))")
    p.add_argument("--verbose", action="store_true", help="progress bars")
    p.add_argument("--summary", metavar="JSON", help="print the table of a saved result")
    args = p.parse_args(argv)
    if args.summary:
        saved = json.loads(Path(args.summary).read_text())
        print(f"\n`{saved.get('command', '')}`\n")
        print(report(saved["runs"]))
        return 0
    command = "python benchmarks/bench_think.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out_dir = Path(args.out)
    runs = [run_think(out_dir / f"seed{seed}",
                      root=args.root and Path(args.root).expanduser(), seed=seed, steps=args.steps,
                      world_share=args.world_share, n_images=args.images, captions=not args.no_captions,
                      recall=not args.no_recall,
                      quiet=not args.verbose, overwrite=True)
            for seed in args.seeds]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command.strip(), "runs": runs}, indent=2) + "\n")
    print(f"\n`{command.strip()}`\n")
    print(report(runs))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
