"""`unipers recognize`: is the concept in each image? A probability per image from the Yes/No logits.

    unipers recognize --concept runs/bo/concepts/last.safetensors --image a.jpg --image b.jpg
"""

from __future__ import annotations

import argparse

from unipers.inference.common import add_common_arguments, add_option, fail, open_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, concepts_required=True)
    parser.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    parser.add_argument("--name", default=None, help="which concept, when the files hold several")
    add_option(parser, "threshold", 0.5, "the verdict is yes from this P(yes) up")


def main(args: argparse.Namespace) -> int:
    from unipers.inference.session import InputError

    session = open_session(args)
    name = args.name or session.concepts[0]
    if len(session.concepts) > 1 and args.name is None:
        fail(f"the concept files hold {', '.join(session.concepts)}: pick one with --name")
    try:
        probs = session.recognize(name, args.image)
    except InputError as err:
        fail(err)
    for path, p in zip(args.image, probs):
        print(f"{'yes' if p >= args.threshold else 'no ':3}  p={p:.3f}  {path}")
    return 0
