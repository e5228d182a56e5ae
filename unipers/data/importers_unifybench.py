"""UnifyBench (UniCTokens' data) -> prepared concept folders (``unipers prepare --from-unifybench ROOT``).

    unipers prepare --from-unifybench unictokens_data --out data/unifybench            # every concept
    unipers prepare --from-unifybench unictokens_data --name bo --out data/unifybench  # one concept

Expected layout, as UniCTokens' README ("Directory Structure") and its evaluation scripts
(``eval/gen_p_images_for_mmu_t2i.py``, ``eval/clip_eval.py``) describe the released data::

    ROOT/
    ├── random_images/*.png              100 easy negatives, shared by every concept (training negatives)
    ├── concepts_list.json, template.json, black_512x512.png     not read
    └── concept/
        ├── train/
        │   ├── train_images.json        optional: {"<concept>": ["0.png", ...]}, the train photos (default:
        │   │                            every image directly in the concept's folder)
        │   └── <concept>/               the folder name is the concept's name
        │       ├── 0.png ... N.png      train photos
        │       ├── info.json            optional: its "class" is the class word
        │       ├── negative_example/*.png   hard negatives (training negatives)
        │       └── cropped/, conversations.json, *_recognitions.json     not read
        └── test/
            └── <concept>/
                ├── 0.png ... 4.png      test photos: the held-out ``test`` split (recognition positives)
                ├── text_only.json       text QA  -> ``qa`` samples (test)
                ├── vqa.json             VQA      -> ``vqa`` samples (test), with options when a record has them
                └── t2i_conditions.json  prompts  -> ``generation`` samples (test, no target image)

What is taken from where: photos and negatives as above (``--negatives`` with ``--clip`` retrieves negatives
instead of the benchmark's own). ``t2i_conditions.json`` is a list of prompts that name the concept as
``<concept>`` (UniCTokens replaces that marker at generation time), imported as they are; an object of
lists (``{"dense_prompt_generation": [...], ...}``, as later releases have) is read too, each prompt's key
becoming its sample's ``subset``. Texts are kept exactly as written (UniCTokens writes the concept as
``<concept>`` already).

Assumed, not confirmed (the repository does not show the two files' insides): ``text_only.json`` and
``vqa.json`` hold a list of records, or an object whose values are a record or a list of records; a record
has a question (``question`` / ``Human`` / ``query``), an answer (``answer`` / ``AI`` / ``correct_answer``)
and optionally options (``options`` / ``option`` / ``choices``: letter -> text or a list), see
`qa_fields`; a vqa record's image is its ``image`` field or its key, found under ROOT by its path or the path's
tail, else in ``test/<concept>/``. Every problem (a missing file, bad JSON, an unreadable record, an image
that is not there) refuses the import before any output folder is written (``ImportRefused`` lists them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from unipers.data.importers_common import (UNREAD, ImportRefused, Plan, Problems, lexical, pick_concepts, read_json,
                                           read_qa, subfolders, write_plans)

def _images(folder: Path) -> list[Path]:
    from unipers.data.images import list_image_files

    return [lexical(p) for p in list_image_files(folder)[0]] if folder.is_dir() else []


def read_prompts(path: Path, name: str, problems: Problems) -> list:
    """``generation`` samples (test split, no image) of a t2i_conditions.json."""
    from unipers.data.manifest import Sample

    data = read_json(path, problems)
    if data is UNREAD:
        return []
    groups = [(None, data)] if isinstance(data, list) else list(data.items()) if isinstance(data, dict) else None
    if groups is None:
        problems.add(path, f"expected a list of prompts (or an object of lists), got {type(data).__name__}")
        return []
    out = []
    for key, prompts in groups:
        where = f"unifybench:concept/test/{name}/{path.name}#" + (f"{key}/" if key is not None else "")
        if not isinstance(prompts, list):
            problems.add(f"{path}#{key}", "expected a list of prompts")
            continue
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                problems.add(f"{path}#{key + '/' if key else ''}{i}", "a prompt must be a non-empty text")
                continue
            out.append(Sample("generation", name, "test", prompt=prompt, subset=key, source=f"{where}{i}"))
    return out


def read_unifybench_concept(root: Path, name: str, problems: Problems, train_list: dict | None) -> Plan:
    """One concept's photos, negatives, class word and test samples."""
    from unipers.data.manifest import Sample

    train_dir, test_dir = root / "concept" / "train" / name, root / "concept" / "test" / name
    if train_list is not None and name in train_list:
        listed = train_list[name]
        train = [lexical(train_dir / f) for f in listed] if isinstance(listed, list) else []
        if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
            problems.add(f"{root / 'concept/train/train_images.json'}#{name}", "expected a list of file names")
        for f in train:
            if not f.is_file():
                problems.add(f"{root / 'concept/train/train_images.json'}#{name}", f"image not found: {f}")
    else:
        train = _images(train_dir)
    class_word = None
    if (train_dir / "info.json").is_file():
        info = read_json(train_dir / "info.json", problems)
        if info is not UNREAD:
            class_word = info.get("class") if isinstance(info, dict) and isinstance(info.get("class"), str) else None
            if class_word is None:
                problems.add(train_dir / "info.json", "expected an object with a text \"class\"")
    samples, label = [], f"unifybench:concept/test/{name}"
    if not test_dir.is_dir():
        problems.add(test_dir, "folder not found (the concept's test photos and question files)")
        return Plan(name, train_dir, train)
    for qa in read_qa(test_dir / "text_only.json", f"{label}/text_only.json", problems):
        samples.append(Sample("qa", name, "test", question=qa.question, answer=qa.answer, options=qa.options,
                              source=qa.where))
    for qa in read_qa(test_dir / "vqa.json", f"{label}/vqa.json", problems, image_roots=[root, test_dir]):
        samples.append(Sample("vqa", name, "test", image=qa.image, question=qa.question, answer=qa.answer,
                              options=qa.options, source=qa.where))
    samples += read_prompts(test_dir / "t2i_conditions.json", name, problems)
    return Plan(name, train_dir, train, test=_images(test_dir), class_word=class_word, samples=samples,
                negatives=_images(train_dir / "negative_example") + _images(root / "random_images"))


def import_unifybench(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                      class_word: str | None = None, facts: Path | str | None = None, seed: int = 0,
                      val_fraction: float = 0.0, negatives: Path | None = None, clip_path: Path | None = None,
                      skip_bad: bool = False, overwrite: bool = False, options=None) -> list[Path]:
    """One prepared folder per UnifyBench concept, ``out_root/<concept>``; returns their paths."""
    root = Path(root)
    if not (root / "concept" / "train").is_dir():
        raise ImportRefused(f"--from-unifybench {root}: no concept/train/ folder in it")
    wanted = pick_concepts(subfolders(root / "concept" / "train"), concepts, root / "concept" / "train")
    problems = Problems()
    listed = root / "concept" / "train" / "train_images.json"
    train_list = read_json(listed, problems) if listed.is_file() else None
    if train_list is not None and train_list is not UNREAD and not isinstance(train_list, dict):
        problems.add(listed, "expected an object of concept -> list of file names")
    train_list = train_list if isinstance(train_list, dict) else None
    plans = [read_unifybench_concept(root, c, problems, train_list) for c in wanted]
    problems.refuse()
    return write_plans(plans, Path(out_root), read_from=[root], seed=seed, val_fraction=val_fraction,
                       class_word=class_word, facts=facts, negatives=negatives, clip_path=clip_path,
                       skip_bad=skip_bad, overwrite=overwrite, options=options)
