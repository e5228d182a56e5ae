"""Import Yo'LLaVA and Yo'Chameleon data into prepared concept folders (same layout as ``prepare``).

    unipers prepare --from-yollava yollava-data --out data/yollava            # every concept -> data/yollava/<c>/
    unipers prepare --from-yollava yollava-data --name bo --out data/yollava  # one concept
    unipers prepare --from-yochameleon bo_train.json bo_gen.json --name bo --out data/bo_yc [--image-root DIR]

Python: ``import_yollava(root, out_root, concepts=None, ...) -> list[Path]`` and
``import_yochameleon(json_paths, name, out_dir, ...) -> Path``; the parsers ``read_yollava_qa`` and
``read_yochameleon`` return ``(samples, issues)``.

Yo'LLaVA (``ROOT/{train,test}/<concept>/*.png``): train photos are the train split (no validation
hold-out unless ``val_fraction`` > 0), test photos the ``test`` split, whose recognition negatives are the
other concepts' test photos (the benchmark protocol). ``train/<c>/negative_example/`` images are used
as negatives when no pool is given. Multiple-choice QA comes from ``ROOT/yollava-visual-qa.json``
(items with ``options`` and an image), ``ROOT/yollava-text-qa.json`` (items with ``option``), any JSON in
``test/<c>/``, or the files passed explicitly; files may be keyed by concept (``{"bo": {key: item}}``) or
flat (``{key: item}``), and an item's image is its ``image`` field or its key. ``<sks>`` and whole-word
``sks`` become ``<NAME>``.

Yo'Chameleon (LLaVA-style ``[{"image": [...], "conversations": [{"from", "value"}]}]``): every
human->bot turn becomes one sample. ``<image>`` in the human text = an input image (recognition when the
answer starts with yes/no, caption for describe/caption requests, else free-form vqa); ``<image>`` in
the bot text = a generation target. A run of ``<reservedNNNNN>`` tokens becomes ``<NAME>``; in a
generation prompt whose run is shorter than the file's longest run, ``gen_slots`` is that share of
``num_gen_slots`` (Yo'Chameleon's soft positives use fewer latent tokens).

Odd records (wrong types, missing keys, missing images, unknown correct answers, ...) are not dropped
silently: each becomes ``{"where": "file#key", "problem": ...}`` in the returned issues, in
``concept.json["import_issues"]`` and in ``report.txt``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from unipers.data.manifest import Sample
from unipers.concepts.names import validate_name
from unipers.data.samples import mention, normalize_mentions

RESERVED_RUN = re.compile(r"<reserved\d+>(?:\s*<reserved\d+>)*")
YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
CAPTION_REQUEST = re.compile(r"\b(describe|description|caption)\b", re.IGNORECASE)
HUMAN, BOT = {"human", "user"}, {"bot", "gpt", "assistant", "ai"}


def _issue(where: str, problem: str) -> dict:
    return {"where": where, "problem": problem}


def _resolve_yollava_image(ref: str, root: Path, base: Path) -> Path | None:
    """A Yo'LLaVA image reference (``./yollava-data/test/bo/0.png``, absolute, or relative) as a file."""
    p = Path(ref)
    parts = p.parts
    for split in ("test", "train"):  # most robust: the part from the split folder on, under ROOT
        if split in parts:
            cand = root.joinpath(*parts[len(parts) - parts[::-1].index(split) - 1:])
            if cand.is_file():
                return cand
    for cand in (p, base / p, root / p, root.parent / p):
        if cand.is_file():
            return cand
    return None


def read_yollava_qa(path: Path | str, concept: str, *, root: Path | str, alias: str = "sks",
                    split: str = "test") -> tuple[list[Sample], list[dict]]:
    """Multiple-choice QA for ``concept`` from a Yo'LLaVA QA file: ``vqa`` samples (``options`` + image)
    and text-only ``qa`` samples (``option``); the answer is the correct letter. Images are returned as
    source paths (``build_prepared`` copies them)."""
    path, root = Path(path), Path(root)
    rp, rr = path.resolve(), root.resolve()
    rel = rp.relative_to(rr).as_posix() if rp.is_relative_to(rr) else path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [], [_issue(rel, f"cannot read JSON: {e}")]
    if not isinstance(data, dict):
        return [], [_issue(rel, f"expected a JSON object, got {type(data).__name__}")]
    flat = all(isinstance(v, dict) and "question" in v for v in data.values())
    if flat:
        items, prefix = data, ""
    elif concept in data:
        items, prefix = data[concept], f"{concept}/"
        if not isinstance(items, dict):
            return [], [_issue(f"{rel}#{concept}", f"expected an object of items, got {type(items).__name__}")]
    else:
        return [], []  # a concept-keyed file without this concept
    out, issues = [], []
    fix = lambda t: normalize_mentions(t, concept, [alias], bare_name=False)  # noqa: E731
    for key, item in items.items():
        where = f"yollava:{rel}#{prefix}{key}"
        if not isinstance(item, dict):
            issues.append(_issue(where, f"item is a {type(item).__name__}, expected an object"))
            continue
        visual = "option" not in item
        opts, q, ans = item.get("options" if visual else "option"), item.get("question"), item.get("correct_answer")
        if not isinstance(q, str):
            issues.append(_issue(where, "missing or non-string 'question'"))
            continue
        if not isinstance(opts, dict) or not opts or not all(isinstance(v, str) for v in opts.values()):
            issues.append(_issue(where, "missing 'options'/'option' (an object of letter -> text)"))
            continue
        if ans not in opts:
            issues.append(_issue(where, f"correct_answer {ans!r} is not one of the options {sorted(opts)}"))
            continue
        image = None
        if visual:
            ref = item.get("image", key if Path(str(key)).suffix else None)
            if not isinstance(ref, str):
                issues.append(_issue(where, "visual question without an image"))
                continue
            if flat and _concept_of(ref) not in (None, concept):
                continue  # a flat file that mixes concepts: this item is another concept's
            image = _resolve_yollava_image(ref, root, path.parent)
            if image is None:
                issues.append(_issue(where, f"image not found: {ref}"))
                continue
        out.append(Sample("vqa" if visual else "qa", concept, split, image=str(image) if image else None,
                          question=fix(q), answer=ans, options={k: fix(v) for k, v in opts.items()}, source=where))
    return out, issues


def _concept_of(ref: str) -> str | None:
    parts = Path(ref).parts
    for split in ("test", "train"):
        if split in parts and parts.index(split) + 1 < len(parts) - 1:
            return parts[parts.index(split) + 1]
    return None


def _qa_files(root: Path, concept: str, explicit: Sequence[Path | None]) -> list[Path]:
    files = [Path(p) for p in explicit if p is not None]
    if not files:
        files = [root / n for n in ("yollava-visual-qa.json", "yollava-text-qa.json") if (root / n).is_file()]
    test_dir = root / "test" / concept
    if test_dir.is_dir():
        files += sorted(test_dir.glob("*.json"))
    return files


def import_yollava(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                   visual_qa: Path | None = None, text_qa: Path | None = None, seed: int = 0,
                   val_fraction: float = 0.0, negatives: Path | None = None, clip_path: Path | None = None,
                   skip_bad: bool = False, overwrite: bool = False, options=None,
                   max_test_negatives: int | None = None) -> list[Path]:
    """One prepared folder per concept, ``out_root/<concept>``; returns their paths."""
    import random

    from unipers.data.images import PhotoSet, list_image_files, load_photos
    from unipers.data.prepare import ConceptInputs, PrepareOptions, build_prepared, split_indices

    root, out_root = Path(root), Path(out_root)
    opts = options or PrepareOptions()
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"not a Yo'LLaVA folder (no train/ inside): {root}")
    available = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    wanted = list(concepts) if concepts else available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"concept(s) not in {root / 'train'}: {', '.join(missing)} "
                         f"(available: {', '.join(available)})")
    test_files = {c: list_image_files(root / "test" / c)[0] if (root / "test" / c).is_dir() else [] for c in available}
    for c in wanted:  # every name before any work, by the rule training applies
        validate_name(c)
    outs = []
    for c in wanted:
        train = load_photos(root / "train" / c, max_side=opts.max_side, min_side=opts.min_side, skip_bad=skip_bad)
        test = (load_photos(root / "test" / c, max_side=opts.max_side, min_side=opts.min_side, skip_bad=skip_bad)
                if test_files[c] else PhotoSet(root / "test" / c))
        tr, va = split_indices(len(train.photos), val_fraction, seed, opts.min_val)
        others = [f for o in available if o != c for f in test_files[o]]
        if max_test_negatives is not None and len(others) > max_test_negatives:
            others = sorted(random.Random(f"{seed}/test-neg/{c}").sample(others, max_test_negatives))
        neg_dir = root / "train" / c / "negative_example"
        given = list_image_files(neg_dir)[0] if neg_dir.is_dir() and negatives is None else []
        samples, issues = [], []
        for f in _qa_files(root, c, (visual_qa, text_qa)):
            s, i = read_yollava_qa(f, c, root=root)
            samples += s
            issues += i
        inputs = ConceptInputs(
            name=c, train=[train.photos[i] for i in tr], val=[train.photos[i] for i in va], test=test.photos,
            test_negatives=others, given_negatives=given, extra_samples=samples, issues=issues,
            photo_report={k: getattr(train, k) + getattr(test, k) for k in ("skipped", "duplicates", "ignored")})
        outs.append(build_prepared(inputs, out_root / c, seed=seed, val_fraction=val_fraction, negatives=negatives,
                                   clip_path=clip_path, overwrite=overwrite, options=opts))
    return outs


def _clean(text: str, name: str) -> tuple[str, int]:
    """Text with ``<image>`` removed and reserved-token runs as ``<name>``; also the longest run length."""
    runs = [m.group(0).count("<reserved") for m in RESERVED_RUN.finditer(text)]
    text = RESERVED_RUN.sub(mention(name), text.replace("<image>", " "))
    text = normalize_mentions(text, name, ["sks"], bare_name=False)
    return re.sub(r"[ \t]+", " ", re.sub(r" *\n *", "\n", text)).strip(), max(runs, default=0)


def read_yochameleon(json_path: Path | str, name: str, *, image_root: Path | str | None = None,
                     split: str = "train", num_gen_slots: int = 8) -> tuple[list[Sample], list[dict]]:
    """Samples from one Yo'Chameleon training JSON (see the module docstring); images as source paths."""
    path = Path(json_path)
    base = Path(image_root) if image_root else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [], [_issue(path.name, f"cannot read JSON: {e}")]
    if not isinstance(data, list):
        return [], [_issue(path.name, f"expected a JSON list of records, got {type(data).__name__}")]
    longest = max((n for rec in data if isinstance(rec, dict) and isinstance(rec.get("conversations"), list)
                   for t in rec["conversations"] if isinstance(t, dict) and isinstance(t.get("value"), str)
                   for n in [_clean(t["value"], name)[1]]), default=0)
    out, issues = [], []
    for i, rec in enumerate(data):
        where = f"yochameleon:{path.name}#{i}"
        if not isinstance(rec, dict):
            issues.append(_issue(where, f"record is a {type(rec).__name__}, expected an object"))
            continue
        images, conv = rec.get("image", []), rec.get("conversations")
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            issues.append(_issue(where, "'image' must be a path or a list of paths"))
            continue
        if not isinstance(conv, list) or not conv:
            issues.append(_issue(where, "missing or empty 'conversations' list"))
            continue
        resolved = [p if (p := Path(x)).is_absolute() else base / p for x in images]
        used, n_issues = 0, len(issues)
        for j in range(0, len(conv) - 1, 2):
            h, b = conv[j], conv[j + 1]
            tw = f"{where}.conversations[{j}]"
            if not (isinstance(h, dict) and isinstance(b, dict) and isinstance(h.get("value"), str)
                    and isinstance(b.get("value"), str)):
                issues.append(_issue(tw, "turn without a string 'value'"))
                continue
            if str(h.get("from", "")).lower() not in HUMAN or str(b.get("from", "")).lower() not in BOT:
                got = f"{h.get('from')!r}, {b.get('from')!r}"
                issues.append(_issue(tw, f"expected a human turn then a bot turn, got {got}"))
                continue
            n_in, n_out = h["value"].count("<image>"), b["value"].count("<image>")
            imgs = resolved[used:used + n_in + n_out]
            used += n_in + n_out
            if len(imgs) < n_in + n_out:
                issues.append(_issue(tw, f"{n_in + n_out} <image> placeholder(s) but only {len(imgs)} image(s) left"))
                continue
            if n_in + n_out > 1:
                issues.append(_issue(tw, f"turn uses {n_in + n_out} images; a manifest sample holds one"))
                continue
            if imgs and not imgs[0].is_file():
                issues.append(_issue(tw, f"image not found: {imgs[0]}"))
                continue
            q, q_run = _clean(h["value"], name)
            a, _ = _clean(b["value"], name)
            img = str(imgs[0]) if imgs else None
            if n_out:
                slots = max(1, round(q_run / longest * num_gen_slots)) if 0 < q_run < longest else None
                out.append(Sample("generation", name, split, image=img, prompt=q, gen_slots=slots, source=tw))
            elif n_in:
                m = YES_NO.match(a)
                task = "recognition" if m else "caption" if CAPTION_REQUEST.search(q) else "vqa"
                label = (m.group(1).lower() == "yes") if m else None
                out.append(Sample(task, name, split, image=img, question=q, answer=a, label=label, source=tw))
            else:
                out.append(Sample("qa", name, split, question=q, answer=a, source=tw))
        if len(conv) % 2:
            issues.append(_issue(f"{where}.conversations[{len(conv) - 1}]", "unanswered last turn"))
        if used < len(resolved) and len(issues) == n_issues:  # (a broken turn already explains it)
            issues.append(_issue(where, f"{len(resolved) - used} image(s) listed but not referenced by <image>"))
    return out, issues


def import_yochameleon(json_paths: Sequence[Path | str] | Path | str, name: str, out_dir: Path | str, *,
                       image_root: Path | str | None = None, seed: int = 0, overwrite: bool = False,
                       options=None) -> Path:
    """One prepared folder from Yo'Chameleon JSONs. ``train`` lists the positive images (recognition
    "yes" and full-token generation targets), ``negatives`` the recognition "no" images; the samples
    are the imported ones only."""
    from unipers.data.images import Photo, PhotoError, open_rgb, pixel_digest
    from unipers.data.prepare import ConceptInputs, PrepareOptions, build_prepared

    validate_name(name)
    opts = options or PrepareOptions()
    paths = [json_paths] if isinstance(json_paths, (str, Path)) else list(json_paths)
    samples, issues = [], []
    for p in paths:
        s, i = read_yochameleon(p, name, image_root=image_root, num_gen_slots=opts.num_gen_slots)
        samples += s
        issues += i
    if not samples:
        raise ValueError(f"no usable records in {', '.join(map(str, paths))} ({len(issues)} issue(s))")
    full_gen = lambda s: s.task == "generation" and s.gen_slots is None  # noqa: E731
    pos = dict.fromkeys(s.image for s in samples if s.image and (s.label is True or full_gen(s)))
    neg = dict.fromkeys(s.image for s in samples if s.image and s.label is False and s.image not in pos)
    train = []
    for src in pos:
        try:
            img = open_rgb(src, max_side=opts.max_side)
        except PhotoError as e:
            issues.append(_issue(src, e.reason))
            continue
        train.append(Photo(Path(src), img, pixel_digest(img)))
    inputs = ConceptInputs(name=name, train=train, given_negatives=list(neg), extra_samples=samples, issues=issues,
                           generate_samples=False)
    return build_prepared(inputs, Path(out_dir), seed=seed, val_fraction=0.0, overwrite=overwrite, options=opts)
