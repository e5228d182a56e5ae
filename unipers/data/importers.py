"""Import Yo'LLaVA and Yo'Chameleon data, and the public personalization benchmarks' published layouts, into
prepared concept folders (same layout as ``prepare``).

    unipers prepare --from-yollava yollava-data --out data/yollava            # every concept -> data/yollava/<c>/
    unipers prepare --from-yollava yollava-data --name bo --out data/yollava  # one concept
    unipers prepare --from-yochameleon bo_train.json bo_gen.json --name bo --out data/bo_yc [--image-root DIR]
    unipers prepare --from-myvlm ROOT | --from-unifybench ROOT | --from-dreambench ROOT | --from-mcllava ROOT
                    | --from-pods ROOT  [--name C] --out DIR                  # every concept (or C) -> DIR/<c>/

The benchmark readers, one module each, document the tree they expect and what they take from which file:
importers_myvlm.py (``import_myvlm``), importers_unifybench.py (``import_unifybench``), importers_dreambench.py
(``import_dreambench``), importers_mcllava.py (``import_mcllava``), importers_pods.py (``import_pods``); all
return the written folders. Unlike the two below they are strict: any problem (missing file, bad JSON, an
unreadable record, an image that is not there) refuses the whole import before a folder is written, the
``ImportRefused`` listing every problem. MC-LLaVA's scenario questions record the concepts they name in a
sample's ``concepts``; PODS' shifted test sets name each test sample's ``subset``.

Python: ``import_yollava(root, out_root, concepts=None, ...) -> list[Path]`` (importers_yollava.py) and
``import_yochameleon(json_paths, name, out_dir, ...) -> Path`` (importers_yochameleon.py); the parsers
``read_yollava_qa`` and ``read_yochameleon`` return ``(samples, issues)``.

Yo'LLaVA (``ROOT/{train,test}/<concept>/*.png``): train photos are the train split (``val_fraction`` > 0
also holds some out for validation), test photos the ``test`` split, whose recognition negatives are the
other concepts' test photos (the benchmark protocol), written once into ``OUT/.shared/`` and referred to
from each manifest as ``../.shared/<digest>.png``. ``train/<c>/negative_example/`` images are the
negatives when no pool is given. Multiple-choice QA comes from the published files
``ROOT/yollava-visual-qa.json`` (Yo'LLaVA: items with ``options`` and an image) and
``ROOT/yollava-text-only-qa.json`` (RAP: items with ``option``), any JSON in ``test/<c>/`` and every file
passed with ``visual_qa`` / ``text_qa``: they all add up. A file may be keyed by concept
(``{"bo": {key: item}}``) or flat (``{key: item}``, an item's concept being the folder its image path names);
an item's image is its ``image`` field or its key, looked up under ROOT only. ``<sks>`` and whole-word
``sks`` become ``<NAME>``. Other JSON files in ROOT are reported as not read.

Yo'Chameleon (LLaVA-style ``[{"image": [...], "conversations": [{"from", "value"}]}]``): every
human->bot turn becomes one sample. ``<image>`` in the human text = an input image (recognition when the
answer starts with yes/no, caption for describe/caption requests, else free-form vqa); ``<image>`` in the
bot text = a generation target. The concept's identifier token (``<reserved16200>``, or ``<sks>``) becomes
``<NAME>``; its latent tokens are dropped, and so is the prefix ``<reserved16200> is <latents>.``, because
unipers puts the concept's own slots in front of every prompt. A generation prompt with fewer latent
tokens than the longest run in the files gets that share of ``num_gen_slots`` (Yo'Chameleon's soft
positives). Images are looked up under ``image_root`` only: an absolute path from the authors' machine is
found there by its tail. Positive photos are held out like ``prepare`` holds out photos (``val_fraction``).

Odd records (wrong types, missing keys, missing images, unknown correct answers, ...) are not dropped
silently: each becomes ``{"where": "file#key", "problem": ...}`` in ``concept.json["import_issues"]`` and
in ``report.txt``. An import with no usable record at all raises ``ImportRefused`` whose ``details`` list
every problem; ``unipers prepare`` prints them before its one-line error.
"""

from __future__ import annotations

from unipers.data.importers_common import ImportRefused, resolve_under
from unipers.data.importers_dreambench import import_dreambench
from unipers.data.importers_mcllava import import_mcllava
from unipers.data.importers_myvlm import import_myvlm
from unipers.data.importers_pods import import_pods
from unipers.data.importers_unifybench import import_unifybench
from unipers.data.importers_yochameleon import import_yochameleon, read_yochameleon
from unipers.data.importers_yollava import TEXT_QA, VISUAL_QA, import_yollava, read_yollava_qa

__all__ = ["ImportRefused", "TEXT_QA", "VISUAL_QA", "import_dreambench", "import_mcllava", "import_myvlm",
           "import_pods", "import_unifybench", "import_yochameleon", "import_yollava", "read_yochameleon",
           "read_yollava_qa", "resolve_under"]
