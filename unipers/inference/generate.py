"""`unipers generate`: draw your concepts somewhere new; PNGs, a grid and a JSON sidecar per image.

    unipers generate --concept runs/bo/concepts/last.safetensors "<bo> reading a book in a library" --seed 0
    unipers generate --from-sidecar out/bo_reading_a_book_in_a_library_seed0.json   # the same image again
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unipers.inference.common import add_common_arguments, add_option

    parser.add_argument("prompt", nargs="*", help="prompt(s); name concepts as <bo>")
    add_common_arguments(parser)
    parser.add_argument("--negative", default="", help="negative prompt (goes through the same path)")
    add_option(parser, "seed", 0, "image i of a prompt uses seed + i")
    add_option(parser, "num_images", 1, "images per prompt")
    add_option(parser, "steps", 25, "sampling steps")
    add_option(parser, "guidance", 5.0, "classifier-free guidance scale; 1 or less turns it off")
    add_option(parser, "size", None, "image side in pixels")
    parser.add_argument("--scheduler", default=None, help="ddim (default), euler, dpm, ddpm")
    parser.add_argument("--out", default="outputs",
                        help="output folder; files already there are kept, new names get a _2, _3, ... suffix")
    parser.add_argument("--from-sidecar", default=None, metavar="JSON", help="regenerate an image from its sidecar")


def main(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from unipers.inference.common import fail, open_session
    from unipers.inference.session import InputError, save_images

    if args.from_sidecar:
        read_sidecar(args)
    if not args.prompt:
        fail("give a prompt, or --from-sidecar")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the slow part, not after it
        fail(f"{out}: exists and is not a folder; --out takes a folder")
    session = open_session(args)
    try:
        output = session.generate(args.prompt, negative=args.negative, seed=args.seed, num_images=args.num_images,
                                  steps=args.steps, guidance=args.guidance, size=args.size, scheduler=args.scheduler)
    except (InputError, ValueError) as err:
        fail(err)
    saved = save_images(output, out, session.model.fingerprints)
    for path in saved:
        print(path)
    print(f"grid: {saved.grid}", file=sys.stderr)  # stdout stays one image path a line
    return 0


def read_sidecar(args: argparse.Namespace) -> None:
    """Put a sidecar's settings into `args`, or fail naming the sidecar and what is wrong with it."""
    import json

    from unipers.inference.common import fail
    from unipers.inference.options import InputError, check_option

    path = args.from_sidecar
    try:
        side = json.loads(open(path).read())
    except (OSError, ValueError) as err:
        fail(f"{path}: cannot read sidecar ({err})")
    fields = {"prompt": str, "negative": str, "seed": int, "steps": int, "guidance": (int, float),
              "size": (int, type(None)), "scheduler": (str, type(None)), "concept_files": list}
    if not isinstance(side, dict):
        fail(f"{path}: not a unipers sidecar (no settings object)")
    for key, kind in fields.items():
        if key not in side:
            fail(f"{path}: not a unipers sidecar (no {key!r})")
        if not isinstance(side[key], kind):
            fail(f"{path}: {key} is {side[key]!r}, not a {getattr(kind, '__name__', 'valid value')}")
    # The sidecar's values skip argparse, so they get the same range checks here.
    for key in ("seed", "steps", "guidance", "size"):
        try:
            if side[key] is not None:
                check_option(key, side[key])
        except InputError as err:
            fail(f"{path}: {err}")
    args.prompt, args.negative, args.seed = [side["prompt"]], side["negative"], side["seed"]
    args.steps, args.guidance, args.size, args.scheduler = side["steps"], side["guidance"], side["size"], side["scheduler"]
    args.num_images, args.concept = 1, args.concept or [str(f) for f in side["concept_files"]]
