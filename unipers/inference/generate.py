"""`unipers generate`: draw your concepts somewhere new; PNGs, a grid and a JSON sidecar per image.

    unipers generate --concept runs/bo/concepts/last.safetensors "<bo> reading a book in a library" --seed 0
    unipers generate --from-sidecar out/bo_reading_a_book_in_a_library_seed0.json   # the same image again
"""

from __future__ import annotations

import argparse
import json


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
    parser.add_argument("--think", action="store_true",
                        help="let the AR model first rewrite each prompt with what it knows about its concepts, "
                             "then draw the rewrite (printed; the sidecar keeps both)")


def main(args: argparse.Namespace) -> int:
    import sys
    import tempfile
    from pathlib import Path

    from unipers.config import ConfigError, load_config
    from unipers.inference.common import fail, open_session
    from unipers.inference.output import model_settings
    from unipers.inference.session import InputError, save_images

    side = read_sidecar(args) if args.from_sidecar else None
    if not args.prompt:
        fail("give a prompt, or --from-sidecar")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the slow part, not after it
        fail(f"{out}: exists and is not a folder; --out takes a folder")
    # Absolute, so the sidecars name the same files from any folder.
    args.concept = [str(Path(c).expanduser().absolute()) for c in args.concept]
    recorded = side is not None and bool(side.get("models")) and not args.config
    with tempfile.TemporaryDirectory(prefix="unipers-sidecar-") as tmp:
        if recorded:
            # The sidecar's models as a config file (JSON is YAML; a file takes any value, a --set not all).
            args.config = [Path(tmp) / "models.yaml"]
            args.config[0].write_text(json.dumps(side["models"]))
            try:
                load_config(args.config)
            except ConfigError as err:
                fail(f"{args.from_sidecar}: models: {str(err).replace(str(args.config[0]), 'the sidecar')}")
        session = open_session(args)
        models = model_settings(load_config(args.config, args.overrides))
    fingerprints = {**session.model.fingerprints, "connector": session.model.connector_fingerprint}
    if side is not None:
        check_fingerprints(args.from_sidecar, side, fingerprints, recorded)
    try:
        output = session.generate(args.prompt, negative=args.negative, seed=args.seed, num_images=args.num_images,
                                  steps=args.steps, guidance=args.guidance, size=args.size, scheduler=args.scheduler,
                                  think=args.think and not args.from_sidecar)  # a sidecar holds the rewrite
    except (InputError, ValueError) as err:
        fail(err)
    for given, drawn in dict.fromkeys((st.thought_from, st.prompt) for st in output.settings if st.thought_from):
        print(f"think: {given!r} -> {drawn!r}", file=sys.stderr)
    saved = save_images(output, out, fingerprints, models)
    for path in saved:
        print(path)
    print(f"grid: {saved.grid}", file=sys.stderr)  # stdout stays one image path a line
    return 0


def check_fingerprints(path: str, side: dict, loaded: dict[str, str], recorded: bool) -> None:
    """Fail, naming the sidecar, when the loaded models are not the ones it records: the image would not be
    the same. `recorded`: the models were loaded from the paths the sidecar names."""
    from unipers.inference.common import fail

    for kind, theirs in (side.get("fingerprints") or {}).items():
        ours = loaded.get(kind)
        if ours is None or theirs == ours:
            continue
        if recorded:
            fail(f"{path}: drawn with {kind} {theirs}, but the {kind} at the path it records is now {ours}")
        fail(f"{path}: drawn with {kind} {theirs}, but the loaded {kind} is {ours}; leave out --config to load "
             "the models the sidecar names, or give the config it was drawn with")


def read_sidecar(args: argparse.Namespace) -> dict:
    """Put a sidecar's settings into `args` and return the sidecar, or fail naming it and what is wrong."""
    from unipers.inference.common import fail
    from unipers.inference.options import InputError, check_option
    from unipers.inference.output import MODEL_SECTIONS

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
    models, prints = side.get("models"), side.get("fingerprints")
    if models is not None and not (isinstance(models, dict) and set(models) <= set(MODEL_SECTIONS)
                                   and all(isinstance(v, dict) for v in models.values())):
        fail(f"{path}: models is {models!r:.80}, not a mapping of {', '.join(MODEL_SECTIONS)} settings")
    if prints is not None and not (isinstance(prints, dict) and all(isinstance(v, str) for v in prints.values())):
        fail(f"{path}: fingerprints is {prints!r:.80}, not a mapping of model to fingerprint")
    args.prompt, args.negative, args.seed = [side["prompt"]], side["negative"], side["seed"]
    args.steps, args.guidance, args.size, args.scheduler = side["steps"], side["guidance"], side["size"], side["scheduler"]
    args.num_images, args.concept = 1, args.concept or [str(f) for f in side["concept_files"]]
    return side
