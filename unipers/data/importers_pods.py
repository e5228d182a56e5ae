"""PODS (Personal Object Discrimination Suite) -> prepared concept folders (``unipers prepare --from-pods ROOT``).

    unipers prepare --from-pods pods --out data/pods                    # all 100 objects
    unipers prepare --from-pods pods --name mug_03 --out data/pods      # one object

Expected layout, as the dataset README of ssundaram21/personalized-rep describes the release
(``data.csail.mit.edu/personal_rep/pods.zip``, HuggingFace ``chaenayo/PODS``)::

    ROOT/
    ├── pods_info.json          {"classes": [...], "class_to_idx": {...}, "class_to_sc": {class: semantic
    │                           category}, "class_to_split": {class: "val" | "test"}}
    ├── pods_image_annos.json   {"<image id>": {"class": ..., "split": "train" | "test",
    │                           "test_split": "in_distribution" | "pose" | "distractors" | "pose_and_distractors"}}
    ├── train/<class>/*.jpg     the 3 train photos of each object; the class name is the concept's name
    ├── test/<class>/*.jpg      its test photos, each in one of the shifted test splits
    └── train_masks/, test_masks/, test_dense/    not read

What is taken from where: the concepts are ``pods_info.json``'s ``classes``; a class's semantic category
(``class_to_sc``) is its class word. ``pods_image_annos.json`` says which photos are train photos and which
are test photos, and in which test split: the test photos form the held-out ``test`` split, and every
sample about one of them (its recognition question, caption, generation prompt) records the test split's
name in ``subset``, so eval can score the splits apart. ``class_to_split`` (PODS' val / test classes) is
not used: pick classes with ``--name`` (one) or import all.

Assumed, not confirmed (the README does not spell out the image id): an image id names its file as a path
under ROOT (``test/mug_03/12.jpg``, found by its tail), or as a file name in ``ROOT/<split>/<class>/``, with
or without its extension. An image file under ``train/<class>/`` or ``test/<class>/`` that the annotations
do not list is not imported (reported in ``import_issues``). Every problem (a missing or unreadable JSON
file, an annotation naming an unknown class or split, an image that is not there) refuses the import before
any output folder is written (``ImportRefused`` lists them).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Sequence

from unipers.data.importers_common import (UNREAD, ImportRefused, Plan, Problems, issue, lexical, pick_concepts,
                                           read_json, resolve_under, write_plans)

INFO, ANNOS = "pods_info.json", "pods_image_annos.json"


def find_image(root: Path, image_id: str, split: str, cls: str) -> Path | None:
    """The file an image id names (see the module docstring), inside ``ROOT/<split>/<class>/`` or ROOT."""
    from unipers.data.images import IMAGE_EXTENSIONS

    folder = root / split / cls
    found = resolve_under(image_id, root) or resolve_under(image_id, folder)
    if found is None and not PurePosixPath(image_id).suffix and folder.is_dir():
        stem = PurePosixPath(image_id.replace("\\", "/")).name
        found = next((p for p in sorted(folder.iterdir()) if p.stem == stem and p.suffix.lower() in IMAGE_EXTENSIONS),
                     None)
    return lexical(found) if found else None


def read_pods(root: Path, problems: Problems) -> tuple[list[str], dict, dict]:
    """(classes, {class: class word}, {class: {"train": [paths], "test": {path: test split}}})."""
    info, annos = read_json(root / INFO, problems), read_json(root / ANNOS, problems)
    if info is UNREAD or annos is UNREAD:
        return [], {}, {}
    classes = info.get("classes") if isinstance(info, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        problems.add(root / INFO, "expected an object with \"classes\": a list of class names")
        return [], {}, {}
    sc = info.get("class_to_sc") if isinstance(info.get("class_to_sc"), dict) else {}
    words = {c: sc[c] for c in classes if isinstance(sc.get(c), str)}
    if not isinstance(annos, dict):
        problems.add(root / ANNOS, "expected an object of image id -> annotation")
        return classes, words, {}
    images = {c: {"train": [], "test": {}} for c in classes}
    for image_id, a in annos.items():
        where = f"{root / ANNOS}#{image_id}"
        cls, split = (a.get("class"), a.get("split")) if isinstance(a, dict) else (None, None)
        if cls not in images:
            problems.add(where, f"class {cls!r} is not one of {INFO}'s classes")
            continue
        if split not in ("train", "test"):
            problems.add(where, f"split {split!r}: expected 'train' or 'test'")
            continue
        test_split = a.get("test_split")
        if split == "test" and (not isinstance(test_split, str) or not test_split):
            problems.add(where, "a test image needs its 'test_split' (in_distribution, pose, ...)")
            continue
        path = find_image(root, str(image_id), split, cls)
        if path is None:
            problems.add(where, f"image not found under {root / split / cls} (nor under {root})")
        elif split == "train":
            images[cls]["train"].append(path)
        else:
            images[cls]["test"][path] = test_split
    return classes, words, images


def import_pods(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                class_word: str | None = None, facts: Path | str | None = None, seed: int = 0,
                val_fraction: float = 0.0, negatives: Path | None = None, clip_path: Path | None = None,
                skip_bad: bool = False, overwrite: bool = False, options=None) -> list[Path]:
    """One prepared folder per PODS object, ``out_root/<class>``, its test photos' samples named by their test
    split (``subset``); returns their paths."""
    from unipers.data.images import list_image_files

    root = Path(root)
    if not root.is_dir():
        raise ImportRefused(f"--from-pods {root}: not a folder")
    problems = Problems()
    classes, words, images = read_pods(root, problems)
    problems.refuse()
    wanted = pick_concepts(classes, concepts, root / INFO)
    plans = []
    for c in wanted:
        listed = {str(p) for p in images[c]["train"]} | {str(p) for p in images[c]["test"]}
        unlisted = [issue(f"pods:{split}/{c}/{p.name}", f"not in {ANNOS}: not imported")
                    for split in ("train", "test") if (root / split / c).is_dir()
                    for p in list_image_files(root / split / c)[0] if str(lexical(p)) not in listed]
        test = sorted(images[c]["test"], key=str)
        plans.append(Plan(c, root / "train" / c, sorted(images[c]["train"], key=str), test=test,
                          class_word=words.get(c), subsets={str(p): images[c]["test"][p] for p in test},
                          issues=unlisted))
    return write_plans(plans, Path(out_root), read_from=[root], seed=seed, val_fraction=val_fraction,
                       class_word=class_word, facts=facts, negatives=negatives, clip_path=clip_path,
                       skip_bad=skip_bad, overwrite=overwrite, options=options)
