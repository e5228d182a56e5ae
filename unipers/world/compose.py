"""Composition on the tiny world: concepts trained apart and loaded together, against one joint run.

    python benchmarks/bench_composition.py [--concepts 3] [--steps 2400] [--seed 0] [--out DIR]

Concepts are world objects the base never saw: the demo's object (``<bo>``, a purple striped star), one of
its near-misses (two of three attributes shared) and, for three or four concepts, objects sharing at most
one attribute with every other (``choose_objects``: seeded). The cached demo world saw every object but the
demo's (its 4,000 training photos cover the other 167), so by default the benchmark builds its own base by
the demo world's recipe and seed with all the chosen objects held out of the photos, texts, negatives, VAE
and align pairs (``build_held_out_world``, cached under $UNIPERS_HOME/world-compose/); ``root`` takes any
built world instead, and the result says which concepts its base saw.

Each concept gets the demo's photos and ``prepare`` (unipers.world.demo), trains in its own run with the
demo's settings (``demo_config``), and all of them train once more in one joint run of steps x concepts
steps. Measured for every concept with (a) its file alone, (b) every separately trained file in one
session, (c) the joint file: P(yes) per test photo (``session.recognize``) rated by the demo's
``recognition_rates`` on its own 24 test photos and 24 test negatives, the same photos in every condition
(alone, this is ``unipers eval``'s held-out recognition, the demo's headline: both are recorded); and
"which of these is it?": the loaded concept of highest P(yes) for each concept's test photos. ``unipers
eval`` itself (``held_out_results``) is recorded too, but with several concepts loaded it adds the other
concepts' positives to each one's negatives (``load_targets``): a larger test set, not comparable to alone.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

NAMES = ("bo", "mam", "tiv", "wug")
"""Concept names, in choice order: ``bo`` is the demo's object, ``mam`` its near-miss partner."""
CONDITIONS = ("alone", "together", "joint")


def _say(msg: str, quiet: bool = False) -> None:
    """A stage line on stderr (always: `quiet` turns the progress bars off, not these)."""
    print(f"[compose] {msg}", file=sys.stderr, flush=True)


# ---- which objects ----------------------------------------------------------------------------------------

def choose_objects(n: int = 3, seed: int = 0) -> list:
    """``n`` (2-4) objects: the demo's, a seeded near-miss of it, then seeded objects sharing at most one
    attribute with every one chosen before."""
    from unipers.world.build import demo_object
    from unipers.world.synth import all_objects, near_misses

    if not 2 <= n <= len(NAMES):
        raise ValueError(f"concepts: 2 to {len(NAMES)}, not {n}")
    rng = random.Random(f"compose/{seed}/objects")
    chosen = [demo_object()]
    chosen.append(rng.choice(near_misses(chosen[0])))
    while len(chosen) < n:
        chosen.append(rng.choice([o for o in all_objects() if all(o.shared(c) <= 1 for c in chosen)]))
    return chosen


def concept_facts(names, objects, seed: int = 0) -> dict:
    """Per concept, the demo's three facts (home, what it likes, colour): ``<bo>``'s are the demo's own,
    the others' places are drawn (seeded) from the world's places no other concept uses."""
    from unipers.world.base import PLACES
    from unipers.world.demo import FACTS, NAME

    rng = random.Random(f"compose/{seed}/facts")
    free = [p for p in PLACES if p not in ("kitchen", "garden")]
    out = {}
    for name, obj in zip(names, objects):
        if name == NAME:
            out[name] = [list(f) for f in FACTS]
            continue
        home, likes = rng.sample(free, 2)
        free = [p for p in free if p not in (home, likes)]
        out[name] = [[f"Where does <{name}> live?", f"<{name}> lives in the {home}.", home],
                     [f"What does <{name}> like?", f"<{name}> likes the {likes}.", likes],
                     [f"What colour is <{name}>?", f"<{name}> is {obj.colour}.", obj.colour]]
    return out


# ---- a base that never saw them ---------------------------------------------------------------------------

def training_objects(held_out, seed: int | None = None, recipe=None) -> list:
    """The objects of a world base's training photos when ``held_out`` are kept out (as ``build_world``
    draws them with the demo object alone held out)."""
    from unipers.world.build import RECIPE, SEED
    from unipers.world.synth import sample_objects

    recipe = recipe or RECIPE
    return sample_objects(recipe.n_train, f"{SEED if seed is None else seed}/train", exclude=held_out)


def base_saw(root: Path, objects) -> list[bool]:
    """Per object, whether the world base at ``root`` had it among its training photos (world.json)."""
    from unipers.world.build import WorldRecipe
    from unipers.world.synth import WorldObject

    info = json.loads((Path(root) / "world.json").read_text())
    held = info.get("held_out_objects") or [info["held_out_object"]]
    seen = set(training_objects([WorldObject(**h) for h in held], info["seed"], WorldRecipe.from_dict(info["recipe"])))
    return [o in seen for o in objects]


def held_out_root(objects, seed: int, share: float = 1.0) -> Path:
    from unipers.paths import home
    from unipers.world.build import WORLD_VERSION

    key = hashlib.sha1(" ".join(sorted(map(str, objects))).encode()).hexdigest()[:10]
    scale = "" if share == 1.0 else f"-x{share:g}"
    return home() / "world-compose" / f"{WORLD_VERSION}-s{seed}{scale}-{key}"


def build_held_out_world(root: Path, held_out, *, seed: int | None = None, recipe=None, quiet: bool = True) -> Path:
    """A world base as ``unipers world build`` trains it (same recipe and seed), with ``held_out`` kept out
    of its photos, texts and negatives (backbone), its VAE's photos and its align pairs. No judge (this
    benchmark generates no images). Reused when world.json is there; stage folders are written atomically."""
    from unipers.io import atomic_directory
    from unipers.runtime import cpu_description, cpu_threads
    from unipers.world import build
    from unipers.world.process import SecondProcess
    from unipers.world.synth import render_many

    seed, recipe, root = build.SEED if seed is None else seed, recipe or build.RECIPE, Path(root).absolute()
    if (root / "world.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    t0, stages = time.perf_counter(), {}
    with cpu_threads(recipe.threads):
        objects = training_objects(held_out, seed, recipe)
        images = render_many(objects, f"{seed}/train")
        side = None
        if not (root / "decoder" / "model_index.json").is_file():  # the VAE trains meanwhile, as in the build
            side = SecondProcess("unipers.world.compose:_held_out_decoder", root, root=str(root), seed=seed,
                                 held_out=[o.attributes() for o in held_out], recipe=asdict(recipe))
        try:
            if not (root / "backbone" / "config.json").is_file():
                _say(f"held-out world: backbone ({recipe.steps['tokenizer']} + {recipe.steps['pretrain']} steps)")
                with atomic_directory(root / "backbone", overwrite=True, cache=True) as tmp:
                    stages["backbone"] = build.build_backbone(tmp, objects, images, seed=seed, quiet=quiet,
                                                              held_out=list(held_out), recipe=recipe)
            if side:
                _say("held-out world: waiting for the VAE", quiet)
                stages["decoder"] = side.result()
        finally:
            if side:
                side.stop()
        if not (root / "pairs" / "captions.jsonl").is_file():
            with atomic_directory(root / "pairs", overwrite=True, cache=True) as tmp:
                build.write_pairs(tmp, objects, images, seed=seed)
        if not (root / "align" / "connector.safetensors").is_file():
            _say(f"held-out world: align ({recipe.steps['align']} steps)", quiet)
            stages["align"] = build.align_stage(root, seed=seed, quiet=quiet, recipe=recipe)
    info = {"version": build.WORLD_VERSION, "seed": seed, "held_out_object": build.demo_object().attributes(),
            "held_out_objects": [o.attributes() for o in held_out], "recipe": asdict(recipe), "stages": stages,
            "cpu": cpu_description(), "seconds_this_call": round(time.perf_counter() - t0, 1),
            "note": "built by unipers.world.compose: no judge (classifier.safetensors)"}
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


def _held_out_decoder(root: str, seed: int, held_out: list, recipe: dict) -> dict:
    """The VAE of ``build_held_out_world``, in its second process (as build._decoder_side)."""
    from unipers.io import atomic_directory
    from unipers.runtime import cpu_threads
    from unipers.world import build
    from unipers.world.synth import WorldObject, render_many

    recipe = build.WorldRecipe.from_dict(recipe)
    with cpu_threads(recipe.threads):
        images = render_many(training_objects([WorldObject(**h) for h in held_out], seed, recipe), f"{seed}/train")
        with atomic_directory(Path(root) / "decoder", overwrite=True, cache=True) as tmp:
            return build.build_decoder(tmp, images, seed=seed, quiet=True, recipe=recipe)


# ---- photos, training -------------------------------------------------------------------------------------

def write_concepts(out: Path, names, objects, facts: dict, seed: int) -> dict:
    """Per concept: the demo's photos of its object (``<bo>``'s are the demo's very photos) and its
    prepared folder. Returns {name: {"photos": {role: [paths]}, "data": folder}}."""
    from unipers.world.demo import NAME, prepare, write_photos

    made = {}
    for name, obj in zip(names, objects):
        folder = out / "concepts" / name
        photos = write_photos(folder / "photos", seed, obj, tag="demo" if name == NAME else f"compose/{name}")
        data = prepare(folder / "photos", folder / "data" / name, seed, name=name, obj=obj,
                       facts=[tuple(f) for f in facts[name]])
        made[name] = {"photos": photos, "data": data}
    return made


def train_job(root: str, out: str, concepts: list, steps: int, seed: int, batch_size: int, lr: float,
              quiet: bool = True) -> dict:
    """One training run with the demo's config (``demo_config``) on the prepared folders ``concepts``;
    the trained file is copied to OUT/concepts.safetensors. Module-level, so a second process can run it."""

    from unipers.runtime import cpu_threads
    from unipers.world.build import RECIPE
    from unipers.world.demo import DemoSettings, demo_config, train_concept

    t0 = time.perf_counter()
    s = DemoSettings(steps=steps, seed=seed, batch_size=batch_size, lr=lr, quiet=quiet)
    cfg = demo_config(Path(root), Path(out), s, concepts=[Path(c) for c in concepts])
    with cpu_threads(RECIPE.threads):
        trained = train_concept(cfg, s.seed, Path(out) / "concepts.safetensors")  # as the demo trains
    return {"file": str(trained), "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}


def train_all(root: Path, out: Path, names, made: dict, steps: int, joint_steps: int, s, jobs: int) -> dict:
    """Every separate run, then the joint run; with ``jobs=2`` the joint run trains in a second process
    meanwhile (each run on one thread, so the numbers do not change)."""
    from unipers.world.process import SecondProcess

    common = dict(root=str(root), seed=s.seed, batch_size=s.batch_size, lr=s.lr)
    joint_args = dict(common, out=str(out / "runs" / "joint"), concepts=[str(made[n]["data"]) for n in names],
                      steps=joint_steps)
    side = SecondProcess("unipers.world.compose:train_job", out, **joint_args) if jobs > 1 else None
    runs = {}
    try:
        for name in names:
            _say(f"train <{name}> alone: {steps} steps", s.quiet)
            runs[name] = train_job(out=str(out / "runs" / name), concepts=[str(made[name]["data"])], steps=steps,
                                   quiet=s.quiet, **common)
        _say(f"train {', '.join(f'<{n}>' for n in names)} jointly: {joint_steps} steps"
             + (" (second process, started with the first)" if side else ""), s.quiet)
        runs["joint"] = side.result() if side else train_job(**joint_args, quiet=s.quiet)
    finally:
        if side:
            side.stop()
    return runs


# ---- measuring --------------------------------------------------------------------------------------------

def measure_loaded(session, names, made: dict, out: Path) -> dict:
    """P(yes) of each loaded concept of ``names`` for every concept's test photos, then its own test
    negatives. {name: {"probs": [...], "photos": [...]}}."""
    tests = [p for n in made for p in made[n]["photos"]["test"]]
    got = {}
    for name in names:
        photos = [*tests, *made[name]["photos"]["test_negatives"]]
        got[name] = {"probs": session.recognize(name, photos), "photos": [str(p.relative_to(out)) for p in photos]}
    return got


def rate(name: str, probs: list, made: dict) -> dict:
    """The demo's recognition rates of one concept: its own test photos, then its own test negatives."""
    from unipers.world.demo import recognition_rates

    n_tests = [len(made[n]["photos"]["test"]) for n in made]
    start = list(made).index(name)
    first = sum(n_tests[:start])
    own = probs[first:first + n_tests[start]] + probs[sum(n_tests):]
    rates = recognition_rates(own, n_tests[start])
    others = [p for i, p in enumerate(probs[:sum(n_tests)]) if not first <= i < first + n_tests[start]]
    rates["other_concepts_accepted"] = sum(p > 0.5 for p in others) / max(1, len(others))
    return rates


def which_is(probs: dict, made: dict) -> dict:
    """For each test photo of each concept: the concept of highest P(yes) among ``probs``' (ties: the
    first); accuracy and {true: {picked: count}}."""
    names, truth = list(probs), [n for n in made for _ in made[n]["photos"]["test"]]
    confusion = {n: {m: 0 for m in names} for n in made}
    for i, t in enumerate(truth):
        picked = max(names, key=lambda m: probs[m]["probs"][i])
        confusion[t][picked] += 1
    right = sum(confusion[n].get(n, 0) for n in made)
    return {"accuracy": right / len(truth), "n_photos": len(truth), "confusion": confusion}


def measure_all(cfg, files: dict, made: dict, out: Path, quiet: bool) -> dict:
    """The three conditions: alone, together (every separate file in one session), joint."""
    from unipers.inference.session import InferenceSession
    from unipers.world.demo import held_out_results

    session = InferenceSession.from_config(cfg, device="cpu")
    names, data = list(made), [made[n]["data"] for n in made]
    res, probs = {c: {} for c in CONDITIONS}, {c: {} for c in CONDITIONS}
    for name in names:
        _say(f"measure <{name}> alone", quiet)
        session.unload()
        session.load(files[name])
        probs["alone"].update(measure_loaded(session, [name], made, out))
        ev = held_out_results(cfg, session, [files[name]], [made[name]["data"]], out / "eval" / "alone" / name)
        res["alone"][name] = {"eval": ev["concepts"][name], "eval_counts": ev["results"][-1]["counts"][name]}
    for cond, group in (("together", [files[n] for n in names]), ("joint", [files["joint"]])):
        _say(f"measure {cond}: {', '.join(Path(f).parent.name for f in group)} loaded", quiet)
        session.unload()
        for f in group:
            session.load(f)
        probs[cond] = measure_loaded(session, names, made, out)
        ev = held_out_results(cfg, session, group, data, out / "eval" / cond)
        res[cond] = {n: {"eval": ev["concepts"][n], "eval_counts": ev["results"][-1]["counts"][n]} for n in names}
    for cond in CONDITIONS:
        for n in names:
            res[cond][n]["recognize"] = rate(n, probs[cond][n]["probs"], made)
            res[cond][n]["probs"] = dict(zip(probs[cond][n]["photos"], probs[cond][n]["probs"]))
    which = {c: which_is(probs[c], made) for c in CONDITIONS}
    shift = {n: max(abs(a - b) for a, b in zip(probs["alone"][n]["probs"], probs["together"][n]["probs"]))
             for n in names}
    return {"conditions": res, "which_is": which, "max_abs_p_yes_change_together_vs_alone": shift}


# ---- the whole benchmark ----------------------------------------------------------------------------------

def run_composition(out: Path, *, n: int = 3, steps: int = 2400, seed: int = 0, root=None, world_share: float = 1.0,
                    jobs: int = 2, quiet: bool = True, overwrite: bool = False) -> dict:
    from unipers.io import check_output, mark_output
    from unipers.runtime import cpu_description, cpu_threads
    from unipers.world.build import RECIPE, build_world
    from unipers.world.demo import DemoSettings, demo_config

    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    t0, seconds = time.perf_counter(), {}
    names, objects = list(NAMES[:n]), choose_objects(n, seed)
    with cpu_threads(RECIPE.threads):
        if root is None:
            recipe = RECIPE if world_share == 1.0 else RECIPE.scaled(world_share)
            root = build_held_out_world(held_out_root(objects, 0, world_share), objects, recipe=recipe, quiet=quiet)
        else:
            root = build_world(root, quiet=quiet)
        seconds["world"] = time.perf_counter() - t0
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        mark_output(out, "composition")
        facts = concept_facts(names, objects, seed)
        made = write_concepts(out, names, objects, facts, seed)
        s, joint_steps, t1 = DemoSettings(steps=steps, seed=seed, quiet=quiet), steps * n, time.perf_counter()
        runs = train_all(root, out, names, made, steps, joint_steps, s, jobs)
        seconds["training"] = time.perf_counter() - t1
        files = {k: Path(v["file"]) for k, v in runs.items()}
        cfg, t1 = demo_config(root, out / "runs" / names[0], s, concepts=[made[names[0]]["data"]]), time.perf_counter()
        measured = measure_all(cfg, files, made, out, quiet)
        seconds["measuring"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    world = json.loads((Path(root) / "world.json").read_text())
    result = {
        "cpu": cpu_description(), "threads": RECIPE.threads,
        "world": {"root": str(root), "version": world["version"], "seed": world["seed"],
                  "held_out_objects": world.get("held_out_objects") or [world["held_out_object"]],
                  "recipe_steps": world["recipe"]["steps"]},
        "settings": {"concepts": n, "seed": seed, "steps_separate": steps, "steps_joint": joint_steps,
                     "batch_size": s.batch_size, "lr": s.lr, "jobs": jobs, "world_share": world_share,
                     "joint_steps_rule": "steps x concepts at the same batch size: the sampler pools every "
                     "concept's samples within a task, so each concept fills about 1/concepts of every batch "
                     "and sees as many samples (steps x batch) as in its own run"},
        "concepts": {nm: {"object": o.attributes(), "describe": str(o), "base_saw": saw, "facts": facts[nm],
                          "data": str(made[nm]["data"])}
                     for nm, o, saw in zip(names, objects, base_saw(root, objects))},
        "near_miss_pairs": [[a, b] for i, a in enumerate(names) for b in names[i + 1:]
                            if objects[i].shared(objects[names.index(b)]) == 2],
        "runs": runs, **measured, "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    summarize(result)
    (out / "composition.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarize(r: dict) -> dict:
    """The headline figures of a result (in place): held-out recognition per condition and concept on the
    same photos (own test photos and test negatives), together - alone, joint - alone, the verdict, and
    ``unipers eval``'s weighted recognition beside them."""
    cond = r["conditions"]
    names = list(r["concepts"])
    w = {c: {n: cond[c][n]["recognize"]["weighted"] for n in names} for c in CONDITIONS}
    r["held_out_recognition"] = w
    r["eval_weighted"] = {c: {n: cond[c][n]["eval"]["recognition/weighted"] for n in names} for c in CONDITIONS}
    r["alone_equals_eval"] = all(abs(w["alone"][n] - r["eval_weighted"]["alone"][n]) < 1e-9 for n in names)
    r["together_minus_alone"] = {n: w["together"][n] - w["alone"][n] for n in names}
    r["joint_minus_alone"] = {n: w["joint"][n] - w["alone"][n] for n in names}
    r["together_within_0.02_of_alone"] = all(abs(d) <= 0.02 for d in r["together_minus_alone"].values())
    return r
