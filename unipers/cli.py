"""The ``unipers`` command.

    unipers --help
    unipers prepare PHOTOS_DIR --name bo --out data/bo
    unipers train configs/personalize.yaml data.concepts=[data/bo] run_dir=runs/bo

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` (argparse only, no heavy
imports at module level) and ``main(args) -> int``. The table below maps names to modules, so the
top-level ``--help`` imports nothing but argparse.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("unipers.data.prepare_cli", "turn a folder of photos into a training manifest"),
    "train": ("unipers.training.run", "personalize concept rows (or align the connector) from a config"),
    "ask": ("unipers.inference.ask", "answer questions about your concepts (--chat for several turns)"),
    "recognize": ("unipers.inference.recognize", "is the concept in these images? a probability per image"),
    "generate": ("unipers.inference.generate", "draw your concepts in new scenes (PNG + grid + JSON sidecar)"),
    "eval": ("unipers.eval.cli", "benchmark concepts (recognition, VQA, captions, CLIP-I/T, DINO) with a report"),
    "demo": ("unipers.world.demo", "the whole loop on the tiny world: personalize a new object, ask, recognize, generate, eval"),
    "world": ("unipers.world.build", "build the tiny world's trained base models (cached under $UNIPERS_HOME/world)"),
    "tiny": ("unipers.models.tiny_cli", "build the embedded tiny random base models (no downloads)"),
    "export": ("unipers.models.export", "merge concept files into a plain Hugging Face checkpoint"),
    "slurm": ("unipers.launch.cli", "submit align / personalize jobs and concept arrays to Slurm; status, collect"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from unipers import __version__

    parser = argparse.ArgumentParser(
        prog="unipers",
        description="Personalize a unified multimodal model with a few soft concept tokens.",
    )
    parser.add_argument("--version", action="version", version=f"unipers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen sub-command's module is imported: the others are listed by name and help alone.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
