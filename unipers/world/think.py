"""``generate --think`` measured on the facts world (``unipers.world.facts``; ``benchmarks/bench_think.py``).

    result = run_think("runs/think", seed=0)   # <bo> trained; images with and without --think, judged
    print(format_table(result))

``run_think`` trains ``<bo>`` with the demo's settings and facts (lives in the kitchen, likes the garden) on
photos taken in random places, each captioned with its place (``prepare --captions``), with the facts also
given as statements (so it learns "What do you know about <bo>?", which ``--think`` recalls first). Then for
each place fact it draws the same seeded images for the prompt as written ("A photo of <bo> in the place
where it lives."), for the AR model's rewrite of it (``InferenceSession.think``), for the place spelled out
("... in the kitchen.") and for the place spelled out with the class word instead of ``<bo>`` (what the
decoder does when told), and judges each image's place (``facts.place_of``) and object.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

from unipers.world.facts import PLACE_TINTS, build_facts_world, facts_recipe, facts_root, photo_places, \
    place_of, rewrite_example, say

MEASURED = (  # (fact, prompt, the words the place stands for): facts run_think draws, prompts from REWRITES
    ("home", "A photo of <{c}> in the place where it lives.", "the place where it lives"),
    ("likes", "A photo of <{c}> in the place it likes.", "the place it likes"),
)
N_IMAGES = 48
CONDITIONS = ("as written", "--think", "place named", "class word, place named")

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
        say(f"personalize <{NAME}>: {steps} steps", quiet)
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
        for fact, template, words in MEASURED:
            prompt, place = template.format(c=NAME), targets[fact]
            try:
                rewrite, refused = session.think(prompt, recall=recall), None
            except InputError as err:
                rewrite, refused = None, str(err)
            told = prompt.replace(words, f"the {place}")
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
    for i in range(len(MEASURED)):
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
