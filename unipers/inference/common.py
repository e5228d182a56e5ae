"""Arguments and set-up shared by `unipers ask`, `unipers recognize` and `unipers generate`."""

from __future__ import annotations

import argparse
import sys


def add_common_arguments(parser: argparse.ArgumentParser, concepts_required: bool = False) -> None:
    parser.add_argument("--concept", action="append", default=[], required=concepts_required, metavar="FILE",
                        help="concept file (.safetensors); repeat for several concepts")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config naming the base models (default: the embedded tiny models)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config override, e.g. --set backbone.path=checkpoints/anole-7b")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


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
