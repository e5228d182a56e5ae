"""MC-LLaVA's multi-concept data -> one prepared folder per concept (``unipers prepare --from-mcllava ROOT``).

    unipers prepare --from-mcllava mcdataset --out data/mcllava                  # every concept
    unipers prepare --from-mcllava mcdataset --name Alex --out data/mcllava      # one concept

Expected layout, as MC-LLaVA's README ("File Structure") and its loaders (``llava/dataset.py``) describe the
released data::

    ROOT/
    ├── random-images/*.png               CC12M images: training negatives of every concept
    ├── scenarios.json, concept_type.json, 4o_generate_training_data/    not read (found from the folders)
    └── <group>/                          two_concept/, three_concept/: any folder holding concept/train/
        ├── concept/
        │   ├── train/<concept>/<i>.png   train photos; the folder name is the concept's name
        │   │                             (<i>_mask.png and caption_llava.json are not read)
        │   └── test/<concept>/
        │       ├── <i>.png               test photos: the held-out ``test`` split
        │       ├── choice.json           {"<image>": {"Human": question, "AI": letter}} -> vqa (choice)
        │       ├── vqa.json              {"<image>": {"Human": question, "AI": answer}}  -> vqa
        │       └── qa.json               [{"question": ..., "answer": letter}, ...]      -> qa (text only)
        └── multi/<A>_<B>[_<C>...]/       one scenario's multi-concept test set, named by its concepts
            ├── <i>.png                   test photos of every concept of the scenario (recognition positives,
            │                             the named set ``with_others``)
            ├── choice.json, vqa.json     {"<image>": [{"Human", "AI"}, ...]}
            ├── qa.json                   [{"question", "answer"}, ...]
            └── position.json, vqa_position.json    not read

What is taken from where: photos and negatives as above (``--negatives`` with ``--clip`` retrieves negatives
instead). Questions and answers are kept exactly as written (MC-LLaVA writes concepts as ``<name>``),
except that options written as the question's last lines (``A. text`` / ``(B) text``) become the sample's
``options`` when the answer is one of their letters (`inline_options`). A scenario's questions are kept in
the folder of every concept they name (``<A>`` in the question, answer or options; all of the scenario's
concepts when none is named), each copy recording them all in ``concepts``. A question's image (its key) is
looked up under ROOT by its path or the path's tail (the published keys may be paths from the authors'
machine), then in the file's folder.

Assumed, not confirmed: the exact key format of the image paths, and how choice.json writes its options
(kept in the question when not as lines like the above; eval then has no options to score). Every problem
(a missing or unreadable JSON file, an image that is not there, a record without a question and answer, a
scenario folder naming an unknown concept) refuses the import before any output folder is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unipers.data.importers_common import (ImportRefused, Plan, Problems, lexical, pick_concepts, read_qa, subfolders,
                                           write_plans)

FILES = {"choice.json": "vqa", "vqa.json": "vqa", "qa.json": "qa"}


def _photos(folder: Path) -> list[Path]:
    from unipers.data.images import list_image_files

    files = list_image_files(folder)[0] if folder.is_dir() else []
    return [lexical(p) for p in files if not p.stem.endswith("_mask")]


def read_questions(folder: Path, root: Path, label: str, problems: Problems) -> list[tuple[str, object]]:
    """(task, QA) of the three question files of a test folder."""
    out = []
    for file, task in FILES.items():
        roots = [root, folder] if task == "vqa" else []
        out += [(task, qa) for qa in read_qa(folder / file, f"{label}/{file}", problems, image_roots=roots)]
    return out


def named_in(qa, scenario: Sequence[str]) -> list[str]:
    """The scenario's concepts a question names as ``<c>``; all of them when it names none."""
    text = " ".join([qa.question, qa.answer, *(qa.options or {}).values()])
    return [c for c in scenario if f"<{c}>" in text] or list(scenario)


def import_mcllava(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                   class_word: str | None = None, facts: Path | str | None = None, seed: int = 0,
                   val_fraction: float = 0.0, negatives: Path | None = None, clip_path: Path | None = None,
                   skip_bad: bool = False, overwrite: bool = False, options=None) -> list[Path]:
    """One prepared folder per MC-LLaVA concept, ``out_root/<concept>``; returns their paths."""
    from unipers.data.manifest import Sample

    root = Path(root)
    if not root.is_dir():
        raise ImportRefused(f"--from-mcllava {root}: not a folder")
    problems = Problems()
    group_of: dict[str, str] = {}
    for g in subfolders(root):
        for c in subfolders(root / g / "concept" / "train"):
            if c in group_of:
                problems.add(root / g / "concept" / "train" / c, f"concept {c!r} is in {group_of[c]}/ too")
            group_of.setdefault(c, g)
    problems.refuse()
    wanted = pick_concepts(sorted(group_of), concepts, root)
    plans = {}
    for c in wanted:
        g = root / group_of[c] / "concept"
        test_dir = g / "test" / c
        plans[c] = Plan(c, g / "train" / c, _photos(g / "train" / c), test=_photos(test_dir),
                        negatives=_photos(root / "random-images"))
        if not test_dir.is_dir():
            problems.add(test_dir, "folder not found (the concept's test photos and question files)")
            continue
        label = f"mcllava:{group_of[c]}/concept/test/{c}"
        for task, qa in read_questions(test_dir, root, label, problems):
            plans[c].samples.append(Sample(task, c, "test", image=qa.image, question=qa.question, answer=qa.answer,
                                           options=qa.options, source=qa.where))
    for g in sorted({group_of[c] for c in wanted}):
        for case in subfolders(root / g / "multi"):
            scenario = case.split("_")
            unknown = [c for c in scenario if group_of.get(c) != g]
            if unknown:
                problems.add(root / g / "multi" / case, f"names no concept of {g}/concept/train/: {', '.join(unknown)}")
                continue
            mine = [c for c in scenario if c in plans]
            if not mine:
                continue
            folder = root / g / "multi" / case
            for c in mine:
                photos = _photos(folder)
                plans[c].test += photos
                # "Is <Anya> in this photo?" with <Loid> in it too: eval scores these photos apart
                plans[c].subsets.update({str(ph): "with_others" for ph in photos})
            for task, qa in read_questions(folder, root, f"mcllava:{g}/multi/{case}", problems):
                named = named_in(qa, scenario)
                for c in (c for c in named if c in plans):
                    plans[c].samples.append(Sample(task, c, "test", image=qa.image, question=qa.question,
                                                   answer=qa.answer, options=qa.options, source=qa.where,
                                                   concepts=list(named)))
    problems.refuse()
    return write_plans(list(plans.values()), Path(out_root), read_from=[root], seed=seed, val_fraction=val_fraction,
                       class_word=class_word, facts=facts, negatives=negatives, clip_path=clip_path,
                       skip_bad=skip_bad, overwrite=overwrite, options=options)
