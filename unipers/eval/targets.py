"""What the benchmark asks about each concept, read from prepared folders (``unipers prepare`` / importers).

    folders = expand_data_dirs(["data/yollava"])        # a dataset root expands to its concept folders
    targets = load_targets(folders, names=["bo", "mam"])

Held-out only: each task uses its ``test`` samples when the manifest has any, else its ``val`` ones;
``train`` samples are never scored. Recognition asks about each distinct image once (the benchmark
protocol), whatever number of question templates the manifest holds for it:

- positives: the concept's held-out photos (recognition samples with label true);
- negatives: the images of the same split's label-false samples (retrieved or given negatives, other
  concepts' test photos in Yo'LLaVA imports), plus every *other evaluated* concept's held-out positives.

Images are identified by content (SHA-1 of the decoded pixels), because every prepared folder holds its own copy
of a shared image; a negative with the same bytes as one of the concept's positives is dropped.

Held-out recognition images also fall into named sets, each scored apart (``EvalTarget.subsets``):

- the ``subset`` a sample names (a benchmark's shifted test sets; the demo's near-misses);
- ``hard_negatives`` / ``easy_negatives``: negatives ``prepare`` retrieved as the most similar pool images,
  or drew at random (concept.json's negative_details);
- ``with_others``: photos that show other concepts too (the sample's ``concepts`` names more than one);
- ``other_concepts``: the other evaluated concepts' held-out photos, added as negatives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from unipers.data.manifest import Sample, read_prepared

HELD_OUT = ("test", "val")
CHOICE_TASKS = ("vqa", "qa")


@dataclass
class EvalTarget:
    """One concept's evaluation data (image paths are absolute)."""

    name: str
    folder: Path
    class_word: Optional[str]
    facts: list
    references: list[Path]
    """train photos: CLIP-I / DINO references, and the photo in context of the `image` baseline"""
    split: Optional[str] = None
    """held-out split of recognition and captions (test, else val; None: no held-out photos)"""
    positives: list[Path] = field(default_factory=list)
    own_negatives: list[Path] = field(default_factory=list)
    negatives: list[Path] = field(default_factory=list)
    """own negatives + other evaluated concepts' positives, unique by content"""
    subsets: dict[str, set[str]] = field(default_factory=dict)
    """named set -> content keys of its held-out recognition images (positives and negatives)"""
    choices: dict[str, list[Sample]] = field(default_factory=dict)
    """vqa / qa multiple-choice samples of their held-out split"""
    open: dict[str, list[Sample]] = field(default_factory=dict)
    """vqa / qa open-ended samples (a reference answer, no options) of their held-out split: the judge's"""
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {"split": self.split, "positives": len(self.positives), "negatives": len(self.negatives),
                "references": len(self.references), **{k: len(v) for k, v in self.choices.items()},
                **{f"{k}_open": len(v) for k, v in self.open.items()}}


def expand_data_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Prepared folders: each path is one (it holds concept.json) or a dataset root whose subfolders are."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "concept.json").is_file():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "concept.json").is_file()) if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{p}: not a prepared concept folder (no concept.json), nor a folder of them")
        out.extend(subs)
    return out


def concept_names(folders: Iterable[Path]) -> dict[str, Path]:
    """concept.json "name" -> folder; the same name twice is an error naming both folders."""
    import json

    names: dict[str, Path] = {}
    for folder in map(Path, folders):
        name = json.loads((folder / "concept.json").read_text(encoding="utf-8"))["name"]
        if name in names:
            raise ValueError(f"concept {name!r} is prepared twice: {names[name]} and {folder}")
        names[name] = folder
    return names


def _held_out(samples: list[Sample], keep) -> tuple[Optional[str], list[Sample]]:
    for split in HELD_OUT:
        chosen = [s for s in samples if s.split == split and keep(s)]
        if chosen:
            return split, chosen
    return None, []


def content_key(path: Path, _cache: dict = {}) -> str:  # noqa: B006  (a process-wide cache on purpose)
    """The decoded pixels' digest (`unipers.data.images.pixel_digest`): two folders' copies of one photo get
    the same key even if their files were encoded differently."""
    key = str(path)
    if key not in _cache:
        from PIL import Image

        from unipers.data.images import pixel_digest

        with Image.open(path) as im:
            _cache[key] = pixel_digest(im.convert("RGB"))
    return _cache[key]


def _unique(paths: Iterable[Path], exclude: set[str] = frozenset()) -> list[Path]:
    seen, out = set(exclude), []
    for p in paths:
        k = content_key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def read_target(folder: Path) -> EvalTarget:
    """One concept's held-out data; negatives from other concepts are added by `load_targets`."""
    folder = Path(folder).absolute()
    concept, samples = read_prepared(folder)
    name = concept["name"]
    samples = [s for s in samples if s.concept == name]
    target = EvalTarget(name, folder, concept.get("class_word"), list(concept.get("facts") or []),
                        [folder / p for p in concept.get("train", [])])
    rec = [s for s in samples if s.task == "recognition"]
    target.split, pos = _held_out(rec, lambda s: s.label)
    if target.split is None:
        target.notes.append("no held-out recognition photos (val/test): recognition and captions not scored")
    target.positives = _unique(folder / s.image for s in pos)
    target.own_negatives = _unique((folder / s.image for s in rec if s.split == target.split and not s.label),
                                   {content_key(p) for p in target.positives})
    target.subsets = _subsets(folder, concept, [s for s in rec if s.split == target.split])
    for task in CHOICE_TASKS:
        target.choices[task] = _held_out([s for s in samples if s.task == task], lambda s: bool(s.options))[1]
        target.open[task] = _held_out([s for s in samples if s.task == task],
                                      lambda s: not s.options and bool(s.answer))[1]
    if not target.class_word:
        target.notes.append("no class word in concept.json: CLIP-T not scored; the no-info baseline says 'the object'")
    if not target.references:
        target.notes.append("no train photos: CLIP-I, DINO and the photo-in-context baseline are not scored")
    return target


def load_targets(folders: Sequence[Path], names: Optional[Iterable[str]] = None) -> dict[str, EvalTarget]:
    """Targets for the concepts `names` (default: every folder's), each with the others' positives added
    to its negatives."""
    by_name = concept_names(folders)
    wanted = list(by_name) if names is None else list(names)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        have = ", ".join(sorted(by_name)) or "none"
        raise ValueError(f"no prepared folder for concept(s) {', '.join(missing)} among --data (folders hold: {have})")
    targets = {n: read_target(by_name[n]) for n in wanted}
    for t in targets.values():
        own = {content_key(p) for p in t.positives}
        others = [p for o in targets.values() if o is not t for p in o.positives]
        t.negatives = _unique([*t.own_negatives, *others], own)
        if others:
            t.subsets["other_concepts"] = {content_key(p) for p in others} - own
    return targets


def _subsets(folder: Path, concept: dict, held_out: list[Sample]) -> dict[str, set[str]]:
    """Named sets of held-out recognition images (module docstring), by content key."""
    kinds = {d["image"]: d["kind"] for d in concept.get("negative_details") or []
             if isinstance(d, dict) and d.get("kind") in ("hard", "easy")}
    out: dict[str, set[str]] = {}
    for s in held_out:
        names = [s.subset] if s.subset else []
        if s.concepts and len(s.concepts) > 1:
            names.append("with_others")
        if not s.label and s.image in kinds:
            names.append(f"{kinds[s.image]}_negatives")
        for name in names:
            out.setdefault(re.sub(r"[^A-Za-z0-9_.-]", "_", name), set()).add(content_key(folder / s.image))
    return out
