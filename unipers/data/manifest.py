"""The prepared-concept folder: manifest records, JSON files and the atomic folder write.

    from unipers.data.manifest import read_prepared
    concept, samples = read_prepared("data/bo")      # concept.json dict, list[Sample]

Layout of a prepared folder (written by ``unipers prepare`` and the importers)::

    OUT/concept.json    name, class_word, seed, version, image lists per role, facts, skipped files,
                        duplicates, retrieval summary (or null with a reason)
    OUT/images/         normalized RGB PNGs; every ``image`` path is relative to OUT (a Yo'LLaVA import's
                        test negatives are ``../.shared/<digest>.png``, written once beside the concepts)
    OUT/manifest.jsonl  one ``Sample`` per line (keys with a None value are left out)
    OUT/report.txt      human-readable counts

Concept mentions are written literally as ``<NAME>`` (e.g. ``<bo>``); the training code expands them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

from unipers.io import atomic_directory as atomic_dir  # noqa: F401  (prepare and importers write through it)

TASKS = ("recognition", "qa", "vqa", "caption", "generation")
SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One training / evaluation record of a concept manifest."""

    task: str
    """recognition | qa (text only) | vqa (question about an image) | caption | generation"""
    concept: str
    """concept name without brackets, e.g. ``bo``"""
    split: str = "train"
    """train | val | test"""
    image: str | None = None
    """image path relative to the prepared folder (input image, or the target for generation)"""
    question: str | None = None
    answer: str | None = None
    """answer text; for multiple choice, the correct option letter"""
    prompt: str | None = None
    """generation prompt"""
    label: bool | None = None
    """recognition: is the concept in the image"""
    options: dict[str, str] | None = None
    """multiple choice options, letter -> text"""
    gen_slots: int | None = None
    """generation: how many generation slots the prompt uses (None = all)"""
    similarity: float | None = None
    """soft positives: CLIP cosine similarity to the concept"""
    source: str | None = None
    """where the record came from, e.g. ``yollava:yollava-visual-qa.json#bo/3``"""
    concepts: list[str] | None = None
    """a multi-concept sample: every concept it names, ``concept`` among them (MC-LLaVA's scenario questions,
    kept in the folder of each concept they name); None: it names ``concept`` only"""
    subset: str | None = None
    """a named part of ``split`` that is scored apart, e.g. PODS' test sets ``in_distribution`` / ``pose``"""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (expected one of {', '.join(TASKS)})")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r} (expected one of {', '.join(SPLITS)})")
        if self.task == "recognition" and (self.image is None or self.label is None):
            raise ValueError("a recognition sample needs an image and a label")
        if self.task == "generation" and not self.prompt:
            raise ValueError("a generation sample needs a prompt")
        if self.task in ("qa", "vqa", "caption") and (self.question is None or self.answer is None):
            raise ValueError(f"a {self.task} sample needs a question and an answer")
        if self.options is not None and self.answer not in self.options:
            raise ValueError(f"answer {self.answer!r} is not one of the options {sorted(self.options)}")
        if self.gen_slots is not None and self.gen_slots < 1:
            raise ValueError("gen_slots must be >= 1")
        if self.concepts is not None and (not isinstance(self.concepts, list) or self.concept not in self.concepts
                                          or not all(isinstance(c, str) and c for c in self.concepts)):
            raise ValueError(f"concepts must be a list of concept names that holds {self.concept!r}")
        if self.subset is not None and (not isinstance(self.subset, str) or not self.subset):
            raise ValueError("subset must be a non-empty name")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> str:
        """One JSON line (field order fixed, None left out)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | dict) -> "Sample":
        d = json.loads(data) if isinstance(data, str) else dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown manifest key(s): {', '.join(unknown)}")
        return cls(**d)


def write_manifest(path: Path, samples: Iterable[Sample]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for s in samples:
            f.write(s.to_json() + "\n")
            n += 1
    return n


def read_manifest(path: Path | str) -> list[Sample]:
    """All records; a bad line raises ``ValueError`` naming the file and line number."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Sample.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{i}: {e}") from None
    return out


def write_json(path: Path, obj) -> None:
    """Stable, human-readable JSON (fixed key order as given, UTF-8, trailing newline)."""
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_prepared(folder: Path | str) -> tuple[dict, list[Sample]]:
    """(concept.json as a dict, manifest records) of a prepared folder."""
    folder = Path(folder)
    concept = json.loads((folder / "concept.json").read_text(encoding="utf-8"))
    return concept, read_manifest(folder / "manifest.jsonl")
