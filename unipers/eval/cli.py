"""`unipers eval`: the personalization benchmark (Yo'LLaVA / Yo'Chameleon / UniCTokens metrics) with a report.

    unipers eval --concept bo.safetensors mam.safetensors --data data/bo data/mam --out eval/run1 \\
        --set eval.clip_path=checkpoints/clip-vit-l-14 --set eval.dino_path=checkpoints/dinov2-s
    unipers eval --run runs/bo --data data/bo data/mam --out eval/bo_curve     # every step_* file + curves.png
    unipers eval --concept bo.safetensors --data data/yollava --out eval/u --no-generation   # understanding only
    unipers eval --compare eval/run1 eval/run2 --out eval/run1_vs_run2         # paired B - A, CI and p

A concept file's concepts are matched to prepared folders by concept.json's "name"; a --data folder that
holds concept folders (an imported dataset) stands for all of them. Writes OUT/metrics.json (with 95%
bootstrap intervals), OUT/samples.jsonl (per-sample values), OUT/report.md and OUT/grids/<concept>.png
(and OUT/curves.png with --run). --compare prints the paired comparison, and with --out writes
OUT/compare.json and OUT/compare.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concept", nargs="+", action="extend", default=[], metavar="FILE",
                        help="concept file(s) (.safetensors) to evaluate")
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="instead of --concept: every RUN_DIR/concepts/step_*.safetensors and last, with curves")
    parser.add_argument("--data", nargs="+", action="extend", default=[], metavar="PREPARED_DIR",
                        help="prepared concept folder(s), or a folder of them (an imported dataset)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (metrics.json, samples.jsonl, report.md, grids/; with --compare: "
                             "compare.json, compare.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when an earlier eval wrote it")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config naming the base models and the eval: section (default: the tiny models)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config override, e.g. --set eval.clip_path=checkpoints/clip --set eval.steps=50")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                        help="score eval.baselines beside the concept files (default; none, class, text, image, "
                             "token); --baselines alone, without concept files, scores the untrained base's")
    parser.add_argument("--no-generation", action="store_true",
                        help="skip image generation and CLIP-I / CLIP-T / DINO (no metric models needed)")
    parser.add_argument("--think", action="store_true",
                        help="draw each generation prompt as the AR model rewrites it with what it knows about the "
                             "concept (eval.think; generate --think); metrics.json lists the rewrites")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="bootstrap resamples of each 95%% interval and of --compare's test (default 1000; "
                             "0: none); seeded by eval.seed")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("OUT_A", "OUT_B"),
                        help="pair two eval outputs' samples: B - A per metric with its 95%% CI and p-value "
                             "(written to --out when given)")


def main(args: argparse.Namespace) -> int:
    from unipers.inference.common import fail

    if args.compare:
        return _compare(args)
    if args.concept and args.run:
        fail("give --concept FILE... or --run RUN_DIR, not both")
    if not (args.concept or args.run or args.baselines):  # an explicit --baselines scores the base alone
        fail("nothing to evaluate: give --concept FILE..., --run RUN_DIR or --baselines")
    if not args.data:
        fail("give the prepared folder(s) with --data PREPARED_DIR...")
    if not args.out:
        fail("give an output folder with --out DIR")

    from unipers.concepts.io import ConceptFileError
    from unipers.concepts.names import ConceptNameError
    from unipers.config import ConfigError, load_config
    from unipers.eval.models import MetricModelError
    from unipers.eval.runner import EvalRequest, run_eval
    from unipers.inference.session import InputError

    request = EvalRequest(concept_files=args.concept, data=args.data, out=args.out, baselines=args.baselines is not False,
                          generation=not args.no_generation, run_dir=args.run, device=args.device,
                          overwrite=args.overwrite, bootstrap=args.bootstrap)
    try:
        cfg = load_config(args.config, args.overrides + (["eval.think=true"] if args.think else []))
        result = run_eval(cfg, request)
    except (ConfigError, MetricModelError, ConceptFileError, ConceptNameError, InputError, FileNotFoundError,
            ValueError) as err:
        fail(err)
    from unipers.eval.report import fmt

    for key, value in (result.get("mean") or {}).items():
        print(f"{key:28s} {fmt(value)}")
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from unipers.config import ConfigError, load_config
    from unipers.eval.compare import run_compare, text_table
    from unipers.eval.uncertainty import bootstrap_settings
    from unipers.inference.common import fail

    try:
        resamples, seed = bootstrap_settings(load_config(args.config, args.overrides).eval, args.bootstrap)
        result = run_compare(*args.compare, args.out, overwrite=args.overwrite, resamples=resamples, seed=seed)
    except (ConfigError, OSError, ValueError, KeyError) as err:
        fail(f"--compare: {err}")
    print(text_table(result))
    if args.out:
        print(f"wrote {args.out}/compare.json and {args.out}/compare.md")
    return 0
