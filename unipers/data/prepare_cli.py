"""``unipers prepare``: photos, a Yo'LLaVA folder or Yo'Chameleon JSONs -> prepared concept folders.

    unipers prepare photos/bo --name bo --class-word dog --facts bo_facts.txt \\
        --negatives /data/pool --clip /models/clip-vit-large-patch14 --out data/bo --seed 0
    unipers prepare --from-yollava yollava-data --name bo --out data/yollava      # see importers.py
    unipers prepare --from-yochameleon bo_train.json --name bo --out data/bo_yc
    unipers prepare --from-dreambench dreambooth --out data/dreambench           # and --from-myvlm,
                                                                                 # --from-unifybench,
                                                                                 # --from-mcllava, --from-pods
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unipers.data.prepare import PrepareOptions, prepare_concept


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("photos", nargs="?", type=Path, metavar="PHOTOS_DIR", help="folder with 3-10 photos of the concept")
    a("--name", help="concept name, written as <NAME> in all text (e.g. bo)")
    a("--class-word", help="what the concept is (dog, mug, person); used in captions")
    a("--facts", type=Path, help="text file with one fact per line, or a JSON list of {question, answer}; "
      "write the concept as <NAME>: a bare word equal to NAME is rewritten to <NAME> too")
    a("--captions", type=Path, metavar="JSON", help='each photo\'s generation prompt, {"photo.jpg": "A photo of '
      '<NAME> on the sofa.", ...}: naming what is around the concept keeps it out of the concept\'s rows '
      '(default for every photo: "A photo of <NAME>.")')
    a("--negatives", type=Path, metavar="POOL_DIR", help="image folder tree to draw negatives / soft positives from")
    a("--clip", type=Path, metavar="PATH", help="local CLIP folder (CLIPVisionModelWithProjection + processor)")
    a("--out", type=Path, help="output folder (default: data/NAME)")
    a("--seed", type=int, default=0)
    a("--val-fraction", type=float, help="share of photos held out for validation (default 0.2; "
      "0 for the imports with a test split: --from-yollava, --from-myvlm, --from-unifybench, --from-mcllava, "
      "--from-pods)")
    a("--skip-bad", action="store_true", help="skip (and report) unreadable or too small photos instead of failing")
    a("--overwrite", action="store_true", help="replace an existing output folder")
    d = PrepareOptions()
    g = p.add_argument_group("photos and retrieval").add_argument
    g("--max-side", type=int, default=d.max_side, help="downscale photos larger than this")
    g("--min-side", type=int, default=d.min_side, help="refuse photos smaller than this (short side)")
    g("--hard", type=int, default=d.n_hard, help="hard negatives")
    g("--easy", type=int, default=d.n_easy, help="random easy negatives")
    g("--soft", type=int, default=d.n_soft, help="soft positives")
    g("--near-duplicate", type=float, default=d.near_duplicate,
      help="cosine above which a pool image counts as the concept itself")
    g("--soft-range", type=float, nargs=2, metavar=("LO", "HI"), help="similarity range mapped to 1..--gen-slots")
    g("--gen-slots", type=int, default=d.num_gen_slots, help="generation slots of a concept")
    g("--batch-size", type=int, default=d.batch_size)
    g("--num-workers", type=int, default=d.num_workers)
    g("--device", help="CLIP device (default: cuda if available)")
    g("--clip-cache", type=Path, help="embedding cache folder if the pool is read-only")
    g("--quiet", action="store_true", help="no progress bar")
    i = p.add_argument_group("importers (see unipers/data/importers.py)").add_argument
    i("--from-yollava", type=Path, metavar="ROOT", help="Yo'LLaVA data folder; --name picks one concept (default: all)")
    i("--visual-qa", type=Path, nargs="+", action="extend", metavar="JSON",
      help="more Yo'LLaVA visual QA files, read besides ROOT/yollava-visual-qa.json")
    i("--text-qa", type=Path, nargs="+", action="extend", metavar="JSON",
      help="more Yo'LLaVA text-only QA files, read besides ROOT/yollava-text-only-qa.json")
    i("--from-yochameleon", type=Path, nargs="+", metavar="JSON", help="Yo'Chameleon training JSON file(s)")
    i("--image-root", type=Path, help="folder --from-yochameleon images are looked up in, by their path or its "
      "tail (default: the JSON's folder); nothing outside it is used")
    b = p.add_argument_group("benchmark layouts (docs/prepare.md, Benchmark layouts): --name picks one concept "
                             "(default: all), --out DIR gets one folder per concept").add_argument
    for flag, (what, _module, _default_out, _val) in BENCHMARKS.items():
        b(flag, type=Path, metavar="ROOT", help=what)
    b("--n-train", type=int, metavar="N", help="--from-myvlm: photos per concept trained on, drawn with --seed "
      "(default 4, as MyVLM); the others are its test split")


def options_from_args(a: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(max_side=a.max_side, min_side=a.min_side, n_hard=a.hard, n_easy=a.easy, n_soft=a.soft,
                          near_duplicate=a.near_duplicate, soft_range=tuple(a.soft_range) if a.soft_range else None,
                          num_gen_slots=a.gen_slots, batch_size=a.batch_size, num_workers=a.num_workers,
                          device=a.device, clip_cache=a.clip_cache, quiet=a.quiet)


BENCHMARKS = {  # flag: (help, "module:function", default --out, default --val-fraction)
    "--from-myvlm": ("MyVLM data: ROOT/<concept>/ photos + captions.json", "importers_myvlm:import_myvlm",
                     "data/myvlm", 0.0),
    "--from-unifybench": ("UnifyBench (UniCTokens' data): ROOT/concept/{train,test}/<concept>/",
                          "importers_unifybench:import_unifybench", "data/unifybench", 0.0),
    "--from-dreambench": ("the DreamBooth dataset: ROOT/dataset/<subject>/ + prompts_and_classes.txt",
                          "importers_dreambench:import_dreambench", "data/dreambench", 0.2),
    "--from-mcllava": ("MC-LLaVA data: ROOT/<group>/concept/{train,test}/<concept>/ + multi/<scenario>/",
                       "importers_mcllava:import_mcllava", "data/mcllava", 0.0),
    "--from-pods": ("PODS: ROOT/pods_info.json, pods_image_annos.json, {train,test}/<class>/",
                    "importers_pods:import_pods", "data/pods", 0.0),
}
RETRIEVAL = ("negatives", "clip", "hard", "easy", "soft", "near_duplicate", "soft_range", "batch_size", "num_workers",
             "device", "clip_cache")
NOT_APPLICABLE = {
    "photos": (("visual_qa", "text_qa", "image_root"), "it applies to the importers only"),
    "--from-yollava": (("image_root", "captions"), "QA images are looked up under ROOT; --captions applies to a "
                       "photo folder"),
    "--from-yochameleon": (("visual_qa", "text_qa", "captions", *RETRIEVAL),
                           "its JSONs bring their own negatives and questions; nothing is retrieved"),
    **{flag: (("visual_qa", "text_qa", "image_root", "captions"), "it reads the benchmark's published layout only")
       for flag in BENCHMARKS},
}


def refuse_inapplicable(args: argparse.Namespace, source: str) -> None:
    """An option the chosen source would ignore is an error naming it, not silently dropped."""
    from unipers.errors import UnipersError

    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([]))
    names, why = NOT_APPLICABLE[source]
    if args.n_train is not None and source != "--from-myvlm":
        target = "a photo folder" if source == "photos" else source
        raise UnipersError(f"--n-train does not apply to {target}: it applies to --from-myvlm only")
    for dest in names:
        if getattr(args, dest) != default[dest]:
            flag = "--" + dest.replace("_", "-")
            target = "a photo folder" if source == "photos" else source
            raise UnipersError(f"{flag} does not apply to {target}: {why}")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def import_benchmark(flag: str, args: argparse.Namespace, opts: PrepareOptions) -> list[Path]:
    """Run the reader of ``flag`` (BENCHMARKS) with the options every reader takes."""
    import importlib

    _what, target, default_out, default_val = BENCHMARKS[flag]
    module, function = target.split(":")
    reader = getattr(importlib.import_module(f"unipers.data.{module}"), function)
    extra = {"n_train": args.n_train} if flag == "--from-myvlm" else {}
    return reader(getattr(args, _dest(flag)), args.out or Path(default_out),
                  concepts=[args.name] if args.name else None, class_word=args.class_word, facts=args.facts,
                  seed=args.seed, val_fraction=default_val if args.val_fraction is None else args.val_fraction,
                  negatives=args.negatives, clip_path=args.clip, skip_bad=args.skip_bad, overwrite=args.overwrite,
                  options=opts, **extra)


def main(args: argparse.Namespace) -> int:
    from unipers.data.images import PhotoError
    from unipers.data.importers import import_yochameleon, import_yollava
    from unipers.errors import UnipersError

    opts = options_from_args(args)
    given = {"photos": args.photos, "--from-yollava": args.from_yollava, "--from-yochameleon": args.from_yochameleon,
             **{flag: getattr(args, _dest(flag)) for flag in BENCHMARKS}}
    try:
        sources = [k for k, v in given.items() if v]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of PHOTOS_DIR, {', '.join(list(given)[1:])}")
        source = sources[0]
        refuse_inapplicable(args, source)
        if source in BENCHMARKS:
            outs = import_benchmark(source, args, opts)
        elif args.from_yollava:
            outs = import_yollava(args.from_yollava, args.out or Path("data/yollava"),
                                  concepts=[args.name] if args.name else None, visual_qa=args.visual_qa,
                                  text_qa=args.text_qa, class_word=args.class_word, facts=args.facts,
                                  seed=args.seed, val_fraction=0.0 if args.val_fraction is None else args.val_fraction,
                                  negatives=args.negatives, clip_path=args.clip, skip_bad=args.skip_bad,
                                  overwrite=args.overwrite, options=opts)
        else:
            if not args.name:
                raise ValueError("--name is required")
            out = args.out or Path("data") / args.name
            val_fraction = 0.2 if args.val_fraction is None else args.val_fraction
            if args.from_yochameleon:
                outs = [import_yochameleon(args.from_yochameleon, args.name, out, image_root=args.image_root,
                                           class_word=args.class_word, facts=args.facts, seed=args.seed,
                                           val_fraction=val_fraction, skip_bad=args.skip_bad,
                                           overwrite=args.overwrite, options=opts)]
            else:
                outs = [prepare_concept(args.photos, args.name, out, class_word=args.class_word, facts=args.facts,
                                        negatives=args.negatives, clip_path=args.clip, seed=args.seed,
                                        val_fraction=val_fraction, skip_bad=args.skip_bad,
                                        overwrite=args.overwrite, options=opts, captions=args.captions)]
    except (UnipersError, PhotoError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        for line in getattr(e, "details", ()):  # every record an import could not use, then the one-line error
            print(line, file=sys.stderr)
        print(f"unipers prepare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for out in outs:
        print((out / "report.txt").read_text(encoding="utf-8"), end="")
        print(f"wrote {out}\n")
    return 0
