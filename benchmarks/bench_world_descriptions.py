"""How well a freshly built tiny-world base describes objects it never saw, beside objects it saw.

    python benchmarks/bench_world_descriptions.py                 # seeds 0 and 1, about 10 min per seed
    python benchmarks/bench_world_descriptions.py --seeds 2 --photos 50
    python benchmarks/bench_world_descriptions.py --pretrain-steps 3000 --out benchmarks/results/world_descriptions_3000.json

The demo's recognition is asked in two turns: the base describes the photo ("A purple striped star."),
then compares that with the concept. A concept's held-out photos can only be accepted as often as the
base describes them right, so this measures the ceiling a base draw puts on the demo, for candidate demo
objects. Per seed it builds a backbone as ``unipers world build`` does (image tokenizer, then AR
pre-training: ``build_backbone``, the world's STEPS), holding out HELD_OUT (the demo object and six
others spanning every shape, colour and pattern but dotted) from the training photos, the texts and the
negatives. Then it describes fresh photos of each held-out object and of seen objects, and counts
descriptions naming the colour, the pattern, the shape, and all three right.

The build's bases are re-drawn by the seed here (and by any float-level change in practice: another CPU's
kernels or thread count draw another base). Prints a markdown table; JSON in
benchmarks/results/world_descriptions.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unipers.world.probes import held_out_descriptions, parse_object  # noqa: E402  (after the path above)

RESULTS = Path(__file__).resolve().parent / "results"

HELD_OUT = ("purple striped star", "green checkered triangle", "yellow striped circle", "white striped diamond",
            "orange checkered square", "blue striped triangle", "red checkered circle")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--photos", type=int, default=100, help="photos described per object")
    p.add_argument("--held-out", nargs="+", default=list(HELD_OUT), help='objects as "colour pattern shape"')
    p.add_argument("--pretrain-steps", type=int, default=None, help="AR pre-training steps (default: the build's)")
    p.add_argument("--out", default=str(RESULTS / "world_descriptions.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    held_out = [parse_object(w) for w in args.held_out]
    from dataclasses import replace

    from unipers.world import build

    recipe = build.RECIPE
    if args.pretrain_steps is not None:  # a recipe probe: the build's other settings stay
        recipe = replace(recipe, steps=dict(recipe.steps, pretrain=args.pretrain_steps))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(held_out_descriptions(seed, held_out, args.photos, Path(tmp), args.quiet, recipe))
    names = list(runs[0]["rows"])
    print(f"\nDescriptions right (colour / pattern / shape / all three), {args.photos} fresh photos per row\n")
    print("| object | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        cells = []
        for r in runs:
            s = r["rows"][name]
            cells.append(f"{s['colour']:.2f} / {s['pattern']:.2f} / {s['shape']:.2f} / **{s['all']:.2f}**")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nBackbone build (s): " + ", ".join(f"seed {r['seed']} {r['build_seconds']}" for r in runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "photos": args.photos, "held_out": args.held_out,
                               "pretrain_steps": args.pretrain_steps,
                               "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
