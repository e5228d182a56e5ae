"""DreamBench (the DreamBooth dataset) -> prepared concept folders (``unipers prepare --from-dreambench ROOT``).

    unipers prepare --from-dreambench dreambooth --out data/dreambench              # all 30 subjects
    unipers prepare --from-dreambench dreambooth --name dog6 --out data/dreambench  # one subject

Layout of google/dreambooth (confirmed against the repository; ROOT may be the repository or its ``dataset/``)::

    ROOT/
    └── dataset/
        ├── prompts_and_classes.txt       the class of each subject and the two prompt lists (below)
        ├── references_and_licenses.txt   not read
        └── <subject>/00.jpg ...          4-6 photos of each subject; the folder name is the concept's name

``prompts_and_classes.txt`` as published::

    Classes

    subject_name,class
    backpack,backpack
    dog6,dog
    ...

    Prompts

    Object Prompts

    prompt_list = [
    'a {0} {1} in the jungle'.format(unique_token, class_token),
    ...
    ]

    Live Subject Prompts

    prompt_list = [
    ...
    ]

What is taken from where: the subjects are the rows of the classes table (a subject folder without a row is
reported, not imported); a subject's class is its class word; its photos are the train photos, of which
``val_fraction`` (default 0.2) are held out as ``val`` (DreamBench has no test photos: eval scores
recognition on those). The subjects whose class is ``dog`` or ``cat`` are the live subjects (the dataset's
README: "9 out of these subjects are live subjects (dogs and cats)"), the others objects; each subject gets
its list's 25 prompts as ``generation`` samples of the ``test`` split (no target image), ``{0}`` written as
``<subject>`` and ``{1}`` as the class word: ``a <dog6> dog in the jungle``. Every problem (a missing file, a
table row without a folder, a folder without photos, a list that cannot be read) refuses the import before
any output folder is written (``ImportRefused`` lists them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from unipers.data.importers_common import ImportRefused, Plan, Problems, issue, lexical, pick_concepts, write_plans

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("dog", "cat")
"""Classes of DreamBench's live subjects (its README: the live subjects are the dogs and cats)."""
LISTS = {"Object Prompts": "object", "Live Subject Prompts": "live"}
PROMPT = re.compile(r"""^\s*(['"])(.*)\1\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


def parse_prompts_and_classes(path: Path, problems: Problems) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({subject: class}, {"object" | "live": prompt templates with ``{0}`` / ``{1}``}) of the published file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.add(path, f"cannot read: {e}")
        return {}, {}
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {}
    section = None
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if line == "subject_name,class":
            section = "classes"
        elif line in LISTS:
            section = LISTS[line]
            prompts[section] = []
        elif line in ("Prompts", "Classes") or not line:
            section = None if section == "classes" else section
        elif section == "classes":
            subject, _, cls = line.partition(",")
            if not subject.strip() or not cls.strip():
                problems.add(f"{path}:{n}", f"expected 'subject_name,class', got {line!r}")
            else:
                classes[subject.strip()] = cls.strip()
        elif section in prompts and line not in ("prompt_list = [", "]"):
            m = PROMPT.match(line)
            if m is None:
                problems.add(f"{path}:{n}", f"expected 'a {{0}} {{1}} ...'.format(unique_token, class_token), "
                                            f"got {line!r}")
            else:
                prompts[section].append(m.group(2))
    if not classes:
        problems.add(path, "no 'subject_name,class' table")
    for kind in LISTS.values():
        if not prompts.get(kind):
            problems.add(path, f"no {kind} prompt list")
    return classes, prompts


def dreambench_prompts(name: str, class_word: str, templates: list[str], kind: str) -> list:
    """The prompts of one subject as ``generation`` samples (test split, no target image)."""
    from unipers.data.manifest import Sample

    return [Sample("generation", name, "test", prompt=t.replace("{0}", f"<{name}>").replace("{1}", class_word),
                   source=f"dreambench:{PROMPTS_FILE}#{kind}/{i}") for i, t in enumerate(templates)]


def import_dreambench(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                      class_word: str | None = None, facts: Path | str | None = None, seed: int = 0,
                      val_fraction: float = 0.2, negatives: Path | None = None, clip_path: Path | None = None,
                      skip_bad: bool = False, overwrite: bool = False, options=None) -> list[Path]:
    """One prepared folder per DreamBench subject, ``out_root/<subject>``; returns their paths."""
    from unipers.data.images import list_image_files

    root = Path(root)
    data = root / "dataset" if (root / "dataset" / PROMPTS_FILE).is_file() else root
    if not (data / PROMPTS_FILE).is_file():
        raise ImportRefused(f"--from-dreambench {root}: {PROMPTS_FILE} not found in it nor in its dataset/ folder")
    problems = Problems()
    classes, prompts = parse_prompts_and_classes(data / PROMPTS_FILE, problems)
    problems.refuse()
    wanted = pick_concepts(list(classes), concepts, data / PROMPTS_FILE)
    unlisted = [issue(f"dreambench:{d}", f"no row in {PROMPTS_FILE}: not imported")
                for d in sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
                if d not in classes]
    plans = []
    for c in wanted:
        photos = [lexical(p) for p in list_image_files(data / c)[0]] if (data / c).is_dir() else []
        if not photos:
            problems.add(data / c, "no photos in this folder" if (data / c).is_dir() else
                         f"folder not found (the subject has a row in {PROMPTS_FILE})")
            continue
        kind = "live" if classes[c].lower() in LIVE_CLASSES else "object"
        plans.append(Plan(c, data / c, photos, class_word=classes[c], issues=list(unlisted),
                          samples=dreambench_prompts(c, class_word or classes[c], prompts[kind], kind)))
    problems.refuse()
    return write_plans(plans, Path(out_root), read_from=[data], seed=seed, val_fraction=val_fraction,
                       class_word=class_word, facts=facts, negatives=negatives, clip_path=clip_path,
                       skip_bad=skip_bad, overwrite=overwrite, options=options)
