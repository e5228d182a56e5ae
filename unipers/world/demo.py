"""``unipers demo``: the whole loop on the tiny world, on CPU, with nothing downloaded.

    unipers demo [--out demo] [--root DIR] [--steps 2400] [--batch-size 8] [--seed 0]

build or reuse the tiny base (``unipers world build``) -> photograph a never-seen object (5 training
photos, held-out validation and test views, near-miss and other negatives) -> ``prepare`` -> personalize
``<bo>`` -> ask -> recognize -> generate -> eval, before and after personalization. Writes to OUT:

    photos/         the inputs, as a user would have them (train/, val/, test/, negatives/, test_negatives/)
    data/bo/        the prepared concept folder
    run/            the training run (config, logs, checkpoints, concept files)
    bo.safetensors  the trained concept; bo_before.safetensors its untrained start (class-word init)
    answers.json    answers before / after, recognition probabilities per test photo
    images/         generated PNGs (concept, class word, concept before training) and grids
    eval/           ``unipers eval`` outputs before and after (held-out recognition)
    report.md, report.json, config.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NAME = "bo"
N_TRAIN, N_VAL, N_TEST = 5, 4, 24
N_NEG_TRAIN, N_NEG_VAL, N_TEST_NEAR, N_TEST_OTHER = 80, 16, 14, 10
N_GEN = 48  # seeded images per prompt
FACTS = (  # (question, answer, the word a right answer must contain)
    ("Where does <bo> live?", "<bo> lives in the kitchen.", "kitchen"),
    ("What does <bo> like?", "<bo> likes the garden.", "garden"),
    ("What colour is <bo>?", "<bo> is purple.", "purple"),
)


@dataclass
class DemoSettings:
    steps: int = 2400
    """personalization steps (the demo's spread in benchmarks/README.md is measured at 2,400)"""
    lr: float = 0.03
    batch_size: int = 8
    gen_steps: int = 25
    """sampling steps per image"""
    guidance: float = 4.0
    seed: int = 0
    quiet: bool = False
    timings: dict = field(default_factory=dict)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ---- the concept's photos ---------------------------------------------------------------------------------

def write_photos(folder: Path, seed: int, obj=None, tag: str = "demo", backdrop=None) -> dict:
    """The photos of ``obj`` (default the demo object) and its negatives, as PNG folders; returns {role:
    [paths]}. ``tag`` seeds the draws (another object's photos use another tag: unipers.world.compose).
    ``backdrop(role, i)``: the background colour of photo i of a role (the facts world's places)."""
    from unipers.world.build import demo_object
    from unipers.world.synth import all_objects, near_misses, render

    obj = obj or demo_object()
    near = near_misses(obj)
    others = [o for o in all_objects() if o.shared(obj) < 2]
    rng = random.Random(f"{tag}/{seed}/negatives")
    roles = {
        "train": [obj] * N_TRAIN, "val": [obj] * N_VAL, "test": [obj] * N_TEST,
        # near-misses (two of three attributes shared) are half of every negative set
        "negatives": [near[i % len(near)] for i in range(N_NEG_TRAIN // 2)]
        + rng.sample(others, N_NEG_TRAIN - N_NEG_TRAIN // 2),
        "val_negatives": rng.sample(near, N_NEG_VAL // 2) + rng.sample(others, N_NEG_VAL - N_NEG_VAL // 2),
        "test_negatives": list(near[:N_TEST_NEAR]) + rng.sample(others, N_TEST_OTHER),
    }
    out: dict[str, list[Path]] = {}
    truth: dict[str, dict] = {}
    for role, objects in roles.items():
        (folder / role).mkdir(parents=True, exist_ok=True)
        out[role] = []
        for i, o in enumerate(objects):
            path = folder / role / f"{role}_{i:03d}.png"
            render(o, random.Random(f"{tag}/{seed}/{role}/{i}"), tint=backdrop(role, i) if backdrop else None).save(path)
            out[role].append(path)
            truth[str(path.relative_to(folder))] = o.attributes()
    (folder / "objects.json").write_text(json.dumps(truth, indent=1) + "\n")
    return out


def prepare(photos: Path, out: Path, seed: int, name: str = NAME, obj=None, facts=FACTS, near_misses=(),
            photo_prompts=None, statements: bool = False) -> Path:
    """The photos -> a prepared concept folder through the project's own prepare path (validation,
    samples, manifest), with the held-out test split the benchmark protocol uses. ``name``, ``obj``
    (default the demo object: its shape is the class word) and ``facts`` default to the demo's; the test
    negatives among ``near_misses`` (paths) form the named set "near_misses", which eval scores apart.
    ``photo_prompts``: {photo path: its generation prompt}, as `unipers prepare --captions` gives them.
    ``statements``: the facts' answers are given as facts too (a facts file's lines), which adds their
    templated questions and "What do you know about <bo>?"."""
    from unipers.data.images import load_photos
    from unipers.data.prepare import ConceptInputs, PrepareOptions, build_prepared
    from unipers.world.build import demo_object

    def load(role: str):
        return load_photos(photos / role, min_side=32).photos

    fact_pairs = [{"question": q, "answer": a} for q, a, _ in facts]
    negatives = [p.path for p in load("negatives")] + [p.path for p in load("val_negatives")]
    inputs = ConceptInputs(
        name=name, train=load("train"), val=load("val"), test=load("test"),
        test_negatives=[p.path for p in load("test_negatives")], given_negatives=negatives,
        class_word=(obj or demo_object()).shape, fact_pairs=fact_pairs, facts_source="demo facts",
        facts=[a for _, a, _ in facts] if statements else [],
        subsets={str(p): "near_misses" for p in near_misses},
        photo_prompts={str(k): v for k, v in (photo_prompts or {}).items()})
    opts = PrepareOptions(min_side=32, quiet=True, questions_per_photo=8)
    val_share = N_NEG_VAL / (N_NEG_TRAIN + N_NEG_VAL)  # prepare holds this share of the negatives out
    return build_prepared(inputs, out, seed=seed, val_fraction=val_share, overwrite=True, options=opts)


# ---- training -------------------------------------------------------------------------------------------

def demo_config(root: Path, out: Path, s: DemoSettings, concepts=None):
    """The demo's training config; ``concepts``: prepared folders (default OUT/data/bo)."""
    from unipers.world.build import RECIPE, world_config

    folders = ",".join(str(f) for f in concepts) if concepts else out / "data" / NAME
    return world_config(root, [
        f"seed={s.seed}", f"run_dir={out / 'run'}", f"data.concepts=[{folders}]",
        f"data.batch_size={s.batch_size}", f"trainer.max_steps={s.steps}", f"trainer.lr={s.lr}",
        "trainer.weight_decay=0.0", "trainer.accelerator=cpu", f"trainer.cpu_threads={RECIPE.threads}",
        f"trainer.val_every={max(1, s.steps // 3)}",
        f"trainer.checkpoint_every={max(1, s.steps // 3)}", "trainer.log_every=10",
        f"trainer.progress_bar={not s.quiet}", "personalize.warmup_steps=10",
        # the Yes / No is one token of a recognition answer's eight: weighted 5x, held-out recognition went
        # from 0.81-0.96 (median 0.89) to 0.83-0.98 (median 0.90) on ten base draws (benchmarks/README.md)
        "personalize.decision_weight=5",
        # facts are a handful of sentences: sample them more often than the default mix does
        "data.task_weights.recognition=0.25", "data.task_weights.qa=0.45", "data.task_weights.caption=0.05",
        "data.task_weights.generation=0.25",
        # eight seeded crops / mirrors of every photo (negatives too): five photos show the object at five
        # places and sizes, and the base's descriptions of them vary (it sometimes reads the star as a
        # cross); the concept then accepts its held-out photos (positives 0.50 -> 0.92 in a probe)
        "data.augment.views=8",
        f"eval.steps={s.gen_steps}", f"eval.guidance={s.guidance}",
    ])


def train_concept(cfg, seed: int, to: Path) -> Path:
    """Train by ``cfg`` (torch seeded with ``seed`` first, so a run reproduces) and copy the run's last
    concept file to ``to``."""
    import torch

    from unipers.training.run import train

    torch.manual_seed(seed)
    run_dir = train(cfg)
    shutil.copyfile(run_dir / "concepts" / "last.safetensors", to)
    return to


def untrained_concept(session, cfg, class_word: str, path: Path) -> Path:
    """The concept as training starts (same init and seed as the run): the 'before' row of the report."""
    session.unload()
    session.model.add_concept(NAME, class_word, init=cfg.bank.init, init_noise=cfg.bank.init_noise, seed=cfg.seed)
    session.model.save_concepts(path, extra={"step": "0"})
    session.unload()
    return path


# ---- measuring ------------------------------------------------------------------------------------------

def attribute_match(classifier, images, target) -> dict:
    """Share of images whose classified shape / colour / pattern equals the target's, and their mean."""
    import torch

    pred = classifier.predict(images.float().cpu())
    hits = (pred == torch.tensor(target.labels())).float()
    per = dict(zip(("shape", "colour", "pattern"), hits.mean(0).tolist()))
    return {"mean": hits.mean().item(), **per, "n_images": len(images)}


def recognition_rates(probs, n_pos: int) -> dict:
    """Shares accepted / rejected of P(yes) per photo: positives first (``n_pos``), then negatives, whose
    first N_TEST_NEAR are the near-misses (write_photos' test_negatives)."""
    pos = [p > 0.5 for p in probs[:n_pos]]
    neg = [p <= 0.5 for p in probs[n_pos:]]
    near = neg[:N_TEST_NEAR]
    recognition = {"pos": sum(pos) / len(pos), "neg": sum(neg) / len(neg), "near_miss_neg": sum(near) / len(near)}
    recognition["weighted"] = (recognition["pos"] + recognition["neg"]) / 2
    return recognition


def measure(session, concept_file: Path, photos: dict, classifier, s: DemoSettings, images_dir: Path, tag: str) -> dict:
    """Ask, recognize and generate with one concept file loaded."""
    from torchvision.utils import save_image

    from unipers.world.build import demo_object

    session.unload()
    session.load(concept_file)
    facts = []
    for question, answer, key in FACTS:
        got = session.ask(question, max_new_tokens=24)
        facts.append({"question": question, "expected": answer, "answer": got, "right": key.lower() in got.lower()})
    caption = session.ask("Describe this image.", [photos["test"][0]], max_new_tokens=24)
    who = session.ask("Is <bo> in this photo?", [photos["test"][0]], max_new_tokens=16, described=True)
    probs = session.recognize(NAME, [*photos["test"], *photos["test_negatives"]])
    recognition = recognition_rates(probs, len(photos["test"]))
    images = session.generate([f"A photo of <{NAME}>."], seed=s.seed, num_images=N_GEN, steps=s.gen_steps,
                              guidance=s.guidance).tensors
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images[:8]):
        save_image(img, images_dir / f"{tag}_{i:02d}.png")
    save_image(images, images_dir / f"grid_{tag}.png", nrow=8, padding=1)
    return {"facts": facts, "facts_right": sum(f["right"] for f in facts), "caption_of_test_photo": caption,
            "recognize_answer": who, "recognition": recognition, "recognition_probs": probs,
            "generation": attribute_match(classifier, images, demo_object())}


def class_word_generation(session, classifier, s: DemoSettings, images_dir: Path) -> dict:
    from torchvision.utils import save_image

    from unipers.world.build import demo_object
    from unipers.world.synth import with_article

    session.unload()
    prompt = f"A photo of {with_article(demo_object().shape)}."
    images = session.generate([prompt], seed=s.seed, num_images=N_GEN, steps=s.gen_steps, guidance=s.guidance).tensors
    save_image(images, images_dir / "grid_class_word.png", nrow=8, padding=1)
    return {"prompt": prompt, **attribute_match(classifier, images, demo_object())}


def held_out_eval(cfg, session, concept_file: Path, data: Path, out: Path) -> dict:
    """``unipers eval`` (no generation: the world has no CLIP) on the held-out split: the mean row."""
    return held_out_results(cfg, session, [concept_file], [data], out)["mean"]


def held_out_results(cfg, session, concept_files, data, out: Path, baselines: bool = False) -> dict:
    """``held_out_eval`` of concept files loaded together into one session, each concept scored on its own
    prepared folder of ``data``: the whole result (per concept: ``result["concepts"][name]``); with
    ``baselines``, the config's eval.baselines beside them."""
    from unipers.eval.runner import EvalRequest, run_eval

    return run_eval(cfg, EvalRequest(concept_files=list(concept_files), data=list(data), out=out, generation=False,
                                     baselines=baselines), session=session, log=lambda m: None)


RECOGNITION, NEAR_MISSES = "recognition/weighted", "recognition/subset/near_misses"


def against_baselines(result: dict) -> dict:
    """Per method (the concept file, then each baseline): held-out weighted recognition and the share of
    near-misses rejected, each with its 95% interval and, for a baseline, whether it separates from the
    concept file (eval's rule: disjoint intervals)."""
    out = {}
    for block in result["results"]:
        out[block["method"]] = {}
        for metric in (RECOGNITION, NEAR_MISSES):
            ci = block.get("ci", {}).get("mean", {}).get(metric, {})
            out[block["method"]][metric] = {
                "value": block["mean"].get(metric), "ci_low": ci.get("ci_low"), "ci_high": ci.get("ci_high"),
                "verdict": block.get("separation", {}).get("mean", {}).get(metric)}
    return out


# ---- the whole loop -------------------------------------------------------------------------------------

def run_demo(out: str | Path = "demo", *, root: str | Path | None = None, settings: DemoSettings | None = None,
             overwrite: bool = False) -> dict:
    """The whole loop into the folder `out`; an existing `out` is replaced only with `overwrite`, and only
    when an earlier demo wrote it."""
    from unipers.io import check_output
    from unipers.runtime import cpu_threads
    from unipers.world.build import RECIPE

    check_output(out, overwrite=overwrite)  # before the world build, which can take minutes
    with cpu_threads(RECIPE.threads):  # the world's own thread count: the same numbers whatever the core count
        return _run_demo(Path(out), root, settings or DemoSettings(), overwrite)


def _run_demo(out: Path, root: str | Path | None, s: DemoSettings, overwrite: bool) -> dict:

    from unipers.config import to_yaml
    from unipers.inference.session import InferenceSession
    from unipers.io import check_output, mark_output
    from unipers.world.build import build_world, demo_object, world_root
    from unipers.runtime import cpu_description
    from unipers.world.decoder import load_classifier

    out = out.absolute()
    t = s.timings
    t0 = time.perf_counter()
    _say("[1/7] tiny world base: build or reuse", s.quiet)
    root = build_world(root, quiet=s.quiet)
    t["base"] = time.perf_counter() - t0
    check_output(out, overwrite=overwrite)
    if out.exists():  # an earlier demo's folder (check_output refuses any other)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mark_output(out, "demo")

    t1 = time.perf_counter()
    _say(f"[2/7] photos of a never-seen {demo_object()} and its negatives -> prepare", s.quiet)
    photos = write_photos(out / "photos", s.seed)
    data = prepare(out / "photos", out / "data" / NAME, s.seed, near_misses=photos["test_negatives"][:N_TEST_NEAR])
    cfg = demo_config(root, out, s)
    (out / "config.yaml").write_text(to_yaml(cfg))
    t["prepare"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    _say(f"[3/7] personalize <{NAME}>: {s.steps} steps", s.quiet)
    trained = train_concept(cfg, s.seed, out / f"{NAME}.safetensors")
    t["personalize"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    session = InferenceSession.from_config(cfg, device="cpu")
    before_file = untrained_concept(session, cfg, demo_object().shape, out / f"{NAME}_before.safetensors")
    classifier = load_classifier(world_root(root) / "classifier.safetensors")
    results = {}
    for step, (tag, file) in enumerate((("before", before_file), ("after", trained)), start=4):
        _say(f"[{step}/7] ask, recognize, generate {N_GEN} images: {tag} personalization", s.quiet)
        results[tag] = measure(session, file, photos, classifier, s, out / "images", tag)
    results["class_word"] = class_word_generation(session, classifier, s, out / "images")
    t["ask_recognize_generate"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    _say("[6/7] unipers eval on the held-out split, before and after", s.quiet)
    results["before"]["eval"] = held_out_eval(cfg, session, before_file, data, out / "eval" / "before")
    after = held_out_results(cfg, session, [trained], [data], out / "eval" / "after", baselines=True)
    results["after"]["eval"], results["baselines"] = after["mean"], against_baselines(after)
    t["eval"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0

    _say("[7/7] report", s.quiet)
    world = json.loads((root / "world.json").read_text())
    report = {"concept": f"<{NAME}>", "object": demo_object().attributes(), "class_word": demo_object().shape,
              "world": str(root), "world_seed": world["seed"], "world_version": world["version"],
              "cpu": cpu_description(), "settings": {k: v for k, v in vars(s).items() if k != "timings"},
              "photos": {k: len(v) for k, v in photos.items()}, "results": results,
              "seconds": {k: round(v, 1) for k, v in t.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    answers = {tag: {"facts": results[tag]["facts"], "caption_of_test_photo": results[tag]["caption_of_test_photo"],
                     "recognize_answer": results[tag]["recognize_answer"],
                     "recognition_probs": dict(zip([str(p.relative_to(out)) for p in [*photos["test"], *photos["test_negatives"]]],
                                                   results[tag]["recognition_probs"]))}
               for tag in ("before", "after")}
    (out / "answers.json").write_text(json.dumps(answers, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))
    return report


def _pct(x: float) -> str:
    return f"{x:.2f}"


def _with_ci(v: dict) -> str:
    if v["value"] is None:
        return "–"
    ci = f" [{_pct(v['ci_low'])}, {_pct(v['ci_high'])}]" if v["ci_low"] is not None else ""
    return f"{_pct(v['value'])}{ci}" + (f", {v['verdict']}" if v["verdict"] else "")


def format_report(r: dict) -> str:
    from unipers.eval.prompts import METHOD_TITLES

    b, a, c = r["results"]["before"], r["results"]["after"], r["results"]["class_word"]
    obj = r["object"]
    lines = [
        f"# unipers demo: personalizing <{NAME}>, a {obj['colour']} {obj['pattern']} {obj['shape']} the base never saw",
        "",
        f"{r['photos']['train']} training photos; held-out test: {r['photos']['test']} photos of <{NAME}>, "
        f"{r['photos']['test_negatives']} negatives ({N_TEST_NEAR} near-misses sharing two of three attributes). "
        f"Generation: {N_GEN} seeded images per prompt, judged by the world's attribute classifier.",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| held-out recognition, weighted (`unipers eval`) | {_pct(b['eval']['recognition/weighted'])} | {_pct(a['eval']['recognition/weighted'])} |",
        f"| held-out recognition: positives / negatives | {_pct(b['recognition']['pos'])} / {_pct(b['recognition']['neg'])} "
        f"| {_pct(a['recognition']['pos'])} / {_pct(a['recognition']['neg'])} |",
        f"| near-miss negatives rejected | {_pct(b['recognition']['near_miss_neg'])} | {_pct(a['recognition']['near_miss_neg'])} |",
        f"| facts answered right | {b['facts_right']}/{len(FACTS)} | {a['facts_right']}/{len(FACTS)} |",
        f"| attribute match of images for 'A photo of <{NAME}>.' | {_pct(b['generation']['mean'])} | {_pct(a['generation']['mean'])} |",
        f"| attribute match of images for '{c['prompt']}' (class word alone) | {_pct(c['mean'])} | {_pct(c['mean'])} |",
        "",
        "Attribute match per attribute (shape / colour / pattern):",
        "",
        f"- `<{NAME}>` after: {_pct(a['generation']['shape'])} / {_pct(a['generation']['colour'])} / {_pct(a['generation']['pattern'])}",
        f"- `<{NAME}>` before: {_pct(b['generation']['shape'])} / {_pct(b['generation']['colour'])} / {_pct(b['generation']['pattern'])}",
        f"- class word: {_pct(c['shape'])} / {_pct(c['colour'])} / {_pct(c['pattern'])}",
        "",
        "## Held-out recognition against the baselines",
        "",
        "`unipers eval` on the trained file and its baselines (`eval/after/report.md`), with 95% bootstrap "
        "intervals; a baseline separates from the concept file when the two intervals are disjoint.",
        "",
        "| method | weighted recognition | near-misses rejected |",
        "|---|---|---|",
        *(f"| {METHOD_TITLES.get(m, m)} | {_with_ci(v[RECOGNITION])} | {_with_ci(v[NEAR_MISSES])} |"
          for m, v in r["results"]["baselines"].items()),
        "",
        "## Answers",
        "",
        "| question | before | after |",
        "|---|---|---|",
    ]
    for fb, fa in zip(b["facts"], a["facts"]):
        lines.append(f"| {fb['question']} | {fb['answer']} {'(right)' if fb['right'] else '(wrong)'} "
                     f"| {fa['answer']} {'(right)' if fa['right'] else '(wrong)'} |")
    lines += [f"| Describe this image. (a test photo) | {b['caption_of_test_photo']} | {a['caption_of_test_photo']} |",
              f"| Is <{NAME}> in this photo? (a test photo) | {b['recognize_answer']} | {a['recognize_answer']} |", "",
              "Images: `images/grid_after.png`, `images/grid_before.png`, `images/grid_class_word.png`.", "",
              "Time (s): " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), "",
              f"Base: {r['world_version']}, world seed {r['world_seed']}. CPU: {r['cpu']['model']} "
              f"(torch kernels {r['cpu']['torch_capability']}, {r['cpu']['threads']} thread(s)); another CPU "
              "rounds differently and trains a different base (benchmarks/README.md gives the spread).", ""]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", help="output folder (default ./demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when an earlier demo wrote it")
    parser.add_argument("--root", default=None, help="tiny world folder (default $UNIPERS_WORLD_DIR, else $UNIPERS_HOME/world)")
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="personalization steps")
    parser.add_argument("--batch-size", type=int, default=DemoSettings.batch_size, help="personalization batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    settings = DemoSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed, quiet=args.quiet)
    run_demo(args.out, root=args.root, settings=settings, overwrite=args.overwrite)
    print((Path(args.out) / "report.md").read_text())
    print(f"written to {Path(args.out).absolute()}")
    return 0
