"""Generation metrics of one method: images drawn for every prompt template, compared with the train photos
(CLIP-I, DINO) and with the prompt written with the class word (CLIP-T), and checked for copies.

    scorer = GenerationScorer(session, settings, templates, clip=clip, dino=dino, grids=Path("eval/grids"))
    scorer.score(target, "personal", None, metrics, counts, "bo", per_sample)

Every image is a sample: ``<template digest>/<i>`` for the i-th seed of a template (eval.seed + i).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from unipers.eval import metrics as M
from unipers.eval.prompts import class_prompt, context, generation_prompt
from unipers.eval.targets import EvalTarget
from unipers.eval.uncertainty import digest, record, unique_ids


class GenerationScorer:
    """Draws with one session; each concept's reference embeddings are computed once."""

    def __init__(self, session, settings, templates: Sequence[str], *, clip, dino=None, grids: Optional[Path] = None):
        self.session, self.s, self.templates = session, settings, list(templates)
        self.clip, self.dino, self.grids = clip, dino, grids
        self._refs: dict[tuple[str, Path], dict[str, Tensor]] = {}
        self.rewrites: list[dict] = []
        """With eval.think: per (method, concept, template), the prompt and its rewrite or why it was refused."""

    def references(self, t: EvalTarget) -> dict[str, Tensor]:
        key = (t.name, t.folder)
        if key not in self._refs:
            from unipers.eval.copies import thumbnails
            from unipers.eval.models import open_photos

            photos = open_photos(t.references)
            self._refs[key] = {"clip": self.clip.images(photos),
                               "dino": self.dino.images(photos) if self.dino is not None else None,
                               "pixel": thumbnails(photos)}
        return self._refs[key]

    def thought(self, prompt: str, method: str, label: str, concept: str, template: str, counts: dict) -> str:
        """The prompt to draw: with eval.think, the AR model's rewrite of a prompt that names a loaded concept
        (a refused rewrite: the prompt as written, counted in generation/think_refused)."""
        from unipers.inference.session import InputError

        if not self.s.think or method == "image" or not self.session.loaded_in(prompt):
            return prompt
        entry = {"method": label, "concept": concept, "template": template, "prompt": prompt}
        try:
            entry["rewrite"] = self.session.think(prompt)
        except InputError as err:
            entry["refused"] = str(err)
        key = "generation/think_refused" if "refused" in entry else "generation/think_rewritten"
        counts[key] = counts.get(key, 0) + 1
        self.rewrites.append(entry)
        return entry.get("rewrite", prompt)

    def draw(self, prompt: str, method: str, ref: Optional[Tensor]) -> Tensor:
        s, n = self.s, self.s.images_per_prompt
        if method != "image":
            return self.session.generate([prompt], seed=s.seed, num_images=n, steps=s.steps, guidance=s.guidance).tensors
        # A photo in context: the base reads it like a question's image; the connector sees those states.
        return self.session.model.generate_images([prompt] * n, [s.seed + i for i in range(n)], mode="plain",
                                                  images=[[ref]] * n, steps=s.steps, guidance=s.guidance)

    @torch.no_grad()
    def score(self, t: EvalTarget, method: str, ref: Optional[Tensor], metrics: dict, counts: dict,
              grid_name: Optional[str], per_sample=None, label: Optional[str] = None) -> None:
        """Draw every template's images as ``method`` writes the prompt (``label``: the row's name, when it
        is not the method itself, as the token baseline is written as the concept); CLIP-I, DINO, CLIP-T and the copy
        measures into ``metrics`` (per image into ``per_sample``), the images to ``grids/<grid_name>.png``."""
        prefix, _ = context(t.name, method, t.class_word, t.facts)
        clip_img, dino_img, drawn, class_texts, ids = [], [], [], [], []
        for template in self.templates:
            prompt = prefix + generation_prompt(template, t.name, method, t.class_word)
            images = self.draw(self.thought(prompt, method, label or method, t.name, template, counts), method, ref)
            clip_img.append(self.clip.images(images))
            if self.dino is not None:
                dino_img.append(self.dino.images(images))
            drawn.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            ids += [f"{digest(template)}/{i}" for i in range(len(images))]  # the prompt and its i-th seed
            if t.class_word:
                class_texts += [class_prompt(template, t.class_word)] * len(images)
        gen, ids = torch.cat(clip_img), unique_ids(ids)
        dino = torch.cat(dino_img) if dino_img else None
        counts["generation/n_images"] = len(gen)
        rows: dict[str, list[float]] = {}  # metric -> per generated image
        if t.references:
            refs = self.references(t)
            rows["clip_i"] = M.pairwise_cosine_rows(gen, refs["clip"])
            if dino is not None:
                rows["dino"] = M.pairwise_cosine_rows(dino, refs["dino"])
        if class_texts:  # CLIP-T needs a class word to write the prompt without the concept
            rows["clip_t"] = M.paired_cosines(gen, self.clip.texts(class_texts))
        for metric, values in rows.items():
            metrics[metric] = sum(values) / len(values)
            record(per_sample, metric, ids, values)
        if t.references:
            self._copies(refs, gen, dino, torch.cat(drawn), ids, rows, metrics, counts, per_sample)
        if self.grids is not None and grid_name:
            from unipers.eval.report import save_grid

            save_grid(torch.cat(drawn), self.s.images_per_prompt, self.grids / f"{grid_name}.png")

    def _copies(self, refs, gen, dino, drawn, ids, rows, metrics, counts, per_sample) -> None:
        """Each generated image's highest similarity to a train photo (CLIP, DINO, pixels), the share that
        are copies (eval.copy_thresholds), and the generation metrics over the other images."""
        from unipers.eval import copies as C

        sims = {"clip": C.max_cosine_rows(gen, refs["clip"]), "pixel": C.max_pixel_similarity(drawn, refs["pixel"])}
        if dino is not None:
            sims["dino"] = C.max_cosine_rows(dino, refs["dino"])
        flagged = C.flag_copies(sims, self.s.copy_thresholds)
        metrics["copy/share"] = sum(flagged) / len(flagged)
        counts["copy/n"] = sum(flagged)
        record(per_sample, "copy/share", ids, flagged)
        for measure, values in sims.items():
            metrics[f"copy/{measure}_max"] = sum(values) / len(values)
            record(per_sample, f"copy/{measure}_max", ids, values)
        for metric, values in rows.items():
            kept, kept_ids = C.without(values, ids, flagged)
            metrics[f"{metric}/no_copies"] = sum(kept) / len(kept) if kept else None
            record(per_sample, f"{metric}/no_copies", kept_ids, kept)
