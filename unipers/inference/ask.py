"""`unipers ask`: answer a question about your concepts, optionally about images; `--chat` for turns.

    unipers ask --concept runs/bo/concepts/last.safetensors "What is <bo> doing?" --image photo.jpg
    unipers ask --concept bo.safetensors --concept mam.safetensors --chat
"""

from __future__ import annotations

import argparse

from unipers.inference.common import add_common_arguments, add_option, fail, open_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?", help="the question; name concepts as <bo>")
    add_common_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image file(s) the question is about")
    parser.add_argument("--chat", action="store_true", help="multi-turn session on the terminal (empty line ends)")
    add_option(parser, "max_new_tokens", 128, "most tokens in an answer")
    add_option(parser, "temperature", 0.0, "0 = greedy, else nucleus sampling")
    add_option(parser, "top_p", 1.0, "nucleus sampling keeps the likeliest tokens up to this mass")
    add_option(parser, "seed", 0, "seeds the sampling")


def main(args: argparse.Namespace) -> int:
    from unipers.inference.session import InputError

    if not args.chat and not args.question:
        fail("give a question, or --chat")
    session = open_session(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        if not args.chat:
            print(session.ask(args.question, args.image, **options))
            return 0
        history: list[tuple[str, str]] = []
        print(f"loaded: {', '.join(f'<{n}>' for n in session.concepts) or 'no concepts'}; an empty line ends")
        images = list(args.image)
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                break
            if not question:
                break
            answer = session.ask(question, images, history=history, **options)
            images = []  # images belong to the first turn
            print(f"model> {answer}")
            history.append((question, answer))
    except InputError as err:
        fail(err)
    return 0
