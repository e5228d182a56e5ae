"""Turn a folder of photos into a prepared concept folder (manifest + images); ``unipers prepare`` is its
command (prepare_cli.py).

    out = prepare_concept("photos/bo", "bo", "data/bo", class_word="dog", facts="bo_facts.txt",
                          negatives="/data/pool", clip_path="/models/clip-vit-large-patch14")

Photos are validated (images.py), split into train/val (seeded; validation photos are held out of
training), negatives and soft positives retrieved from a pool with CLIP (retrieval.py), samples generated
(samples.py) and everything written to a temporary folder that replaces OUT in one rename (manifest.py).
Identical inputs and seed give byte-identical ``manifest.jsonl`` and ``concept.json``. The importers
(importers.py: Yo'LLaVA, Yo'Chameleon and the benchmark readers) write the same folders through `build_prepared`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class PrepareOptions:
    """Settings of ``prepare`` beyond the common keyword arguments; the defaults suit 3-10 photos."""

    max_side: int = 1024
    """photos larger than this (longest side, px) are downscaled"""
    min_side: int = 64
    """photos smaller than this (shortest side, px) are refused"""
    min_val: int = 1
    """at least this many validation photos when there are >= 3 photos and val_fraction > 0"""
    n_hard: int = 100
    """hard negatives: the most CLIP-similar pool images after the soft positives"""
    n_easy: int = 100
    """easy negatives: drawn at random (seeded) from the rest of the pool"""
    n_soft: int = 20
    """soft positives: the most similar pool images, trained as generation targets with fewer slots"""
    near_duplicate: float = 0.95
    """pool images above this cosine to any concept photo are treated as the concept and left out"""
    soft_range: tuple[float, float] | None = None
    """similarity range mapped linearly to [1, num_gen_slots]; None = the soft positives' own min..max"""
    num_gen_slots: int = 8
    """generation slots of a concept (a soft positive's prompt uses 1..num_gen_slots of them)"""
    batch_size: int = 32
    """CLIP embedding batch size"""
    num_workers: int = 0
    """DataLoader workers decoding pool images"""
    device: str | None = None
    """CLIP device; None = cuda if available else cpu"""
    clip_cache: Path | None = None
    """embedding cache folder when the pool is read-only; None = .unipers_clip_cache beside OUT"""
    questions_per_photo: int = 4
    """minimum recognition questions per positive photo (more when there are many negatives)"""
    neg_per_pos: float = 1.0
    """negative recognition samples per positive recognition sample"""
    captions_per_photo: int = 2
    """distinct caption templates per photo"""
    quiet: bool = False
    """no progress bar"""


@dataclass
class ConceptInputs:
    """Everything ``build_prepared`` writes, gathered by ``prepare_concept`` or an importer."""

    name: str
    train: list  # list[Photo]
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)
    test_negatives: list = field(default_factory=list)  # paths: other concepts' test photos
    shared_test_negatives: dict = field(default_factory=dict)  # already written beside OUT: {relative path: source}
    given_negatives: list = field(default_factory=list)  # paths (e.g. Yo'LLaVA negative_example/)
    val_negatives: list | None = None  # paths held out by an importer; None: split the negatives here
    generate_samples: bool = True  # False: only extra_samples (an importer brings its own)
    class_word: str | None = None
    facts: list = field(default_factory=list)
    fact_pairs: list = field(default_factory=list)
    facts_source: str | None = None
    extra_samples: list = field(default_factory=list)  # Samples whose image is a source path
    photo_report: dict = field(default_factory=dict)  # skipped / duplicates / ignored
    issues: list = field(default_factory=list)  # importer problems, {"where", "problem"}
    subsets: dict = field(default_factory=dict)  # {source path: named test set}: its samples get ``subset``
    template_captions: bool = True  # False: the importer brings real captions, no templated ones are made
    photo_prompts: dict = field(default_factory=dict)  # {source path: generation prompt of that photo}


def split_indices(n: int, val_fraction: float, seed: int, min_val: int = 1) -> tuple[list[int], list[int]]:
    """(train, val) indices: round(n * val_fraction) validation photos, at least ``min_val`` when n >= 3
    and val_fraction > 0, always at least one train photo. Seeded; both lists sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 3:
        n_val = max(n_val, min_val)
    n_val = max(0, min(n_val, n - 1))
    val = sorted(random.Random(f"{seed}/split").sample(range(n), n_val))
    return [i for i in range(n) if i not in set(val)], val


def prepare_concept(photos_dir: Path | str, name: str, out_dir: Path | str, *, class_word: str | None = None,
                    facts: Path | str | None = None, negatives: Path | str | None = None,
                    clip_path: Path | str | None = None, seed: int = 0, val_fraction: float = 0.2,
                    skip_bad: bool = False, overwrite: bool = False, options: PrepareOptions | None = None,
                    captions: Path | str | None = None) -> Path:
    """Validate the photos in ``photos_dir``, split them, retrieve negatives / soft positives when both
    ``negatives`` (pool folder) and ``clip_path`` are given, and write the prepared folder ``out_dir``.
    ``captions``: a JSON object {photo file name: its generation prompt} (`samples.read_photo_prompts`);
    the other photos keep "A photo of <name>.".

    Raises ``PhotoError`` (naming the file or folder), ``FileExistsError`` (``out_dir`` exists and not
    ``overwrite``) or ``ValueError``; on any failure ``out_dir`` is left as it was."""
    from unipers.concepts.names import validate_name
    from unipers.data.images import load_photos
    from unipers.data.samples import read_facts, read_photo_prompts
    from unipers.io import check_output

    opts = options or PrepareOptions()
    validate_name(name)
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite=overwrite, inputs=[x for x in (photos_dir, facts, negatives, captions) if x])
    photos = load_photos(photos_dir, max_side=opts.max_side, min_side=opts.min_side, skip_bad=skip_bad)
    prompts = read_photo_prompts(captions, name, [p.path.name for p in photos.photos]) if captions else {}
    tr, va = split_indices(len(photos.photos), val_fraction, seed, opts.min_val)
    fact_list, pairs = read_facts(facts, name) if facts else ([], [])
    inputs = ConceptInputs(
        name=name, train=[photos.photos[i] for i in tr], val=[photos.photos[i] for i in va], class_word=class_word,
        facts=fact_list, fact_pairs=pairs, facts_source=Path(facts).name if facts else None,
        photo_report={"skipped": photos.skipped, "duplicates": photos.duplicates, "ignored": photos.ignored},
        photo_prompts={str(p.path): prompts[p.path.name] for p in photos.photos if p.path.name in prompts})
    return build_prepared(inputs, out_dir, seed=seed, val_fraction=val_fraction, negatives=negatives,
                          clip_path=clip_path, overwrite=overwrite, options=opts)


class _ImageWriter:
    """Writes normalized PNGs into OUT/images and remembers where each came from."""

    def __init__(self, root: Path, max_side: int):
        self.root, self.max_side = root, max_side
        self.sources: dict[str, str] = {}  # "images/x.png" -> source file
        self.unreadable: list[dict] = []
        self._by_source: dict[str, str] = {}
        (root / "images").mkdir()

    def put(self, img, rel: str, src) -> str:
        from unipers.data.images import save_png

        save_png(img, self.root / rel)
        self.sources[rel] = str(src)
        self._by_source[str(Path(src).resolve())] = rel
        return rel

    def copy(self, src, prefix: str, n: int) -> str | None:
        """Decode one source file (only now, one at a time: memory stays flat) and save it."""
        from unipers.data.images import PhotoError, open_rgb

        try:
            return self.put(open_rgb(src, max_side=self.max_side), f"images/{prefix}_{n:03d}.png", src)
        except PhotoError as e:
            self.unreadable.append({"file": e.file, "reason": e.reason})
            return None

    def copy_all(self, srcs, prefix: str) -> list[str]:
        out: list[str] = []
        for src in srcs:
            if rel := self.copy(src, prefix, len(out)):
                out.append(rel)
        return out

    def saved(self, src) -> str | None:
        return self._by_source.get(str(Path(src).resolve()))


def split_negatives(negs: list[str], has_val: bool, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out negatives like photos, so validation recognition has unseen negatives too."""
    n_val = min(len(negs) - 1, max(1, round(len(negs) * val_fraction))) if has_val and len(negs) > 1 else 0
    pick = set(random.Random(f"{seed}/neg-split").sample(range(len(negs)), n_val))
    return [n for i, n in enumerate(negs) if i not in pick], [n for i, n in enumerate(negs) if i in pick]


def generate_samples(inp: ConceptInputs, images: dict, soft: list[dict], seed: int, opts: PrepareOptions,
                     photo_prompts: dict | None = None) -> list:
    """All generated samples, grouped by task and split, in a fixed order (one seeded RNG stream);
    ``photo_prompts``: {image: generation prompt} for photos whose prompt is given."""
    from unipers.data import samples as S

    rng = random.Random(f"{seed}/samples")
    out = []
    for split in ("train", "val"):
        pos, neg = images[split], images[f"{split}_negatives"]
        per_pos, n_neg = S.balanced_counts(len(pos), len(neg), questions_per_photo=opts.questions_per_photo,
                                           neg_per_pos=opts.neg_per_pos)
        out += S.recognition_samples(inp.name, pos, neg, split, rng, per_positive=per_pos, n_negative=n_neg)
    if images["test"]:  # benchmark protocol: every test image is asked once
        out += S.recognition_samples(inp.name, images["test"], images["test_negatives"], "test", rng,
                                     per_positive=1, n_negative=len(images["test_negatives"]))
    out += S.qa_samples(inp.name, inp.facts, inp.fact_pairs, rng, source=inp.facts_source)
    for split in ("train", "val", "test") if inp.template_captions else ():
        out += S.caption_samples(inp.name, inp.class_word, images[split], split, rng,
                                 per_image=opts.captions_per_photo if split == "train" else 1)
    for split in ("train", "val", "test"):
        out += S.generation_samples(inp.name, images[split], split, photo_prompts)
    return out + S.soft_positive_samples(inp.name, soft)


def fact_samples(inp: ConceptInputs, seed: int) -> list:
    """The facts' QA alone, for an importer that brings every other sample itself."""
    from unipers.data import samples as S

    return S.qa_samples(inp.name, inp.facts, inp.fact_pairs, random.Random(f"{seed}/samples"), source=inp.facts_source)


def _imported_samples(extra: list, writer: _ImageWriter, issues: list[dict]) -> list:
    """Importer records point at source files: map them to the saved copies (copying new ones)."""
    out, n_extra = [], 0
    for s in extra:
        if s.image is not None:
            rel = writer.saved(s.image)
            if rel is None:
                rel = writer.copy(s.image, "extra", n_extra)
                if rel is None:
                    issues.append({"where": s.source or str(s.image), "problem": f"unreadable image {s.image}"})
                    continue
                n_extra += 1
            s = dataclasses.replace(s, image=rel)
        out.append(s)
    return out


def build_prepared(inp: ConceptInputs, out_dir: Path, *, seed: int, val_fraction: float, negatives=None,
                   clip_path=None, overwrite: bool = False, options: PrepareOptions | None = None) -> Path:
    """Retrieve, generate samples and write the prepared folder for already-loaded photos."""
    from unipers import __version__
    from unipers.data.manifest import atomic_dir, write_json, write_manifest
    from unipers.data.retrieval import retrieve_for_concept

    opts = options or PrepareOptions()
    out_dir = Path(out_dir).absolute()
    found = retrieve_for_concept([p.image for p in inp.train], [p.image for p in inp.train + inp.val], negatives,
                                 clip_path, seed=seed, options=opts, out_dir=out_dir)
    neg_sources = [(Path(p), "given", None) for p in inp.given_negatives] + found.negatives
    sources = [p.path for p in inp.train + inp.val + inp.test if getattr(p, "path", None)]
    sources += [*inp.given_negatives, *(inp.val_negatives or []), *inp.test_negatives,
                *inp.shared_test_negatives.values(), *([negatives] if negatives else [])]
    with atomic_dir(out_dir, overwrite=overwrite, kind="prepared concept", inputs=sources) as tmp:
        w = _ImageWriter(tmp, opts.max_side)
        images = {role: [w.put(p.image, f"images/{role}_{i:03d}.png", p.path) for i, p in enumerate(getattr(inp, role))]
                  for role in ("train", "val", "test")}
        images["test_negatives"] = w.copy_all(inp.test_negatives, "testneg") + list(inp.shared_test_negatives)
        w.sources.update(inp.shared_test_negatives)
        negs, neg_info = [], []
        for src, kind, sim in neg_sources:
            if rel := w.copy(src, "neg", len(negs)):
                negs.append(rel)
                neg_info.append({"image": rel, "kind": kind, **({"similarity": sim} if sim is not None else {})})
        soft = []
        for src, sim, slots in found.soft:
            if rel := w.copy(src, "soft", len(soft)):
                soft.append({"image": rel, "similarity": sim, "gen_slots": slots})
        if inp.val_negatives is None:
            images["train_negatives"], images["val_negatives"] = split_negatives(negs, bool(images["val"]),
                                                                                 val_fraction, seed)
        else:
            images["train_negatives"], images["val_negatives"] = negs, w.copy_all(inp.val_negatives, "valneg")
            neg_info += [{"image": rel, "kind": "given"} for rel in images["val_negatives"]]
        given = {rel: inp.photo_prompts[src] for rel, src in w.sources.items() if src in inp.photo_prompts}
        samples = (generate_samples(inp, images, soft, seed, opts, given) if inp.generate_samples
                   else fact_samples(inp, seed))
        issues = list(inp.issues)
        samples += _imported_samples(inp.extra_samples, w, issues)
        if inp.subsets:  # a benchmark's named test sets: each sample about one of their images says which
            named = {rel: inp.subsets[src] for rel, src in w.sources.items() if src in inp.subsets}
            samples = [dataclasses.replace(s, subset=named[s.image]) if s.image in named and s.subset is None else s
                       for s in samples]
        concept = {
            "name": inp.name, "class_word": inp.class_word, "seed": seed, "unipers_version": __version__,
            "train": images["train"], "val": images["val"], "test": images["test"],
            "negatives": images["train_negatives"], "val_negatives": images["val_negatives"],
            "test_negatives": images["test_negatives"], "soft_positives": soft,
            "facts": inp.facts or inp.fact_pairs,
            "skipped": inp.photo_report.get("skipped", []), "duplicates": inp.photo_report.get("duplicates", []),
            "ignored": inp.photo_report.get("ignored", []), "unreadable_pool_files": w.unreadable,
            "retrieval": found.summary, "negative_details": neg_info, "import_issues": issues,
            "settings": {"val_fraction": val_fraction, "max_side": opts.max_side, "min_side": opts.min_side,
                         "num_gen_slots": opts.num_gen_slots, "questions_per_photo": opts.questions_per_photo,
                         "neg_per_pos": opts.neg_per_pos, "captions_per_photo": opts.captions_per_photo},
            "sources": w.sources,
        }
        write_json(tmp / "concept.json", concept)
        write_manifest(tmp / "manifest.jsonl", samples)
        (tmp / "report.txt").write_text(format_report(concept, samples, found.notes), encoding="utf-8")
    return out_dir


def format_report(concept: dict, samples: Sequence, notes: Sequence[str] = ()) -> str:
    """report.txt: short human-readable counts (also printed by the CLI)."""
    cw = f" ({concept['class_word']})" if concept.get("class_word") else ""
    lines = [f"concept <{concept['name']}>{cw}, seed {concept['seed']}"]
    n_kept = len(concept["train"]) + len(concept["val"]) + len(concept["test"])
    lines.append(f"photos: {n_kept} kept, {len(concept['skipped'])} skipped, "
                 f"{len(concept['duplicates'])} duplicate(s), {len(concept['ignored'])} non-image file(s) ignored")
    lines += [f"  skipped   {d['file']}: {d['reason']}" for d in concept["skipped"]]
    lines += [f"  duplicate {d['file']} (same pixels as {d['same_as']})" for d in concept["duplicates"]]
    lines += [f"  ignored   {f}" for f in concept["ignored"]]
    split = f"split: {len(concept['train'])} train, {len(concept['val'])} val"
    lines.append(split + (f", {len(concept['test'])} test" if concept["test"] else ""))
    r = concept["retrieval"]
    if "skipped" in r:
        lines.append(f"retrieval: skipped ({r['skipped']})")
    else:
        lines.append(f"retrieval: pool {r['pool']} ({r['pool_size']} images), "
                     f"{len(r['near_duplicates'])} near-duplicate(s) of the concept excluded, "
                     f"{len(r['unreadable'])} unreadable")
    kinds: dict[str, int] = {}
    for d in concept["negative_details"]:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    by_kind = ", ".join(f"{v} {k}" for k, v in kinds.items()) or "none"
    lines.append(f"negatives: {len(concept['negatives'])} train + {len(concept['val_negatives'])} val ({by_kind})"
                 + (f"; {len(concept['test_negatives'])} test" if concept["test_negatives"] else ""))
    soft = concept["soft_positives"]
    if soft:
        sims, slots = [s["similarity"] for s in soft], [s["gen_slots"] for s in soft]
        lines.append(f"soft positives: {len(soft)} (similarity {min(sims):.3f}-{max(sims):.3f}, "
                     f"gen slots {min(slots)}-{max(slots)})")
    else:
        lines.append("soft positives: none")
    lines.append(f"facts: {len(concept['facts'])}")
    subsets: dict[str, int] = {}
    for s in samples:
        if s.subset:
            subsets[f"{s.split}/{s.subset}"] = subsets.get(f"{s.split}/{s.subset}", 0) + 1
    if subsets:
        lines.append("named sets: " + ", ".join(f"{k} ({v} samples)" for k, v in sorted(subsets.items())))
    multi = sum(1 for s in samples if s.concepts and len(s.concepts) > 1)
    if multi:
        lines.append(f"multi-concept samples: {multi}")
    lines += [f"note: {n}" for n in notes]
    if concept["import_issues"]:
        lines.append(f"import issues: {len(concept['import_issues'])}")
        lines += [f"  {d['where']}: {d['problem']}" for d in concept["import_issues"]]
    counts: dict[tuple[str, str], int] = {}
    for s in samples:
        counts[(s.task, s.split)] = counts.get((s.task, s.split), 0) + 1
    splits = [sp for sp in ("train", "val", "test") if any(k[1] == sp for k in counts)]
    lines.append(f"samples: {len(samples)}")
    lines.append("  " + "task".ljust(12) + "".join(sp.rjust(7) for sp in splits))
    for task in ("recognition", "qa", "vqa", "caption", "generation"):
        if any(k[0] == task for k in counts):
            lines.append("  " + task.ljust(12) + "".join(str(counts.get((task, sp), 0)).rjust(7) for sp in splits))
    return "\n".join(lines) + "\n"
