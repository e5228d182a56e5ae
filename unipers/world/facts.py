"""The facts world: a tiny world where where an object lives shows in its photos, to measure
``generate --think`` (``benchmarks/bench_think.py``).

    root = build_facts_world()                      # cached: $UNIPERS_HOME/world-facts/<version>-s0
    result = run_think("runs/think", root=root)    # <bo> trained; images with and without --think, judged

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

The measurement (``run_think``) trains ``<bo>`` with the demo's settings and facts (lives in the kitchen,
likes the garden) on photos taken in random places, each captioned with its place. Then for each place
fact it draws the same seeded images for the prompt as written ("A photo of <bo> in the place where it
lives."), for the AR model's rewrite of it (``InferenceSession.think``), for the place spelled out ("... in
the kitchen.") and for the place spelled out with the class word instead of ``<bo>`` (what the decoder
does when told), and judges each image's place and object.
"""

from __future__ import annotations

import json
import random
import shutil
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
MEASURED = (  # (fact, prompt): the place facts run_think draws, in prompts from REWRITES
    ("home", "A photo of <{c}> in the place where it lives."),
    ("likes", "A photo of <{c}> in the place it likes."),
)
N_IMAGES = 48
CONDITIONS = ("as written", "--think", "place named", "class word, place named")


def _say(msg: str, quiet: bool = False) -> None:
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
    from unipers.world.synth import render_many, sample_objects

    objects = sample_objects(recipe.n_train, f"{seed}/train", exclude=[demo_object()])
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
                _say(f"backbone ({recipe.steps['tokenizer']} + {recipe.steps['pretrain']} steps)", quiet)
                held_out = [build.demo_object()]
                with atomic_directory(root / "backbone", overwrite=True, cache=True) as tmp:
                    stages["backbone"] = build.build_backbone(
                        tmp, objects, images, seed=seed, quiet=quiet, held_out=held_out, recipe=recipe,
                        corpus=facts_corpus(), example=facts_example(objects, held_out))
            if side:
                _say("waiting for the VAE and the judge", quiet)
                stages.update(side.result())
        finally:
            if side:
                side.stop()
        if not (root / "pairs" / "captions.jsonl").is_file():
            with atomic_directory(root / "pairs", overwrite=True, cache=True) as tmp:
                build.write_pairs(tmp, objects, images, seed=seed, caption=facts_caption(places))
        if not (root / "align" / "connector.safetensors").is_file():
            _say(f"align ({recipe.steps['align']} steps)", quiet)
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


# ---- measuring --think ------------------------------------------------------------------------------------

def _share(hits, key: str, seed: int) -> dict:
    from unipers.eval.stats import bootstrap_ci

    low, high = bootstrap_ci([float(h) for h in hits], resamples=1000, seed=seed, key=key)
    return {"value": float(np.mean(hits)), "ci_low": low, "ci_high": high, "n": len(hits)}


def judge_images(images, place: str, obj, classifier, key: str, seed: int) -> dict:
    """Share of ``images`` showing ``place`` (with its 95% interval) and attribute match of the object."""
    from unipers.world.demo import attribute_match

    shown = place_of(images)
    hits = [p == place for p in shown]
    return {"place": _share(hits, key, seed), "hits": hits, "places": {p: shown.count(p) for p in sorted(set(shown))},
            "object": attribute_match(classifier, images, obj)}


def base_rewrites(session, n: int = 24, seed: int = 0) -> dict:
    """The base's rewrites with the facts in context, as it was taught, on fresh draws: the share exactly
    right (what a concept's rewrite could reach, were its facts read as well as written ones)."""
    from unipers.world.synth import all_objects

    rng, right, shown = random.Random(f"facts/base-rewrites/{seed}"), 0, []
    for _ in range(n):
        ex = rewrite_example(rng.choice(all_objects()), rng)
        with session.concepts_disabled():
            got = session.ask(ex.question, max_new_tokens=24)
        right += got == ex.answer
        if len(shown) < 4:
            shown.append({"question": ex.question, "expected": ex.answer, "answer": got})
    return {"right": right / n, "n": n, "examples": shown}


def run_think(out, *, root=None, seed: int = 0, steps: int = 2400, world_share: float = 1.0,
              n_images: int = N_IMAGES, captions: bool = True, recall: bool = True, quiet: bool = True,
              overwrite: bool = False) -> dict:
    """Train ``<bo>`` on the facts world and draw each MEASURED prompt as written, as ``--think`` rewrites it
    and with the place spelled out; every image judged for its place and object. ``captions``: each
    photo's generation prompt names its place (`prepare --captions`), else "A photo of <bo>." for all.
    ``recall``: `InferenceSession.think`'s, whether the rewrite follows the model's recall of its facts.
    Writes OUT/think.json, image grids in OUT/images and returns the result."""
    from torchvision.utils import save_image

    from unipers.inference.options import InputError
    from unipers.inference.session import InferenceSession
    from unipers.io import check_output, mark_output
    from unipers.runtime import cpu_description, cpu_threads
    from unipers.eval.stats import paired_test
    from unipers.world import build
    from unipers.world.decoder import load_classifier
    from unipers.world.demo import FACTS, NAME, DemoSettings, demo_config, prepare, train_concept, write_photos

    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    t0, seconds = time.perf_counter(), {}
    recipe = facts_recipe(world_share)
    with cpu_threads(recipe.threads):
        root = build_facts_world(root or facts_root(0, world_share), recipe=recipe, quiet=quiet)
        seconds["world"] = time.perf_counter() - t0
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        mark_output(out, "think")
        obj = build.demo_object()
        places = {key: photo_places(400, f"{seed}/concept/{key}") for key in ("train", "val", "test", "negatives",
                                                                             "val_negatives", "test_negatives")}
        photos = write_photos(out / "photos", seed, tag="facts", backdrop=lambda role, i: PLACE_TINTS[places[role][i]])
        # each photo's generation prompt names its place, so <bo>'s rows learn the object, not five backgrounds
        prompts = {str(p): f"A photo of <{NAME}> in the {places[role][i]}."
                   for role in ("train", "val", "test") for i, p in enumerate(photos[role])}
        # the facts also as statements, so <bo> learns "What do you know about <bo>?", which --think recalls first
        prepare(out / "photos", out / "data" / NAME, seed, photo_prompts=prompts if captions else None,
                statements=True)  # the folder demo_config trains on
        s = DemoSettings(steps=steps, seed=seed, quiet=quiet)
        cfg = demo_config(root, out, s)
        t1 = time.perf_counter()
        _say(f"personalize <{NAME}>: {steps} steps", quiet)
        trained = train_concept(cfg, s.seed, out / f"{NAME}.safetensors")
        seconds["personalize"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        session = InferenceSession.from_config(cfg, device="cpu")
        classifier = load_classifier(root / "classifier.safetensors")
        checks = base_rewrites(session, seed=seed)
        session.load(trained)
        facts = [{"question": q, "answer": session.ask(q, max_new_tokens=24), "expected": a, "key": k}
                 for q, a, k in FACTS]
        recalled = session.recall(NAME)
        targets = {"home": FACTS[0][2], "likes": FACTS[1][2]}
        (out / "images").mkdir()
        rows = []
        for fact, template in MEASURED:
            prompt, place = template.format(c=NAME), targets[fact]
            try:
                rewrite, refused = session.think(prompt, recall=recall), None
            except InputError as err:
                rewrite, refused = None, str(err)
            told = prompt.replace("the place where it lives" if fact == "home" else "the place it likes",
                                  f"the {place}")
            row = {"fact": fact, "place": place, "prompt": prompt, "rewrite": rewrite, "refused": refused,
                   "told": told, "conditions": {}}
            base = f"A photo of a {obj.shape} in the {place}."  # the decoder told the place, without <bo>
            for cond, text in (("as written", prompt), ("--think", rewrite), ("place named", told),
                               ("class word, place named", base)):
                if text is None:
                    continue
                images = session.generate([text], seed=seed, num_images=n_images, steps=s.gen_steps,
                                          guidance=s.guidance).tensors
                tag = f"{fact}_{cond.strip('-').replace(' ', '_')}"
                save_image(images, out / "images" / f"grid_{tag}.png", nrow=8, padding=1)
                row["conditions"][cond] = judge_images(images, place, obj, classifier, f"{fact}/{cond}", seed)
            conds = row["conditions"]
            if "--think" in conds:
                row["think_minus_as_written"] = paired_test(conds["as written"]["hits"], conds["--think"]["hits"],
                                                            seed=seed, key=f"{fact}/think")
            rows.append(row)
        seconds["measure"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    world = json.loads((Path(root) / "world.json").read_text())
    result = {"cpu": cpu_description(), "world": {"root": str(root), "version": world["version"],
                                                   "facts_version": world["facts_version"], "seed": world["seed"],
                                                   "recipe_steps": world["recipe"]["steps"]},
              "settings": {"steps": steps, "seed": seed, "n_images": n_images, "captions": captions, "recall": recall,
                           "gen_steps": s.gen_steps,
                           "guidance": s.guidance, "world_share": world_share},
              "concept": {"name": f"<{NAME}>", "object": obj.attributes(), "facts": facts, "recall": recalled},
              "base_rewrites": checks, "rows": rows, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    (out / "think.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(r: dict) -> str:
    """A markdown table of ``run_think``'s result."""
    def cell(c: dict, cond: str) -> str:
        if cond not in c:
            return "refused" if cond == "--think" else "–"
        p = c[cond]["place"]
        return f"{p['value']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"

    st = r["settings"]
    captions = ("each photo captioned with its place" if st.get("captions", False)
                else 'every photo captioned "A photo of <bo>."')
    captions += "; --think recalls first" if st.get("recall", True) else "; --think without the recall"
    lines = [f"`<bo>` trained {st['steps']} steps on the facts world ({r['world']['version']}, "
             f"{r['world']['facts_version']}, seed {r['world']['seed']}), {captions}; demo seed {st['seed']}; "
             f"{st['n_images']} seeded images per prompt, the same seeds in every column. Share of images in the "
             "fact's place, 95% bootstrap interval; object: attribute match.", "",
             "| fact | prompt | --think rewrite | " + " | ".join(CONDITIONS) + " | --think − as written (paired, p) "
             "| object: " + " / ".join(CONDITIONS) + " |",
             "|---|---|---|" + "---|" * len(CONDITIONS) + "---|---|"]
    for row in r["rows"]:
        c = row["conditions"]
        diff = row.get("think_minus_as_written")
        d = (f"{diff['diff']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}], p {diff['p_value']:.3f}"
             if diff else "–")
        objs = " / ".join(f"{c[k]['object']['mean']:.2f}" if k in c else "–" for k in CONDITIONS)
        lines.append(f"| {row['place']} | {row['prompt']} | {row['rewrite'] or row['refused']} | "
                     + " | ".join(cell(c, k) for k in CONDITIONS) + f" | {d} | {objs} |")
    facts = "; ".join(f"{f['question']} → {f['answer']}" for f in r["concept"]["facts"])
    b = r["base_rewrites"]
    lines += ["", f"The concept's answers: {facts}",
              f"Its recall, before each rewrite: {r['concept'].get('recall', '(none)')}",
              f"The base's own rewrites, facts in context (as taught): {b['right']:.2f} of {b['n']} exact.",
              f"CPU: {r['cpu']['model']} (torch kernels {r['cpu']['torch_capability']}). Time (s): "
              + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()) + ".", ""]
    return "\n".join(lines)


def format_seeds(results: list) -> str:
    """Per fact and condition, the share of images in the fact's place for each seed's run, and the rewrites."""
    seeds = [r["settings"]["seed"] for r in results]
    lines = [f"Share of images in the fact's place, per seed ({', '.join(map(str, seeds))}): the demo seed draws "
             "<bo>'s photos, its training and the image seeds; the facts world is the same.", "",
             "| fact | condition | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for i, (fact, _) in enumerate(MEASURED):
        place = results[0]["rows"][i]["place"]
        named = ["refused" if r["rows"][i]["rewrite"] is None else
                 ("yes" if f"the {place}" in r["rows"][i]["rewrite"] else "no") for r in results]
        lines.append(f"| {place} | the --think rewrite names the {place} | " + " | ".join(named)
                     + f" | {named.count('yes')} of {len(named)} |")
        for cond in CONDITIONS:
            vals = [r["rows"][i]["conditions"].get(cond, {}).get("place", {}).get("value") for r in results]
            got = [v for v in vals if v is not None]
            mean = (f"{np.mean(got):.2f}" + ("" if len(got) == len(vals) else f" (the {len(got)} drawn)")) if got else "–"
            missing = "refused" if cond == "--think" else "–"
            cells = " | ".join(missing if v is None else f"{v:.2f}" for v in vals)
            lines.append(f"| {results[0]['rows'][i]['place']} | {cond} | {cells} | {mean} |")
    lines += ["", "Rewrites: " + "; ".join(f"seed {r['settings']['seed']}: " + ", ".join(
        f"{row['fact']} → {row['rewrite'] or 'refused'}" for row in r["rows"]) for r in results), ""]
    return "\n".join(lines)
