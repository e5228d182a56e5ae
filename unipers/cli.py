"""The ``unipers`` command.

    unipers --help
    unipers prepare PHOTOS_DIR --name bo --out data/bo
    unipers train configs/personalize.yaml data.concepts=[data/bo] run_dir=runs/bo

Errors print one line and exit with a code from ``unipers.errors`` (2: fix the named input; 1: a failure;
75: stopped by a signal, resumable); ``unipers --debug COMMAND ...`` shows the traceback instead.

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
    "concepts": ("unipers.concepts.cli", "list, inspect, merge, remove and rename concept files"),
    "slurm": ("unipers.launch.cli", "submit align / personalize jobs and concept arrays to Slurm; status, collect"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from unipers import __version__

    parser = argparse.ArgumentParser(
        prog="unipers",
        description="Personalize a unified multimodal model with a few soft concept tokens.",
    )
    parser.add_argument("--version", action="version", version=f"unipers {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen sub-command's module is imported: the others are listed by name and help alone.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
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
    if args.debug:
        return int(module.main(args) or 0)
    try:
        return int(module.main(args) or 0)
    except Exception as err:  # one line, not a traceback; --debug shows it
        code, line = explain(err)
        print(f"unipers {args.command}: error: {line}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"unipers {args.command}: interrupted", file=sys.stderr)
        return 130


def explain(err: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error that reached the command line."""
    from unipers.errors import EXIT_FAILED, EXIT_USAGE, UnipersError

    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, UnipersError):
        return getattr(err, "exit_code", EXIT_USAGE), message
    if isinstance(err, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                        PermissionError)):
        return EXIT_USAGE, message
    return EXIT_FAILED, f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
