"""The facts world: a tiny world where where an object lives shows in its photos, to measure
``generate --think`` (``benchmarks/bench_think.py``).

    root = build_facts_world()          # cached: $UNIPERS_HOME/world-facts/<version>-s0
    place_of(images)                    # the place each picture shows

In the demo world a photo's background is a drawn grey, so a fact such as "<bo> lives in the kitchen" has
nothing to show. Here every photo is taken in one of the world's places and the place sets its background
colour (``PLACE_TINTS``); align's captions name the place ("A photo of a red dotted circle in the
kitchen."), so the decoder learns to draw a named place; and the AR base also learns to rewrite an image
prompt with the facts given in context (``rewrite_example``: "zib lives in the kitchen. zib likes the
garden. Rewrite this image prompt with what you know about zib: A photo of zib in the place where it
lives." -> "A photo of zib in the kitchen."). ``place_of`` judges which place a picture shows: the place
whose tint is nearest its border's median colour.

Otherwise the base is the demo world's: same recipe but a longer align (ALIGN_STEPS), same seed, training
objects (the demo object held out) and pre-training mix. It is built apart, so the demo world, and every
figure measured on it, is unchanged.

The measurement of ``--think`` on it is ``unipers.world.think``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

FACTS_VERSION = "facts-v2"
PLACE_TINTS = {  # muted and far apart (nearest pair 67 apart in RGB), so a blurred picture still reads
    "kitchen": (170, 100, 40),
    "garden": (45, 125, 55),
    "park": (120, 145, 45),
    "beach": (195, 175, 125),
    "library": (115, 40, 55),
    "forest": (20, 55, 35),
    "street": (100, 100, 105),
    "room": (55, 65, 150),
}
REWRITE_SHARE = 0.12
"""Share of the base's pre-training examples that are prompt rewrites (the rest: the demo world's mix)."""
PLACE_CAPTION_SHARE = 0.8
"""Share of align captions naming the place; the others teach the decoder a place it is not told."""
REWRITES = (  # (prompt, rewrite) with {c} the name and {home} / {likes} its places
    ("A photo of {c} in the place where it lives.", "A photo of {c} in the {home}."),
    ("A photo of {c} in the place it likes.", "A photo of {c} in the {likes}."),
    ("A picture of {c} at home.", "A picture of {c} in the {home}."),
    ("{c} where it likes to be.", "{c} in the {likes}."),
    ("A photo of {c}.", "A photo of {c}."),  # nothing to add: the prompt stays as it is
    ("A photo of {c} in the {other}.", "A photo of {c} in the {other}."),  # a place already named stays
)
ALIGN_STEPS = 6000
"""Align steps of the facts world (the demo world's: 2,000). With 2,000 the decoder drew the place it was
told in a quarter of its pictures of a star (1 in 8 by chance); with 6,000, in 63 of 64."""


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[facts] {msg}", file=sys.stderr, flush=True)


# ---- places you can see ----------------------------------------------------------------------------------

def check_places() -> None:
    """Every place the base talks about has a tint (a new place would otherwise be judged as another)."""
    from unipers.world.base import PLACES

    if set(PLACES) != set(PLACE_TINTS):
        raise ValueError(f"places without a tint or tints without a place: {sorted(set(PLACES) ^ set(PLACE_TINTS))}")


def place_of(images) -> list[str]:
    """The place each picture shows: the tint nearest the median colour of its two-pixel border.
    ``images``: (N, H, W, 3) uint8, or (N, 3, H, W) floats in [0, 1] (generated tensors). The object
    keeps a margin from the edges (synth.render), so the border is background but for a shape's tip,
    which the median ignores."""
    x = np.asarray(images.detach().cpu().float().permute(0, 2, 3, 1) * 255 if hasattr(images, "permute") else images,
                   dtype=np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"place_of takes (N, H, W, 3) or (N, 3, H, W) pictures, not shape {tuple(x.shape)}")
    ring = np.ones(x.shape[1:3], bool)
    ring[2:-2, 2:-2] = False
    colour = np.median(x[:, ring], axis=1)  # (N, 3)
    names = list(PLACE_TINTS)
    tints = np.array([PLACE_TINTS[n] for n in names], dtype=np.float64)
    nearest = ((colour[:, None, :] - tints[None]) ** 2).sum(-1).argmin(1)
    return [names[i] for i in nearest]


def photo_places(n: int, key: str) -> list[str]:
    """``n`` places drawn uniformly (seeded by ``key``)."""
    from unipers.world.base import PLACES

    rng = random.Random(f"facts/places/{key}")
    return [rng.choice(PLACES) for _ in range(n)]


def facts_photos(seed: int, recipe):
    """(objects, places, uint8 images) the facts base learns from: the demo world's training objects, each
    photographed in a drawn place."""
    from unipers.world.build import demo_object
    from unipers.world.compose import training_objects
    from unipers.world.synth import render_many

    objects = training_objects([demo_object()], seed, recipe)
    places = photo_places(len(objects), f"{seed}/train")
    return objects, places, render_many(objects, f"{seed}/train", tints=[PLACE_TINTS[p] for p in places])


# ---- what the base learns --------------------------------------------------------------------------------

def rewrite_example(obj, rng: random.Random):
    """A prompt rewrite with the facts in context, as `InferenceSession.think` asks a concept's: "zib is a
    purple striped star, living in the kitchen and liking the garden. Rewrite this image prompt with what
    you know about zib: A photo of zib in the place where it lives." -> "A photo of zib in the kitchen.".
    Half of them state the facts as sentences after the description ("zib is a purple striped star. zib
    likes the garden. zib lives in the kitchen. zib is purple. Rewrite ..."), the way a concept's recall
    (`InferenceSession.recall`) writes them before the question."""
    from unipers.inference.session import THINK_QUESTION
    from unipers.world.base import NONCE_NAMES, PLACES, WorldText
    from unipers.world.synth import with_article

    name = rng.choice(NONCE_NAMES)
    home, likes, other = (rng.choice(PLACES) for _ in range(3))
    prompt, rewrite = rng.choice(REWRITES)
    fill = dict(c=name, home=home, likes=likes, other=other)
    if rng.random() < 0.5:
        context = f"{name} is {with_article(obj.describe())}, living in the {home} and liking the {likes}. "
    else:
        said = [f"{name} lives in the {home}.", f"{name} likes the {likes}.", f"{name} is {obj.colour}."]
        rng.shuffle(said)
        context = f"{name} is {with_article(obj.describe())}. " + " ".join(said) + " "
    return WorldText(context + THINK_QUESTION.format(concepts=name, prompt=prompt.format(**fill)), rewrite.format(**fill))


def facts_example(objects, held_out):
    """`base.pretrain_backbone`'s ``example``: a rewrite (REWRITE_SHARE of them), else the demo world's."""
    from unipers.world.base import world_example

    def example(i: int, rng: random.Random):
        if rng.random() < REWRITE_SHARE:
            return rewrite_example(objects[i], rng)
        return world_example(objects[i], rng, held_out)

    return example


def facts_caption(places):
    """`build.write_pairs`' ``caption``: the demo world's caption, naming the photo's place most times."""
    from unipers.world.build import align_caption

    def caption(i: int, obj, rng: random.Random) -> str:
        text = align_caption(obj, rng)
        return text[:-1] + f" in the {places[i]}." if rng.random() < PLACE_CAPTION_SHARE else text

    return caption


def facts_corpus() -> str:
    """The demo world's tokenizer corpus and the words of rewrites, so each is one or two tokens."""
    from unipers.inference.session import THINK_QUESTION
    from unipers.world.build import world_corpus

    words = " ".join(THINK_QUESTION.format(concepts="", prompt="").split())
    return world_corpus() + (" " + words + " place where it lives likes picture at home to be in the") * 3 + "\n"


# ---- the base ---------------------------------------------------------------------------------------------

def facts_recipe(share: float = 1.0):
    """The demo world's recipe with ALIGN_STEPS of align, times ``share``."""
    from unipers.world.build import RECIPE

    recipe = replace(RECIPE, steps=dict(RECIPE.steps, align=ALIGN_STEPS))
    return recipe if share == 1.0 else recipe.scaled(share)


def facts_root(seed: int = 0, share: float = 1.0) -> Path:
    from unipers.paths import home
    from unipers.world.build import WORLD_VERSION

    scale = "" if share == 1.0 else f"-x{share:g}"
    return home() / "world-facts" / f"{WORLD_VERSION}-{FACTS_VERSION}-s{seed}{scale}"


def build_facts_world(root=None, *, seed: int = 0, recipe=None, quiet: bool = True) -> Path:
    """Build (or finish) the facts world under ``root`` (default ``facts_root``): backbone, then the VAE
    and attribute judge (in a second process meanwhile), align pairs and align, as ``unipers world build``
    does; world.json last. Each stage folder is written atomically and skipped when there."""
    from unipers.io import atomic_directory
    from unipers.runtime import cpu_description, cpu_threads
    from unipers.world import build
    from unipers.world.process import SecondProcess

    check_places()
    recipe = recipe or facts_recipe()
    root = Path(root or facts_root(seed, 1.0)).absolute()
    if (root / "world.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    t0, stages = time.perf_counter(), {}
    with cpu_threads(recipe.threads):
        objects, places, images = facts_photos(seed, recipe)
        todo = [n for n, m in (("decoder", "decoder/model_index.json"), ("classifier", "classifier.safetensors"))
                if not (root / m).is_file()]
        side = SecondProcess("unipers.world.facts:_decoder_side", root, root=str(root), seed=seed, stages=todo,
                             recipe=asdict(recipe)) if todo else None
        try:
            if not (root / "backbone" / "config.json").is_file():
                say(f"backbone ({recipe.steps['tokenizer']} + {recipe.steps['pretrain']} steps)", quiet)
                held_out = [build.demo_object()]
                with atomic_directory(root / "backbone", overwrite=True, cache=True) as tmp:
                    stages["backbone"] = build.build_backbone(
                        tmp, objects, images, seed=seed, quiet=quiet, held_out=held_out, recipe=recipe,
                        corpus=facts_corpus(), example=facts_example(objects, held_out))
            if side:
                say("waiting for the VAE and the judge", quiet)
                stages.update(side.result())
        finally:
            if side:
                side.stop()
        if not (root / "pairs" / "captions.jsonl").is_file():
            with atomic_directory(root / "pairs", overwrite=True, cache=True) as tmp:
                build.write_pairs(tmp, objects, images, seed=seed, caption=facts_caption(places))
        if not (root / "align" / "connector.safetensors").is_file():
            say(f"align ({recipe.steps['align']} steps)", quiet)
            stages["align"] = build.align_stage(root, seed=seed, quiet=quiet, recipe=recipe)
    info = {"version": build.WORLD_VERSION, "facts_version": FACTS_VERSION, "seed": seed,
            "held_out_object": build.demo_object().attributes(), "recipe": asdict(recipe), "stages": stages,
            "place_tints": PLACE_TINTS, "cpu": cpu_description(),
            "seconds_this_call": round(time.perf_counter() - t0, 1)}
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


def _decoder_side(root: str, seed: int, stages: list, recipe: dict) -> dict:
    """The VAE and the judge of ``build_facts_world``, in its second process."""
    from unipers.io import atomic_directory
    from unipers.runtime import cpu_threads
    from unipers.world import build

    root, recipe, out = Path(root), build.WorldRecipe.from_dict(recipe), {}
    with cpu_threads(recipe.threads):
        objects, _, images = facts_photos(seed, recipe)
        if "decoder" in stages:
            with atomic_directory(root / "decoder", overwrite=True, cache=True) as tmp:
                out["decoder"] = build.build_decoder(tmp, images, seed=seed, quiet=True, recipe=recipe)
        if "classifier" in stages:
            out["classifier"] = build.build_classifier(root / "classifier.safetensors", objects, images, seed=seed,
                                                       quiet=True, recipe=recipe)
    return out
