"""``unipers world build``: train the tiny world's base models on CPU and cache them (``$UNIPERS_HOME/world``).

    unipers world build [--root DIR] [--seed S] [--force]     # DIR: default $UNIPERS_HOME/world

Stages, each written atomically and skipped when already present (a killed build resumes at the stage it
was in; ``world.json`` is written last and marks the base complete):

    backbone/     a 4-layer, 128-wide Chameleon: image tokenizer trained (base.py), then AR pre-training
    decoder/      Stable-Diffusion-format folder: VAE trained on the world, UNet at its seeded init
    pairs/        image-caption pairs for align (captions.jsonl)
    align/        the project's align stage: connector + every UNet block (connector.safetensors + delta)
    classifier.safetensors   attribute classifier that judges generated images (demo metric)

The demo's object (``DEMO_OBJECT``) is never drawn in any of it: the base never sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

WORLD_VERSION = "world-v7"
SEED = 0


@dataclass(frozen=True)
class WorldRecipe:
    """What a world base is built from, besides its seed: the demo's base with the defaults. Tests and
    benchmarks build smaller ones (`scaled`); `world.json` records the recipe a base was built with."""

    steps: dict = field(default_factory=lambda: dict(tokenizer=600, pretrain=2000, vae=600, align=2000, classifier=400))
    n_train: int = 4000
    """photos the base models learn from"""
    n_classifier_held: int = 600
    """held-out photos that score the judge"""
    threads: int = 1
    """Intra-op threads of every stage: the same count on every machine, so a base is bitwise the same on a
    given CPU whatever its core count, and a busy machine does not stall it (unipers.runtime)."""
    backbone: dict = field(default_factory=lambda: dict(
        hidden_size=128, num_layers=4, num_heads=4, vocab_size=1536, num_image_tokens=256,
        channel_multiplier=(1, 1, 2, 2)))
    decoder: dict = field(default_factory=lambda: dict(
        # Latents of 8x8x8 (VAE x4 down): the UNet learns layouts of 8x8 cells fast on CPU; the VAE draws patterns.
        cross_attention_dim=64, pooled_dim=64, vae_attention=False, vae_channels=(16, 32, 64), latent_channels=8))

    def scaled(self, share: float, **changes) -> "WorldRecipe":
        """Every stage's steps times `share` (at least one), and any other field changed."""
        return replace(self, steps={k: max(1, round(v * share)) for k, v in self.steps.items()}, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldRecipe":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


RECIPE = WorldRecipe()


def demo_object():
    from unipers.world.synth import WorldObject

    return WorldObject("star", "purple", "striped")


def world_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else the ``world`` cache ($UNIPERS_WORLD_DIR, else $UNIPERS_HOME/world)."""
    from unipers.paths import cache_dir

    return Path(root) if root else cache_dir("world")


def is_built(root: str | os.PathLike | None = None) -> bool:
    info = world_root(root) / "world.json"
    return info.is_file() and json.loads(info.read_text()).get("version") == WORLD_VERSION


def world_config(root: str | os.PathLike | None = None, overrides=()):
    """The Config of the built world: its backbone, decoder and aligned connector (absolute paths)."""
    from unipers.config import load_config

    root = world_root(root).absolute()
    return load_config(["world"], [
        f"backbone.path={root / 'backbone'}", f"decoder.path={root / 'decoder'}",
        f"connector.path={root / 'align' / 'connector.safetensors'}", *overrides])


class Bar:
    """A tqdm bar as a progress callback: ``bar(step, {"loss": x})``."""

    def __init__(self, total: int, desc: str, quiet: bool = False):
        from tqdm.auto import tqdm

        self.tqdm = tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, dynamic_ncols=True, leave=True)

    def __call__(self, step: int, info: dict) -> None:
        self.tqdm.update(1)
        if step % 10 == 0:
            self.tqdm.set_postfix({k: f"{v:.3f}" for k, v in info.items()}, refresh=False)

    def close(self) -> None:
        self.tqdm.close()


@contextmanager
def _bar(total: int, desc: str, quiet: bool):
    bar = Bar(total, desc, quiet)
    try:
        yield bar
    finally:
        bar.close()


def world_corpus() -> str:
    from unipers.world.base import NONCE_NAMES, PLACES, object_names
    from unipers.world.synth import ATTRIBUTES

    words = [w for values in ATTRIBUTES.values() for w in values] + list(NONCE_NAMES) + list(PLACES) * 3
    # Each object's name thrice, so the BPE learns every name as one token, as a concept's identifier is.
    words += [n for o, n in object_names().items() if o != demo_object()] * 3
    # Answers start with the capitalized value ("Circle."), at the start of a line: thrice each, so that
    # answer's first token is the value itself. Otherwise "Circle" and "Cross" both begin with the piece
    # "C", and the first answer token, the one weighted as the decision, decides nothing.
    answers = [w.capitalize() for values in ATTRIBUTES.values() for w in values] * 3
    return " " + " ".join(words) + " object What colour pattern shape does have It is a an\n" + "\n".join(answers) + "\n"


def training_photos(seed: int = SEED, recipe: WorldRecipe = RECIPE):
    """(objects, uint8 images) the base learns from: never the demo object."""
    from unipers.world.synth import render_many, sample_objects

    objects = sample_objects(recipe.n_train, f"{seed}/train", exclude=[demo_object()])
    return objects, render_many(objects, f"{seed}/train")


def build_backbone(out: Path, objects, images, *, seed: int, quiet: bool, held_out=None,
                   recipe: WorldRecipe = RECIPE, corpus: str | None = None, example=None) -> dict:
    """Tokenizer, then AR pre-training, saved to ``out``. ``held_out``: objects the base never hears of
    (default: the demo object; ``benchmarks/bench_world_descriptions.py`` holds out more). ``corpus``
    (the tokenizer's, default `world_corpus`) and ``example`` (`base.pretrain_backbone`'s) let another
    world teach other words (unipers.world.facts)."""
    import torch
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.concepts.bank import ConceptBank
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.tiny import build_tiny_chameleon
    from unipers.world import base, tokenizer

    build_tiny_chameleon(out, seed=seed, corpus=corpus or world_corpus(), **recipe.backbone)
    model = ChameleonForConditionalGeneration.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    pixels = tokenizer.to_pixels(images, processor.image_processor)
    info = {}
    t0 = time.perf_counter()
    with _bar(recipe.steps["tokenizer"], "world: image tokenizer", quiet) as bar:
        info["tokenizer"] = tokenizer.train_image_tokenizer(model, pixels, tokenizer.label_tensor(objects),
                                                       steps=recipe.steps["tokenizer"], seed=seed, progress=bar)
    info["tokenizer"]["seconds"] = round(time.perf_counter() - t0, 1)
    tokens = tokenizer.image_tokens(model, pixels)
    tokenizer.init_image_embeddings(model, seed=seed)
    bank = ConceptBank(model.config.vocab_size, model.config.hidden_size)
    prompts = PromptBuilder(processor.tokenizer, bank, boi_id=processor.image_start_token_id,
                            eoi_id=processor.image_end_token_id)
    t0 = time.perf_counter()
    with _bar(recipe.steps["pretrain"], "world: AR pre-training", quiet) as bar:
        info["pretrain"] = base.pretrain_backbone(model, prompts, tokens, objects, steps=recipe.steps["pretrain"],
                                                  held_out=held_out or [demo_object()], seed=seed, progress=bar,
                                                  example=example)
    info["pretrain"]["seconds"] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        model.save_pretrained(out)
    return info


def build_decoder(out: Path, images, *, seed: int, quiet: bool, recipe: WorldRecipe = RECIPE) -> dict:
    from diffusers import AutoencoderKL

    from unipers.models.tiny_decoder import build_tiny_decoder
    from unipers.world.tokenizer import to_pixels
    from unipers.world.decoder import train_vae

    build_tiny_decoder(out, seed=seed, **recipe.decoder)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    t0 = time.perf_counter()
    with _bar(recipe.steps["vae"], "world: VAE", quiet) as bar:
        info = train_vae(vae, to_pixels(images), steps=recipe.steps["vae"], seed=seed, progress=bar)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(out / "vae")
    vae.save_pretrained(out / "vae")
    return info


def align_caption(obj, rng) -> str:
    """A caption of a photo of ``obj``: full or partial description, plain or through a made-up name bound
    in a prefix sentence (how a concept's generation prompt reads: "<bo> is <slots>. A photo of <bo>.")."""
    from unipers.world.base import _NAMES, _description
    from unipers.world.synth import with_article

    desc = with_article(_description(obj, rng, full=0.6))
    if rng.random() < 0.35:  # the object's own name, as the base was taught it
        return f"A photo of {_NAMES[obj]}."
    return f"A photo of {desc}."


def write_pairs(out: Path, objects, images, *, seed: int, caption=None) -> None:
    """Align's image-caption pairs; ``caption(i, obj, rng)`` writes photo i's caption instead of
    `align_caption` (the facts world names the place)."""
    import random

    from PIL import Image

    rng = random.Random(f"{seed}/captions")
    (out / "images").mkdir(parents=True)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, (obj, img) in enumerate(zip(objects, images)):
            Image.fromarray(img).save(out / "images" / f"{i:05d}.png")
            text = caption(i, obj, rng) if caption else align_caption(obj, rng)
            f.write(json.dumps({"image": f"images/{i:05d}.png", "caption": text}) + "\n")


def run_world_align(root: Path, out: Path, *, seed: int, quiet: bool, recipe: WorldRecipe = RECIPE) -> dict:
    from unipers.config import load_config
    from unipers.models.decoder import DiffusionDecoder
    from unipers.training.run import run_align

    blocks = [n for n, m in DiffusionDecoder.from_pretrained(root / "decoder").unet.named_children()
              if any(True for _ in m.parameters())]
    cfg = load_config(["world"], [
        "stage=align", f"seed={seed}", f"run_dir={out}", f"backbone.path={root / 'backbone'}",
        f"decoder.path={root / 'decoder'}", f"data.pairs={root / 'pairs'}", "data.batch_size=32",
        "connector.path=null",
        f"trainer.max_steps={recipe.steps['align']}", "trainer.lr=0.001", "trainer.weight_decay=0.0",
        "trainer.checkpoint_every=500", "trainer.val_every=0", "trainer.log_every=25",
        f"trainer.progress_bar={not quiet}", "trainer.accelerator=cpu", f"trainer.cpu_threads={recipe.threads}",
        "align.train_decoder=blocks",
        f"align.unfreeze_blocks=[{','.join(blocks)}]", "align.warmup_steps=50", "align.caption_dropout=0.1",
        # Latents encoded once into pairs/cache/ (the default, spelled out): the VAE gives each image the same
        # latents in a chunk of 32 as in a shuffled batch of 32, so align ends bitwise where per-batch
        # encoding ends (checked by tests/world/test_build.py), at 0.76x the step time.
        "data.cache_latents=true",
    ])
    t0 = time.perf_counter()
    run_align(cfg)
    return {"seconds": round(time.perf_counter() - t0, 1), "steps": recipe.steps["align"], "unet_blocks": blocks}


def align_stage(root: Path, *, seed: int, quiet: bool, recipe: WorldRecipe = RECIPE) -> dict:
    """`run_world_align` into ROOT/align.partial, renamed to ROOT/align once it ends: the build resumes by
    that folder, so a killed align is run again rather than taken for done."""
    partial = root / "align.partial"
    shutil.rmtree(partial, ignore_errors=True)
    info = run_world_align(root, partial, seed=seed, quiet=quiet, recipe=recipe)
    shutil.rmtree(root / "align", ignore_errors=True)
    partial.rename(root / "align")
    return info


def build_classifier(path: Path, objects, images, *, seed: int, quiet: bool, recipe: WorldRecipe = RECIPE) -> dict:
    import torch

    from unipers.world.tokenizer import label_tensor
    from unipers.world.decoder import save_classifier, train_classifier
    from unipers.world.synth import all_objects, render_many, sample_objects

    # The judge may see every object, the demo's included: it scores images, it is not the base.
    held = sample_objects(recipe.n_classifier_held, f"{seed}/classifier-held")
    extra = all_objects() * 3
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x_extra = torch.from_numpy(render_many(extra, f"{seed}/classifier")).permute(0, 3, 1, 2).float() / 255
    held_x = torch.from_numpy(render_many(held, f"{seed}/classifier-held")).permute(0, 3, 1, 2).float() / 255
    t0 = time.perf_counter()
    with _bar(recipe.steps["classifier"], "world: attribute classifier", quiet) as bar:
        clf, info = train_classifier(torch.cat([x, x_extra]), torch.cat([label_tensor(objects), label_tensor(extra)]),
                                     held_x, label_tensor(held), steps=recipe.steps["classifier"], seed=seed, progress=bar)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    save_classifier(clf, path)
    return info


def _decoder_side(root: str, seed: int, stages: list[str], recipe: dict) -> dict:
    """The VAE and the judge (``stages``), as ``build_world`` would train them; runs in its own process, so
    the recipe comes as an argument."""
    from unipers.io import atomic_directory
    from unipers.runtime import cpu_threads

    root, recipe = Path(root), WorldRecipe.from_dict(recipe)
    out = {}
    with cpu_threads(recipe.threads):
        objects, images = training_photos(seed, recipe)
        if "decoder" in stages:
            with atomic_directory(root / "decoder", overwrite=True, cache=True) as tmp:
                out["decoder"] = build_decoder(tmp, images, seed=seed, quiet=True, recipe=recipe)
        if "classifier" in stages:
            out["classifier"] = build_classifier(root / "classifier.safetensors", objects, images, seed=seed,
                                                 quiet=True, recipe=recipe)
    return out


def _say(msg: str, quiet: bool) -> None:
    if msg and not quiet:
        print(msg, file=sys.stderr, flush=True)


def build_world(root: str | os.PathLike | None = None, recipe: WorldRecipe = RECIPE, *, force: bool = False,
                quiet: bool = False, seed: int | None = None) -> Path:
    """Build (or finish building) the tiny world under ``root`` by ``recipe``, from world seed ``seed`` (its
    photos and every stage's initialisation and noise; default ``SEED``); returns the root. A built world is
    reused when ``seed`` is None or its own."""
    from unipers.runtime import cpu_threads

    root = world_root(root).absolute()
    if force and root.exists():
        if any(root.iterdir()) and not any((root / f).is_file() for f in ("world.json", "stages.json")):
            raise FileExistsError(f"{root}: not a world folder (no world.json or stages.json); --force deletes "
                                  "only a world that unipers built")
        shutil.rmtree(root)
    if is_built(root):
        built = json.loads((root / "world.json").read_text()).get("seed")
        if seed is not None and built != seed:
            raise FileExistsError(f"{root} holds the world of seed {built}, not {seed}: use another --root, or --force")
        return root
    with cpu_threads(recipe.threads):
        _build_stages(root, SEED if seed is None else seed, quiet, recipe)
    return root


def _build_stages(root: Path, seed: int, quiet: bool, recipe: WorldRecipe) -> None:
    from unipers.io import atomic_directory
    from unipers.runtime import cpu_description
    from unipers.world.process import SecondProcess

    root.mkdir(parents=True, exist_ok=True)
    stages_file = root / "stages.json"
    record = json.loads(stages_file.read_text()) if stages_file.is_file() else {"version": WORLD_VERSION, "seed": seed}
    if (record.get("version"), record.get("seed")) != (WORLD_VERSION, seed):
        raise FileExistsError(
            f"{stages_file}: a part-built {record.get('version', 'older')} world of seed {record.get('seed')}, not "
            f"{WORLD_VERSION} of seed {seed}: rebuild with `unipers world build --force`, or use another --root")
    stages = record.setdefault("stages", {})

    def done(name: str, info: dict) -> None:
        stages[name] = info
        stages_file.write_text(json.dumps(record, indent=2) + "\n")

    t_start = time.perf_counter()
    objects, images = training_photos(seed, recipe)
    todo = [name for name, marker in (("decoder", "decoder/model_index.json"), ("classifier", "classifier.safetensors"))
            if not (root / marker).is_file() or name not in stages]
    # The decoder side does not need the backbone: it trains in a second process meanwhile, one thread
    # each, so a fresh build uses both cores without a thread barrier between them.
    side = SecondProcess("unipers.world.build:_decoder_side", root, root=str(root), seed=seed, stages=todo,
                         recipe=asdict(recipe)) if todo else None
    try:
        if not (root / "backbone" / "config.json").is_file() or "backbone" not in stages:
            _say("world: decoder and judge train in a second process meanwhile" if side else "", quiet)
            with atomic_directory(root / "backbone", overwrite=True, cache=True) as tmp:
                info = build_backbone(tmp, objects, images, seed=seed, quiet=quiet, recipe=recipe)
            done("backbone", info)
        if side:
            _say("world: waiting for the decoder and judge", quiet)
            for name, info in side.result().items():
                done(name, info)
    finally:
        if side:
            side.stop()
    if not (root / "pairs" / "captions.jsonl").is_file():
        with atomic_directory(root / "pairs", overwrite=True, cache=True) as tmp:
            write_pairs(tmp, objects, images, seed=seed)
    if not (root / "align" / "connector.safetensors").is_file() or "align" not in stages:
        done("align", align_stage(root, seed=seed, quiet=quiet, recipe=recipe))
    obj = demo_object()
    info = {"version": WORLD_VERSION, "seed": seed, "held_out_object": obj.attributes(),
            "recipe": asdict(recipe), "stages": stages,
            "cpu": cpu_description(), "seconds_this_call": round(time.perf_counter() - t_start, 1)}
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")


# ---- command line ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="train the tiny world's base models (cached; resumes a killed build)")
    b.add_argument("--root", default=None, help="where to build (default $UNIPERS_WORLD_DIR, else $UNIPERS_HOME/world; UNIPERS_HOME defaults to ~/.cache/unipers)")
    b.add_argument("--seed", type=int, default=None,
                   help=f"world seed: another draw of the photos and of every stage's initialisation (default {SEED})")
    b.add_argument("--force", action="store_true", help="delete and rebuild from scratch")
    b.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    root = build_world(args.root, force=args.force, quiet=args.quiet, seed=args.seed)
    info = json.loads((root / "world.json").read_text())
    print(f"tiny world ready: {root} ({time.perf_counter() - t0:.0f} s)")
    for name, stage in info["stages"].items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in stage.items() if not isinstance(v, (dict, list))))
    return 0
