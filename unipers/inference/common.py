"""Arguments and set-up shared by `unipers ask`, `unipers recognize` and `unipers generate`; the ranges of
their numeric options are in ``options.py``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from unipers.inference.options import OPTION_RANGES, option_type


def add_common_arguments(parser: argparse.ArgumentParser, concepts_required: bool = False) -> None:
    parser.add_argument("--concept", action="append", default=[], required=concepts_required, metavar="FILE",
                        help="concept file (.safetensors); repeat for several concepts")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config naming the base models (default: the embedded tiny models)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config override, e.g. --set backbone.path=checkpoints/anole-7b")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def add_option(parser: argparse.ArgumentParser, name: str, default: Any, help: str = "") -> None:
    """``--name-with-dashes`` for option `name`, checked against its range; the help shows the range."""
    spec = OPTION_RANGES[name]
    text = f"{help}; " if help else ""
    shown = "the decoder's" if default is None else default
    parser.add_argument(f"--{name.replace('_', '-')}", type=option_type(name), default=default,
                        help=f"{text}{spec.describe()} (default: {shown})".replace("%", "%%"))


def open_session(args: argparse.Namespace):
    """The session with every --concept loaded, or an error message (and exit code 2) naming the problem."""
    import torch

    from unipers.concepts.io import ConceptFileError
    from unipers.concepts.names import ConceptNameError
    from unipers.config import ConfigError, load_config
    from unipers.inference.session import InferenceSession

    try:
        cfg = load_config(args.config, args.overrides)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        session = InferenceSession.from_config(cfg, device=device)
        for path in args.concept:
            session.load(path)
    except (ConfigError, ConceptFileError, ConceptNameError, FileNotFoundError) as err:
        fail(err)
    return session


def fail(err: Exception | str) -> None:
    print(f"unipers: {err}", file=sys.stderr)
    raise SystemExit(2)
