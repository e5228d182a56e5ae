"""MyVLM's personalized-captioning data -> prepared concept folders (``unipers prepare --from-myvlm ROOT``).

    unipers prepare --from-myvlm myvlm_data --out data/myvlm               # every concept -> data/myvlm/<c>/
    unipers prepare --from-myvlm myvlm_data --name cat_statue --n-train 4 --out data/myvlm

Expected layout, as MyVLM's README ("Data Setup") and its loader (``concept_embedding_training/data_utils.py``)
describe it and as its object dataset is released (Google Drive / HuggingFace ``yuvalalaluf/MyVLM``)::

    ROOT/
    ├── <concept>/                          one folder per concept; the folder name is the concept's name
    │   ├── <image>.jpg ...                 its photos (~10)
    │   ├── captions.json                   {"<image>.jpg": ["caption", ...], ...}  (5 captions per image)
    │   ├── captions_augmented.json         optional; read instead of captions.json when present, as MyVLM does
    │   └── additional_llava_vqa_data.json  optional; {"<image>.jpg": [["question", "answer"], ...], ...}
    └── <concept_2>/ ...

What is taken from where:

- *Photos*: the keys of the captions file, each a file in the concept's folder (MyVLM joins them to it). An
  image file of the folder that the captions file does not name is not imported (reported in
  ``import_issues``). ``n_train`` photos (default 4, MyVLM's training batch), drawn with the seed, are the
  train split; the others are the held-out ``test`` split, as MyVLM validates on the images it did not
  train on. ``val_fraction`` > 0 also holds that share of the train photos out as ``val``.
- *Captions*: every caption of a photo becomes a ``caption`` sample of that photo's split, asked with MyVLM's
  captioning instruction ("Please caption this image."). MyVLM writes the concept into its captions by its
  name (the folder name; ``.title()`` of it for people) and swaps in an identifier at training time; here
  the whole-word folder name, its title-case form and ``<name>`` become ``<name>``. No templated captions
  are added (the real ones are the targets); recognition and generation samples are made as for a photo
  folder.
- *VQA*: each ``[question, answer]`` pair of ``additional_llava_vqa_data.json`` is a ``vqa`` sample of its
  photo (no options), with the same mention rewrite.

Assumed, not confirmed against the released files: the captions name the concept by its folder name (MyVLM's
loader assumes so); images are keyed by file name relative to the concept folder (a longer path is found by
its tail inside the folder, never outside). Every problem (a missing or unreadable JSON file, a photo it
names that is not there, a record that is not a list of captions / a question-answer pair, too few photos
for a test split) refuses the import before any output folder is written, as ``ImportRefused`` listing them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from unipers.data.importers_common import (UNREAD, ImportRefused, Plan, Problems, issue, lexical, pick_concepts,
                                           read_json, read_qa, resolve_under, subfolders, write_plans)

CAPTIONS, AUGMENTED, VQA = "captions.json", "captions_augmented.json", "additional_llava_vqa_data.json"
CAPTION_PROMPT = "Please caption this image."
"""MyVLM's captioning instruction for LLaVA and MiniGPT-v2 (``myvlm/common.py``)."""
N_TRAIN = 4


def _mentions(text: str, name: str) -> str:
    from unipers.data.samples import normalize_mentions

    return normalize_mentions(text, name, [name.title()] if name.title() != name else [], bare_name=True)


def read_myvlm_concept(folder: Path, name: str, problems: Problems, *, n_train: int = N_TRAIN,
                       seed: int = 0) -> Plan | None:
    """One concept folder as a `Plan` (photos, caption and vqa samples), or None when ``problems`` got its
    reasons."""
    from unipers.data.images import list_image_files
    from unipers.data.manifest import Sample

    n_before = len(problems.items)
    cap_file = folder / AUGMENTED if (folder / AUGMENTED).is_file() else folder / CAPTIONS
    data = read_json(cap_file, problems)
    if data is UNREAD:
        return None
    if not isinstance(data, dict) or not data:
        problems.add(cap_file, "expected an object of image file -> list of captions")
        return None
    photos: dict[str, Path] = {}
    for key, caps in data.items():
        found = resolve_under(key, folder)
        if found is None:
            problems.add(f"{cap_file}#{key}", f"image not found in {folder}")
        elif not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            problems.add(f"{cap_file}#{key}", "expected a non-empty list of caption texts")
        else:
            photos[key] = lexical(found)
    if len(problems.items) > n_before:
        return None
    if len(photos) <= n_train:
        problems.add(cap_file, f"{len(photos)} photo(s); --n-train {n_train} leaves none for the test split")
        return None
    keys = list(photos)
    train_keys = {keys[i] for i in random.Random(f"{seed}/myvlm/{name}").sample(range(len(keys)), n_train)}
    split = {str(photos[k]): ("train" if k in train_keys else "test") for k in keys}
    label = f"myvlm:{name}/{cap_file.name}"
    samples = [Sample("caption", name, split[str(photos[k])], image=str(photos[k]), question=CAPTION_PROMPT,
                      answer=_mentions(c, name), source=f"{label}#{k}[{i}]")
               for k in keys for i, c in enumerate(data[k])]
    if (folder / VQA).is_file():
        for qa in read_qa(folder / VQA, f"myvlm:{name}/{VQA}", problems, image_roots=[folder]):
            if qa.image not in split:
                problems.add(qa.where, f"image {qa.image} is not one of the photos of {cap_file.name}")
                continue
            samples.append(Sample("vqa", name, split[qa.image], image=qa.image, question=_mentions(qa.question, name),
                                  answer=_mentions(qa.answer, name), source=qa.where))
    named = set(split)
    unread = [issue(f"myvlm:{name}/{p.name}", f"not in {cap_file.name}: not imported")
              for p in list_image_files(folder)[0] if str(lexical(p)) not in named]
    return Plan(name, folder, [photos[k] for k in keys if k in train_keys],
                test=[photos[k] for k in keys if k not in train_keys], samples=samples, issues=unread,
                template_captions=False)


def import_myvlm(root: Path | str, out_root: Path | str, *, concepts: Sequence[str] | None = None,
                 n_train: int | None = None, class_word: str | None = None, facts: Path | str | None = None,
                 seed: int = 0, val_fraction: float = 0.0, negatives: Path | None = None,
                 clip_path: Path | None = None, skip_bad: bool = False, overwrite: bool = False,
                 options=None) -> list[Path]:
    """One prepared folder per concept of a MyVLM data folder, ``out_root/<concept>``; returns their paths."""
    root = Path(root)
    n_train = N_TRAIN if n_train is None else n_train
    if n_train < 1:
        raise ImportRefused(f"--n-train must be at least 1, got {n_train}")
    if not root.is_dir():
        raise ImportRefused(f"--from-myvlm {root}: not a folder")
    wanted = pick_concepts(subfolders(root), concepts, root)
    problems = Problems()
    plans = [read_myvlm_concept(root / c, c, problems, n_train=n_train, seed=seed) for c in wanted]
    problems.refuse()
    return write_plans(plans, Path(out_root), read_from=[root], seed=seed, val_fraction=val_fraction,
                       class_word=class_word, facts=facts, negatives=negatives, clip_path=clip_path,
                       skip_bad=skip_bad, overwrite=overwrite, options=options)
