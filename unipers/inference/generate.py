"""`unipers generate`: draw your concepts somewhere new; PNGs, a grid and a JSON sidecar per image.

    unipers generate --concept runs/bo/concepts/last.safetensors "<bo> reading a book in a library" --seed 0
    unipers generate --from-sidecar out/bo_reading_a_book_in_a_library_seed0.json   # the same image again
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unipers.inference.common import add_common_arguments

    parser.add_argument("prompt", nargs="*", help="prompt(s); name concepts as <bo>")
    add_common_arguments(parser)
    parser.add_argument("--negative", default="", help="negative prompt (goes through the same path)")
    parser.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the decoder's)")
    parser.add_argument("--scheduler", default=None, help="ddim (default), euler, dpm, ddpm")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--from-sidecar", default=None, metavar="JSON", help="regenerate an image from its sidecar")


def main(args: argparse.Namespace) -> int:
    import json

    from unipers.inference.common import fail, open_session
    from unipers.inference.session import InputError, save_images

    if args.from_sidecar:
        try:
            side = json.loads(open(args.from_sidecar).read())
        except (OSError, ValueError) as err:
            fail(f"{args.from_sidecar}: cannot read sidecar ({err})")
        args.prompt, args.negative, args.seed = [side["prompt"]], side["negative"], side["seed"]
        args.steps, args.guidance, args.size, args.scheduler = side["steps"], side["guidance"], side["size"], side["scheduler"]
        args.num_images, args.concept = 1, args.concept or side["concept_files"]
    if not args.prompt:
        fail("give a prompt, or --from-sidecar")
    session = open_session(args)
    try:
        output = session.generate(args.prompt, negative=args.negative, seed=args.seed, num_images=args.num_images,
                                  steps=args.steps, guidance=args.guidance, size=args.size, scheduler=args.scheduler)
    except (InputError, ValueError) as err:
        fail(err)
    for path in save_images(output, args.out, session.model.fingerprints):
        print(path)
    return 0
