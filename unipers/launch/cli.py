"""`unipers slurm`: submit align / personalize jobs and concept arrays, follow them, collect the results.

    unipers slurm submit configs/personalize.yaml configs/slurm/cluster.yaml --concepts data/bo,data/mam \\
        run_dir=runs/arr
    unipers slurm submit configs/personalize.yaml --concepts concepts.txt --eval --no-generation --dry-run
    unipers slurm status runs/arr
    unipers slurm collect runs/arr

``submit`` takes config files (merged in order) and ``key=value`` overrides, like `unipers train`.
``collect`` exits 3 when some task has no final file (they are listed in the report).
"""

from __future__ import annotations

import argparse
import sys


class _Intermixed(argparse.ArgumentParser):
    """Lets ``key=value`` overrides follow options too (``submit a.yaml --concepts x seed=1``)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if isinstance(getattr(ns, "inputs", None), list):
            ns.inputs += [a for a in extras if not a.startswith("-")]
            extras = [a for a in extras if a.startswith("-")]
        return ns, extras


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", metavar="ACTION", required=True, parser_class=_Intermixed)
    p = sub.add_parser("submit", help="write the run folder and queue the job (or a concept array)")
    p.add_argument("inputs", nargs="+", metavar="CONFIG.yaml|key=value",
                   help="config files (merged in order), then key=value overrides")
    p.add_argument("--concepts", metavar="LIST",
                   help="a job array over concepts: comma-separated folders, or a file with one per line "
                        "(slurm.concepts_per_task per task, slurm.max_parallel at once)")
    p.add_argument("--eval", action="store_true",
                   help="after training, run `unipers eval` in each task (needs eval.clip_path and eval.dino_path "
                        "for the generation metrics, or --no-generation)")
    p.add_argument("--no-generation", action="store_true",
                   help="with --eval: skip image generation and CLIP-I / CLIP-T / DINO (no metric models needed)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the sbatch file; queue nothing")
    for name, help_text in (("status", "the job's and its array tasks' states"),
                            ("collect", "gather concept files and eval results into RUN/collect.{json,md}")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("run", metavar="RUN", help="a run folder written by `unipers slurm submit`")


def _submit(args: argparse.Namespace) -> int:
    from unipers.config import ConfigError, split_config_args
    from unipers.launch.slurm import plan, read_concepts, submit

    files, overrides = split_config_args(args.inputs)
    try:
        concepts = read_concepts(args.concepts) if args.concepts else None
        job = plan(files, overrides, concepts=concepts, evaluate=args.eval, generation=not args.no_generation)
    except ConfigError as err:
        print(f"unipers slurm submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(job.script)
        print(f"# dry run: nothing written to {job.run_dir}, nothing queued", file=sys.stderr)
        return 0
    try:
        job_id = submit(job)
    except ConfigError as err:
        print(f"unipers slurm submit: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, RuntimeError) as err:
        print(f"unipers slurm submit: {err}", file=sys.stderr)
        return 1
    tasks = f"array of {len(job.tasks)} tasks" if job.tasks else "single job"
    print(f"submitted job {job_id} ({tasks}); run folder {job.run_dir}")
    print(f"  unipers slurm status {job.run_dir}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.slurm_command == "submit":
        return _submit(args)
    from unipers.launch.report import collect, format_collect, format_status, status

    try:
        if args.slurm_command == "status":
            print(format_status(status(args.run)))
            return 0
        result = collect(args.run)
    except FileNotFoundError as err:
        print(f"unipers slurm {args.slurm_command}: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(format_collect(result))
    print(f"written: {args.run}/collect.json, {args.run}/collect.md")
    return 0 if not result["missing"] else 3
