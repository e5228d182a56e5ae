"""ConceptDataModule: prepared concept folders -> seeded, resumable, multi-task, multi-concept batches.

    dm = ConceptDataModule(["data/bo", "data/mam"], batch_size=8, seed=0)
    dm.attach(model)          # concepts must be in the model's bank; caches image tokens and latents
    batch = next(iter(dm.train_dataloader()))

Several concepts share one dataset (each record carries its concept). The train loader is torchdata's
StatefulDataLoader with its own seeded generator and a MixtureSampler that shards over DDP ranks, so
Lightning restores the exact position on resume. Validation uses the held-out split in a fixed order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import Dataset

from unipers.concepts.recognition import recognition_layout
from unipers.config import DataConfig
from unipers.data.augment import ViewSpec
from unipers.data.collate import (UNDERSTANDING_TASKS, Collator, Record, StageFormat, description_cache,
                                  image_token_cache, latent_cache)
from unipers.data.manifest import read_prepared
from unipers.data.sampler import MixtureSampler

DEFAULT_TASK_WEIGHTS = DataConfig().task_weights  # one source: the config schema's default


class RecordDataset(Dataset):
    def __init__(self, records: Sequence[Record]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        """An index, or an (index, stage) pair from a staged sampler: the stage travels to the collator."""
        if isinstance(key, tuple):
            return self.records[key[0]], key[1]
        return self.records[key]


def load_records(folders: Sequence[str | Path], split: str) -> tuple[list[Record], list[dict]]:
    """Records of `split` from every prepared folder, and each folder's concept.json."""
    records, concepts = [], []
    for folder in folders:
        folder = Path(folder)
        if not (folder / "manifest.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: not a prepared concept folder (no manifest.jsonl); run `unipers prepare`")
        concept, samples = read_prepared(folder)
        concepts.append(concept)
        records += [Record(s, folder.resolve(), len(records) + i)
                    for i, s in enumerate(x for x in samples if x.split == split)]
    return records, concepts


def with_views(records: Sequence[Record], spec: ViewSpec) -> list[Record]:
    """Each understanding record with an image, followed by its ``spec.views`` augmented views (other
    records unchanged); ids renumbered so they stay unique. The sampler draws uniformly within a task, so
    every view of a photo is as likely as the photo itself, and the task mix is unchanged."""
    out: list[Record] = []
    for r in records:
        views = spec.views if r.sample.image and r.sample.task in UNDERSTANDING_TASKS else 0
        out += [Record(r.sample, r.root, len(out) + v, v, spec if v else None) for v in range(views + 1)]
    return out


class ConceptDataModule(L.LightningDataModule):
    def __init__(self, folders: Sequence[str | Path], *, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 task_weights: Optional[Mapping[str, float]] = None, samples_per_epoch: Optional[int] = None,
                 steps: Optional[int] = None, accumulate: int = 1,
                 stages: Optional[Sequence[tuple[int, Mapping[str, float]]]] = None,
                 formats: Sequence[StageFormat] = (StageFormat(),), augment: ViewSpec = ViewSpec()):
        """`steps` makes one epoch exactly `steps` optimizer steps long (a training run is one epoch),
        `stages` ((first step, task weights) per stage) with `formats` lets a recipe change the mix and
        the sample format from stage to stage, and `augment` adds augmented views of the training images
        of understanding tasks (validation keeps the photos as they are)."""
        super().__init__()
        if not folders:
            raise ValueError("no concept folders given (set data.concepts=[DIR,...])")
        self.folders = [Path(f) for f in folders]
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.task_weights = dict(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
        self.samples_per_epoch = samples_per_epoch
        self.steps, self.accumulate = steps, accumulate
        self.stages, self.formats = stages, list(formats)
        self.train_records, self.concepts = load_records(self.folders, "train")
        if augment.views:
            self.train_records = with_views(self.train_records, augment)
        self.val_records, _ = load_records(self.folders, "val")
        self.collator: Optional[Collator] = None

    @property
    def concept_names(self) -> list[str]:
        return [c["name"] for c in self.concepts]

    def attach(self, model) -> None:
        """Bind to a model: check its bank holds every concept, cache image features, build the collator."""
        missing = [n for n in self.concept_names if n not in model.bank]
        if missing:
            raise ValueError(f"concepts {missing} are in the data but not in the model's bank (add them first)")
        records = self.train_records + self.val_records
        gen_keys = [r.image_key for r in records if r.sample.task == "generation"]
        # Generation targets need VQ tokens too when a stage trains the AR image-token loss.
        token_keys = [r.image_key for r in records if r.image_key and (
            r.sample.task != "generation" or any(f.image_tokens for f in self.formats))]
        tokens = image_token_cache(model, token_keys) if token_keys else {}
        latents = latent_cache(model, gen_keys) if gen_keys else {}
        descriptions = None
        if recognition_layout(model.prompts).describes:  # two turns: the base's words for each image first
            keys = [r.image_key for r in records if r.sample.task == "recognition" and r.image_key]
            descriptions = description_cache(model, tokens, keys) if keys else {}
        self.collator = Collator(model.prompts, model.backbone.tokenizer.pad_token_id, tokens, latents,
                                 stages=self.formats, descriptions=descriptions)

    def _sampler(self) -> MixtureSampler:
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        per_step = self.batch_size * self.accumulate * replicas
        total = self.steps * per_step if self.steps is not None else self.samples_per_epoch
        return MixtureSampler([r.sample.task for r in self.train_records], self.task_weights,
                              num_samples=total, num_replicas=replicas, rank=rank, seed=self.seed,
                              stages=self.stages, samples_per_step=per_step)

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        if self.collator is None:
            raise RuntimeError("call attach(model) before asking for data loaders")
        return StatefulDataLoader(
            RecordDataset(self.train_records), batch_size=self.batch_size, sampler=self._sampler(),
            collate_fn=self.collator, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), persistent_workers=False,
        )

    def val_dataloader(self):
        from torch.utils.data import DataLoader

        if self.collator is None:
            raise RuntimeError("call attach(model) before asking for data loaders")
        return DataLoader(RecordDataset(self.val_records), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collator, num_workers=self.num_workers)
