"""What the importers share: issue records, image paths looked up only inside a root, the error that lists
every record an import could not use, and the held-out split; for the benchmark readers (MyVLM, UnifyBench,
DreamBench, MC-LLaVA, PODS) also strict JSON reading, one refusal listing every problem, the question /
answer / options of a QA record, and `write_plans`, which writes one prepared folder per concept."""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

from unipers.errors import UnipersError


class ImportRefused(UnipersError, ValueError):
    """An import that cannot go ahead; the message is one line naming the file or option. ``details`` are
    the lines the command prints before it (every record that could not be used: file, index, reason)."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        super().__init__(message)
        self.details = list(details)


def issue(where: str, problem: str) -> dict:
    return {"where": where, "problem": problem}


def issue_lines(issues: Iterable[dict]) -> list[str]:
    return [f"  {d['where']}: {d['problem']}" for d in issues]


def lexical(path: Path | str) -> Path:
    """Absolute, with ``..`` folded but symlinks kept: a dataset may link its images in from elsewhere,
    but a path may not climb out of its root by name."""
    return Path(os.path.normpath(Path(path).absolute()))


def inside(path: Path | str, root: Path | str) -> bool:
    return lexical(path).is_relative_to(lexical(root))


def resolve_under(ref: str, root: Path | str) -> Path | None:
    """The file an image reference names, looked up under ``root`` only.

    An existing path inside ``root`` is taken as it is. Otherwise the reference's tails are tried under
    ``root``, longest first, so the authors' ``/mnt/x/yochameleon-data/train/bo/0.png`` or the published
    ``./yollava-data/test/bo/0.png`` find ``ROOT/train/bo/0.png`` / ``ROOT/test/bo/0.png``. None when nothing
    under ``root`` matches: a copy elsewhere (the current folder, a sibling copy of the dataset, the
    original absolute path outside ``root``) is never used, so a missing image is reported instead of
    being taken from another dataset."""
    root = lexical(root)
    path = Path(ref)
    if path.is_absolute() and inside(path, root) and path.is_file():
        return lexical(path)
    parts = [p for p in PurePosixPath(ref.replace("\\", "/")).parts if p not in ("/", ".", "")]
    for i in range(len(parts)):
        tail = parts[i:]
        if ".." in tail:
            continue  # a '..' could climb out of the root
        cand = root.joinpath(*tail)
        if cand.is_file():
            return cand
    return None


def held_out_split(n: int, val_fraction: float, seed: int, min_val: int = 1) -> tuple[list[int], list[int]]:
    """``split_indices``, except that two photos already give one held-out photo when ``val_fraction`` > 0:
    an imported concept without held-out photos could never have its recognition scored."""
    import random

    from unipers.data.prepare import split_indices

    tr, va = split_indices(n, val_fraction, seed, min_val)
    if not va and n >= 2 and val_fraction > 0:
        va = [random.Random(f"{seed}/split").randrange(n)]
        tr = [i for i in range(n) if i not in va]
    return tr, va


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ImportRefused(f"--val-fraction must be in [0, 1), got {val_fraction}")


def read_facts_option(facts: Path | str | None, name: str) -> tuple[list, list, str | None]:
    """(facts, question/answer pairs, source name) of ``--facts``; a missing file names the option."""
    from unipers.data.samples import read_facts

    if facts is None:
        return [], [], None
    if not Path(facts).is_file():
        raise ImportRefused(f"--facts {facts}: file not found")
    fact_list, pairs = read_facts(facts, name)
    return fact_list, pairs, Path(facts).name


# ---- the benchmark readers: every problem refuses the import, before any output folder is written ----

class Problems:
    """Every problem a benchmark reader finds (a missing file, bad JSON, a record it cannot read, an image
    that is not there), so that one `ImportRefused` lists them all: its message names the first file and
    problem, ``details`` every one."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, where: Path | str, problem: str) -> None:
        self.items.append(issue(str(where), problem))

    def refuse(self) -> None:
        if self.items:
            first, more = self.items[0], len(self.items) - 1
            tail = f" (and {more} more problem(s), listed before this line)" if more else ""
            raise ImportRefused(f"{first['where']}: {first['problem']}{tail}", details=issue_lines(self.items))


UNREAD = object()
"""What `read_json` returns for a file it added to ``problems``."""


def read_json(path: Path, problems: Problems | None = None):
    """The parsed JSON file. A missing or unreadable file refuses the import naming it, or, given
    ``problems``, is added there and `UNREAD` returned (so that one refusal lists every bad file)."""
    path = Path(path)
    if not path.is_file():
        problem = "file not found"
    else:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problem = f"cannot read JSON: {e}"
    if problems is None:
        raise ImportRefused(f"{path}: {problem}")
    problems.add(path, problem)
    return UNREAD


def pick_concepts(available: Sequence[str], wanted: Sequence[str] | None, where: Path) -> list[str]:
    """The concepts to import (all when ``wanted`` is None), each name checked by the rule training applies."""
    from unipers.concepts.names import validate_name

    if not available:
        raise ImportRefused(f"{where}: no concept folders found (see the layout in the importer's docstring)")
    chosen = list(wanted) if wanted else list(available)
    missing = [c for c in chosen if c not in available]
    if missing:
        raise ImportRefused(f"concept(s) not in {where}: {', '.join(missing)} (available: {', '.join(available)})")
    for c in chosen:
        validate_name(c)
    return chosen


def subfolders(folder: Path) -> list[str]:
    """Names of the visible sub-folders, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


QUESTION_KEYS = ("question", "Human", "query")
ANSWER_KEYS = ("answer", "AI", "correct_answer")
OPTION_KEYS = ("options", "option", "choices")
INLINE_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s+(\S.*?)\s*$")


def inline_options(question: str, answer: str) -> tuple[str, str, dict | None]:
    """(stem, answer, options) when the question ends with option lines ``A. text`` / ``(B) text`` ... (letters
    from A, one per line) and the answer is one of their letters; else the question unchanged and no options."""
    lines = question.rstrip().split("\n")
    k = len(lines)
    while k > 0 and INLINE_OPTION.match(lines[k - 1]):
        k -= 1
    found = [INLINE_OPTION.match(line) for line in lines[k:]]
    letters = [m.group(1) for m in found]
    if k == 0 or len(found) < 2 or letters != list(string.ascii_uppercase[:len(found)]) \
            or answer.strip() not in letters:
        return question, answer, None
    return "\n".join(lines[:k]).rstrip(), answer.strip(), {m.group(1): m.group(2) for m in found}


def qa_fields(record) -> tuple[str, str, dict | None] | str:
    """(question, answer, options or None) of one QA record, or why it is not one. A record is a
    ``[question, answer]`` pair or an object with a question (``question`` / ``Human`` / ``query``), an answer
    (``answer`` / ``AI`` / ``correct_answer``) and optionally options (``options`` / ``option`` / ``choices``:
    letter -> text, or a list of texts lettered A, B, ...). With options, an answer that is an option's exact
    text becomes its letter; without, options written as the question's last lines are taken out of it."""
    if isinstance(record, list) and len(record) == 2 and all(isinstance(x, str) for x in record):
        return record[0], record[1], None
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, expected an object with a question and an answer"
    q = next((record[k] for k in QUESTION_KEYS if k in record), None)
    a = next((record[k] for k in ANSWER_KEYS if k in record), None)
    if not isinstance(q, str) or not isinstance(a, str):
        return f"needs a string question ({' / '.join(QUESTION_KEYS)}) and answer ({' / '.join(ANSWER_KEYS)})"
    raw = next((record[k] for k in OPTION_KEYS if k in record), None)
    if raw is None:
        return inline_options(q, a)
    if isinstance(raw, list) and 2 <= len(raw) <= 26 and all(isinstance(x, str) for x in raw):
        opts = dict(zip(string.ascii_uppercase, raw))
    elif isinstance(raw, dict) and raw and all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        opts = dict(raw)
    else:
        return "options must be an object of letter -> text or a list of texts"
    if a not in opts:
        letter = next((k for k, v in opts.items() if v == a), None)
        if letter is None:
            return f"answer {a!r} is neither an option letter ({', '.join(opts)}) nor an option's text"
        a = letter
    return q, a, opts


def _image_name(text) -> bool:
    from unipers.data.images import IMAGE_EXTENSIONS

    return isinstance(text, str) and PurePosixPath(text.replace("\\", "/")).suffix.lower() in IMAGE_EXTENSIONS


def records_of(data) -> Iterator[tuple[str, object, str | None]] | None:
    """(key, record, image reference) of every record of a QA file: a list of records, or an object whose
    values are a record or a list of records; an object key that names an image file is their image, unless a
    record has its own ``image`` / ``image_path``. None when ``data`` is neither a list nor an object."""
    def image_of(rec, default):
        own = rec.get("image", rec.get("image_path")) if isinstance(rec, dict) else None
        return own if isinstance(own, str) else default

    if isinstance(data, list):
        return ((str(i), rec, image_of(rec, None)) for i, rec in enumerate(data))
    if isinstance(data, dict):
        def items():
            for key, value in data.items():
                ref = key if _image_name(key) else None
                many = isinstance(value, list) and not (len(value) == 2 and all(isinstance(x, str) for x in value))
                for j, rec in enumerate(value if many else [value]):
                    yield (f"{key}[{j}]" if many else str(key)), rec, image_of(rec, ref)
        return items()
    return None


def load_files(paths: Sequence[Path], opts, skip_bad: bool) -> tuple[list, list[dict], list[dict]]:
    """(photos, skipped, duplicates) of a list of image files, as `load_photos` treats a folder's."""
    from unipers.data.images import PhotoError, load_photo

    photos, skipped, duplicates, seen = [], [], [], {}
    for path in paths:
        try:
            photo = load_photo(path, max_side=opts.max_side, min_side=opts.min_side)
        except PhotoError as e:
            if not skip_bad:
                raise PhotoError(e.file, e.reason + " (use --skip-bad to skip such files)") from None
            skipped.append({"file": str(path), "reason": e.reason})
            continue
        if photo.digest in seen:
            duplicates.append({"file": str(path), "same_as": str(seen[photo.digest])})
            continue
        seen[photo.digest] = path
        photos.append(photo)
    return photos, skipped, duplicates


@dataclass
class Plan:
    """One concept of a benchmark, read and checked, before anything is written. Paths are source files;
    samples refer to their images by source path (``str(path)``), as the photo lists do."""

    name: str
    folder: Path  # named in errors about the concept's photos
    train: list[Path]
    test: list[Path] = field(default_factory=list)
    negatives: list[Path] = field(default_factory=list)  # the benchmark's own (used unless --negatives)
    class_word: str | None = None
    samples: list = field(default_factory=list)
    subsets: dict = field(default_factory=dict)  # {str(test photo): named test set}
    issues: list = field(default_factory=list)
    template_captions: bool = True


def write_plans(plans: Sequence[Plan], out_root: Path, *, read_from: Sequence[Path], seed: int, val_fraction: float,
                class_word: str | None = None, facts: Path | str | None = None, negatives: Path | None = None,
                clip_path: Path | None = None, skip_bad: bool = False, overwrite: bool = False,
                options=None) -> list[Path]:
    """One prepared folder per plan, ``out_root/<name>``. Everything that can refuse the import is checked
    before the first folder is written. ``val_fraction`` of each concept's train photos is held out as
    ``val`` (and a train sample about such a photo goes with it); ``class_word`` / ``facts`` need one plan."""
    import dataclasses

    from unipers.data.prepare import ConceptInputs, PrepareOptions, build_prepared
    from unipers.io import check_output

    opts = options or PrepareOptions()
    check_val_fraction(val_fraction)
    for flag, value in (("--class-word", class_word), ("--facts", facts)):
        if value is not None and len(plans) != 1:
            raise ImportRefused(f"{flag} describes one concept: give --name to import one concept with it")
    for p in plans:
        if not p.train:
            raise ImportRefused(f"{p.folder}: no train photos of <{p.name}>")
        if not p.test and not (val_fraction > 0 and len(p.train) >= 2):
            raise ImportRefused(f"{p.folder}: no test photos, so no photo of <{p.name}> would be held out for eval; "
                                "give --val-fraction to hold out train photos")
    fact_list, pairs, facts_source = read_facts_option(facts, plans[0].name if plans else "")
    for p in plans:  # before the slow part: a refused folder must not stop the import half way
        check_output(Path(out_root) / p.name, overwrite=overwrite, inputs=[*read_from, *([facts] if facts else [])])
    outs = []
    for p in plans:
        train, skipped, dups = load_files(p.train, opts, skip_bad)
        test, skipped_test, dups_test = load_files(p.test, opts, skip_bad)
        if not train:
            raise ImportRefused(f"{p.folder}: no usable train photos of <{p.name}>")
        tr, va = held_out_split(len(train), val_fraction, seed, opts.min_val)
        held = {str(train[i].path) for i in va}
        gone = {d["file"]: d["reason"] for d in skipped + skipped_test}
        issues = list(p.issues) + [issue(s.source or p.name, f"image skipped: {gone[s.image]}")
                                   for s in p.samples if s.image in gone]
        samples = [dataclasses.replace(s, split="val") if s.split == "train" and s.image in held else s
                   for s in p.samples if s.image not in gone]
        inputs = ConceptInputs(
            name=p.name, train=[train[i] for i in tr], val=[train[i] for i in va], test=test,
            given_negatives=[] if negatives else list(p.negatives), class_word=class_word or p.class_word,
            facts=fact_list, fact_pairs=pairs, facts_source=facts_source, extra_samples=samples, issues=issues,
            photo_report={"skipped": skipped + skipped_test, "duplicates": dups + dups_test},
            subsets=dict(p.subsets), template_captions=p.template_captions)
        outs.append(build_prepared(inputs, Path(out_root) / p.name, seed=seed, val_fraction=val_fraction,
                                   negatives=negatives, clip_path=clip_path, overwrite=overwrite, options=opts))
    return outs


@dataclass
class QA:
    """One question of a QA file: where it came from (``label#key``), its texts and its image (a source path)."""

    where: str
    question: str
    answer: str
    options: dict | None
    image: str | None


def read_qa(path: Path, label: str, problems: Problems, *, image_roots: Sequence[Path] = ()) -> list[QA]:
    """Every record of a QA file (`records_of`, `qa_fields`). With ``image_roots`` each record needs an image,
    found by its path or its tail under the first root that has it (`resolve_under`: never outside them);
    without, images are not read. A problem with the file or a record is added to ``problems``."""
    data = read_json(path, problems)
    if data is UNREAD:
        return []
    records = records_of(data)
    if records is None:
        problems.add(path, f"expected a list or an object of question records, got {type(data).__name__}")
        return []
    out = []
    for key, record, ref in records:
        got = qa_fields(record)
        if isinstance(got, str):
            problems.add(f"{path}#{key}", got)
            continue
        image = None
        if image_roots:
            found = next((f for f in (resolve_under(ref, r) for r in image_roots) if f), None) if ref else None
            if found is None:
                under = " or ".join(map(str, image_roots))
                problems.add(f"{path}#{key}", f"image not found under {under}: {ref}" if ref else
                             "no image: give the record an 'image' or key it by its image path")
                continue
            image = str(found)
        out.append(QA(f"{label}#{key}", *got, image))
    return out
