"""Yo'LLaVA data -> prepared concept folders (``unipers prepare --from-yollava``); importers.py describes
the formats."""

from __future__ import annotations

import json
import random
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from unipers.concepts.names import validate_name
from unipers.data.importers_common import (ImportRefused, check_val_fraction, held_out_split, inside, issue,
                                           lexical, read_facts_option, resolve_under)
from unipers.data.manifest import Sample
from unipers.data.samples import normalize_mentions

VISUAL_QA = "yollava-visual-qa.json"
"""Yo'LLaVA's visual QA, published in its repository as ``yollava-data/yollava-visual-qa.json``."""
TEXT_QA = "yollava-text-only-qa.json"
"""The text-only QA over the same concepts, published by RAP (Hoar012/RAP-MLLM) as
``eval/yollava-text-only-qa.json``; Yo'LLaVA itself publishes none."""
SHARED = ".shared"
"""Folder beside the imported concept folders that holds each test photo used as another concept's negative
once, named by its pixels; manifests refer to it as ``../.shared/<digest>.png``. Hidden, so that
``ls -d OUT/*/`` and ``unipers eval --data OUT`` list concept folders only."""
UNREAD = (f"not read: the QA files read are {VISUAL_QA}, {TEXT_QA}, test/<concept>/*.json and those given "
          "with --visual-qa / --text-qa")


def _concept_of(ref: str) -> str | None:
    """The concept folder an image reference names (``.../test/bo/0.png`` -> bo), if any."""
    parts = PurePosixPath(ref.replace("\\", "/")).parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i] in ("test", "train"):
            return parts[i + 1]
    return None


def _item(item, ref, concept: str, root: Path, alias: str, split: str, where: str) -> tuple[Sample | None, str]:
    """One QA item as a sample, or the reason it cannot be one."""
    if not isinstance(item, dict):
        return None, f"item is a {type(item).__name__}, expected an object"
    visual = "option" not in item
    opts, q, ans = item.get("options" if visual else "option"), item.get("question"), item.get("correct_answer")
    if not isinstance(q, str):
        return None, "missing or non-string 'question'"
    if not isinstance(opts, dict) or not opts or not all(isinstance(v, str) for v in opts.values()):
        return None, "missing 'options'/'option' (an object of letter -> text)"
    if ans not in opts:
        return None, f"correct_answer {ans!r} is not one of the options {sorted(opts)}"
    image = None
    if visual:
        if not isinstance(ref, str):
            return None, "visual question without an image"
        image = resolve_under(ref, root)
        if image is None:
            return None, f"image not found under {root}: {ref}"
    fix = lambda t: normalize_mentions(t, concept, [alias], bare_name=False)  # noqa: E731
    return Sample("vqa" if visual else "qa", concept, split, image=str(image) if image else None, question=fix(q),
                  answer=ans, options={k: fix(v) for k, v in opts.items()}, source=where), ""


def parse_qa_file(path: Path | str, root: Path | str, *, owner: str | None = None, alias: str = "sks",
                  split: str = "test") -> tuple[dict[str, tuple[list[Sample], list[dict]]], list[dict]]:
    """Every item of one QA file: ``({concept: (samples, issues)}, issues that belong to no concept)``.

    A file is keyed by concept (``{"bo": {key: item}}``) or flat (``{key: item}``); a flat item belongs to
    the concept folder its image path names, else to ``owner`` (the file lies in ``test/<owner>/``); one
    that names no concept is an issue, never given to every concept."""
    path, root = Path(path), Path(root)
    name = lexical(path).relative_to(lexical(root)).as_posix() if inside(path, root) else path.as_posix()
    top = f"yollava:{name}"
    by: dict[str, tuple[list, list]] = {}
    loose: list[dict] = []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return by, [issue(top, f"cannot read JSON: {e}")]
    if not isinstance(data, dict):
        return by, [issue(top, f"expected a JSON object, got {type(data).__name__}")]
    if not data:
        return by, [issue(top, "no questions in this file")]
    # a question object has a "question" (text); a concept's object of questions could have an item keyed "question"
    flat = all(isinstance(v, dict) and "question" in v and not isinstance(v["question"], dict) for v in data.values())
    groups = [(None, "", data)] if flat else []
    for c, items in ([] if flat else data.items()):
        if isinstance(items, dict):
            groups.append((c, f"{c}/", items))
        else:
            loose.append(issue(f"{top}#{c}", f"expected an object of questions about {c!r} (or a question "
                                             f"object), got {type(items).__name__}"))
    for keyed, prefix, items in groups:
        for key, item in items.items():
            where = f"{top}#{prefix}{key}"
            ref = item.get("image", key if Path(str(key)).suffix else None) if isinstance(item, dict) else None
            concept = keyed or (_concept_of(ref) if isinstance(ref, str) else None) or owner
            if concept is None:
                loose.append(issue(where, "cannot tell which concept this question is about: the file is not "
                                          "keyed by concept and " + ("its image path names no test/<concept>/ "
                                          "folder" if isinstance(ref, str) else "it has no image")))
                continue
            sample, problem = _item(item, ref, concept, root, alias, split, where)
            samples, issues = by.setdefault(concept, ([], []))
            if sample is None:
                issues.append(issue(where, problem))
            else:
                samples.append(sample)
    return by, loose


def read_yollava_qa(path: Path | str, concept: str, *, root: Path | str, alias: str = "sks",
                    split: str = "test") -> tuple[list[Sample], list[dict]]:
    """Multiple-choice QA about ``concept`` from one QA file: ``vqa`` samples (``options`` + image) and
    text-only ``qa`` samples (``option``); the answer is the correct letter, images are source paths under
    ``root``. The issues are the concept's items that could not be used and the file's own problems."""
    by, loose = parse_qa_file(path, root, alias=alias, split=split)
    samples, issues = by.get(concept, ([], []))
    return samples, loose + issues


def _paths(given) -> list[Path]:
    if given is None:
        return []
    return [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given]


def qa_files(root: Path, available: Sequence[str], visual_qa: Sequence[Path],
             text_qa: Sequence[Path]) -> tuple[list[tuple[Path, str | None]], list[dict]]:
    """(file, owner concept) of every QA file to read, and issues for JSON files in ROOT left unread.
    Defaults and given files add up; a file given twice is read once."""
    files: dict[Path, tuple[Path, str | None]] = {}
    for n in (VISUAL_QA, TEXT_QA):
        if (root / n).is_file():
            files.setdefault(lexical(root / n), (root / n, None))
    for flag, given in (("--visual-qa", visual_qa), ("--text-qa", text_qa)):
        for p in given:
            if not p.is_file():
                raise ImportRefused(f"{flag} {p}: file not found")
            files.setdefault(lexical(p), (p, None))
    for c in available:
        if (root / "test" / c).is_dir():
            for p in sorted((root / "test" / c).glob("*.json")):
                files.setdefault(lexical(p), (p, c))
    unread = [issue(f"yollava:{p.name}", UNREAD) for p in sorted(root.glob("*.json")) if lexical(p) not in files]
    return list(files.values()), unread


def gather_qa(root: Path, available: Sequence[str], files: Iterable[tuple[Path, str | None]]):
    """({concept: (samples, issues)}, issues of no imported concept) over all QA files."""
    per = {c: ([], []) for c in available}
    common: list[dict] = []
    for path, owner in files:
        by, loose = parse_qa_file(path, root, owner=owner)
        common += loose
        for c, (samples, issues) in by.items():
            if c in per:
                per[c][0].extend(samples)
                per[c][1].extend(issues)
                continue
            gone = f"concept {c!r} has no folder train/{c}"
            common += [issue(s.source, gone) for s in samples]
            common += [issue(d["where"], f"{gone}; and {d['problem']}") for d in issues]
    return per, common


def _check_shared(out_root: Path) -> None:
    from unipers.io import MARKER, OutputError

    shared = out_root / SHARED
    if (shared.exists() or shared.is_symlink()) and (shared.is_symlink() or not (shared / MARKER).is_file()):
        raise OutputError(f"{shared}: exists and was not written by unipers (no {MARKER} in it); imported "
                          "concepts keep their shared test photos there. Move it away or choose another --out")


def write_shared(out_root: Path, files: Sequence[Path], opts, skip_bad: bool) -> tuple[dict[str, str], list[dict]]:
    """Write each file once into ``OUT/.shared/`` (normalised PNG named by its pixels; files already there
    are kept, since other concept folders may refer to them) and return {source: path relative to a
    concept folder}, and the files that could not be used (``skip_bad``)."""
    from unipers.data.images import PhotoError, load_photo, pixel_digest, save_png
    from unipers.io import MARKER, atomic_file, mark_output

    refs, bad = {}, []
    if not files:
        return refs, bad
    shared = out_root / SHARED
    shared.mkdir(parents=True, exist_ok=True)
    if not (shared / MARKER).is_file():
        mark_output(shared, "shared test photos of imported concepts")
    for src in files:
        try:
            photo = load_photo(src, max_side=opts.max_side, min_side=opts.min_side)
        except PhotoError as e:
            if not skip_bad:
                raise PhotoError(e.file, e.reason + " (use --skip-bad to skip such files)") from None
            bad.append({"file": str(src), "reason": e.reason})
            continue
        name = f"{pixel_digest(photo.image)[:32]}.png"
        if not (shared / name).is_file():
            with atomic_file(shared / name, suffix=".png.tmp") as tmp:
                save_png(photo.image, tmp)
        refs[str(src)] = f"../{SHARED}/{name}"
    return refs, bad


def import_yollava(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                   visual_qa: Path | Sequence[Path] | None = None, text_qa: Path | Sequence[Path] | None = None,
                   class_word: str | None = None, facts: Path | str | None = None, seed: int = 0,
                   val_fraction: float = 0.0, negatives: Path | None = None, clip_path: Path | None = None,
                   skip_bad: bool = False, overwrite: bool = False, options=None,
                   max_test_negatives: int | None = None) -> list[Path]:
    """One prepared folder per concept, ``out_root/<concept>``; returns their paths. ``class_word`` and
    ``facts`` describe one concept, so they need ``concepts`` to name exactly one."""
    from unipers.data.images import PhotoSet, list_image_files, load_photos
    from unipers.data.prepare import ConceptInputs, PrepareOptions, build_prepared
    from unipers.io import check_output

    root, out_root = Path(root), Path(out_root)
    opts = options or PrepareOptions()
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"not a Yo'LLaVA folder (no train/ inside): {root}")
    available = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if not available:
        raise ImportRefused(f"{root / 'train'}: no concept folders in it")
    wanted = list(concepts) if concepts else available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ImportRefused(f"concept(s) not in {root / 'train'}: {', '.join(missing)} "
                            f"(available: {', '.join(available)})")
    for c in wanted:  # every name before any work, by the rule training applies
        validate_name(c)
    check_val_fraction(val_fraction)
    for flag, value in (("--class-word", class_word), ("--facts", facts)):
        if value is not None and len(wanted) != 1:
            raise ImportRefused(f"{flag} describes one concept: give --name to import one concept with it")
    files, unread = qa_files(root, available, _paths(visual_qa), _paths(text_qa))
    test_files = {c: list_image_files(root / "test" / c)[0] if (root / "test" / c).is_dir() else [] for c in available}
    for c in wanted:  # held out: the test photos, or validation photos when val_fraction > 0
        if not test_files[c] and not (val_fraction > 0 and len(list_image_files(root / "train" / c)[0]) >= 2):
            raise ImportRefused(f"{root / 'test' / c}: no test photos, so no photo of <{c}> would be held out "
                                "for eval; add some or give --val-fraction to hold out train photos")
    fact_list, pairs, facts_source = read_facts_option(facts, wanted[0])
    read_from = [root, *(f for f, _ in files), *([facts] if facts else [])]
    for c in wanted:  # before the slow part: a refused folder must not stop the import half way
        check_output(out_root / c, overwrite=overwrite, inputs=read_from)
    test_negs = {}
    for c in wanted:  # the benchmark protocol: every other concept's test photos are this one's negatives
        others = [f for o in available if o != c for f in test_files[o]]
        if max_test_negatives is not None and len(others) > max_test_negatives:
            others = sorted(random.Random(f"{seed}/test-neg/{c}").sample(others, max_test_negatives))
        test_negs[c] = others
    needed = list(dict.fromkeys(f for c in wanted for f in test_negs[c]))
    if needed:
        _check_shared(out_root)
    qa, common = gather_qa(root, available, files)
    common += unread
    refs, bad = write_shared(out_root, needed, opts, skip_bad)
    outs = []
    for c in wanted:
        train = load_photos(root / "train" / c, max_side=opts.max_side, min_side=opts.min_side, skip_bad=skip_bad)
        test = (load_photos(root / "test" / c, max_side=opts.max_side, min_side=opts.min_side, skip_bad=skip_bad)
                if test_files[c] else PhotoSet(root / "test" / c))
        tr, va = held_out_split(len(train.photos), val_fraction, seed, opts.min_val)
        if not test.photos and not va:
            raise ImportRefused(f"{root / 'train' / c}: too few usable photos to hold one out for eval")
        neg_dir = root / "train" / c / "negative_example"
        given = list_image_files(neg_dir)[0] if neg_dir.is_dir() and negatives is None else []
        mine = {str(f) for f in test_negs[c]}
        samples, issues = qa[c]
        issues = issues + common + [issue(f"yollava:{d['file']}", f"test photo not used as a negative: {d['reason']}")
                                    for d in bad if d["file"] in mine]
        inputs = ConceptInputs(
            name=c, train=[train.photos[i] for i in tr], val=[train.photos[i] for i in va], test=test.photos,
            shared_test_negatives={refs[f]: f for f in map(str, test_negs[c]) if f in refs},
            given_negatives=given, class_word=class_word, facts=fact_list, fact_pairs=pairs,
            facts_source=facts_source, extra_samples=samples, issues=issues,
            photo_report={k: getattr(train, k) + getattr(test, k) for k in ("skipped", "duplicates", "ignored")})
        outs.append(build_prepared(inputs, out_root / c, seed=seed, val_fraction=val_fraction, negatives=negatives,
                                   clip_path=clip_path, overwrite=overwrite, options=opts))
    return outs
