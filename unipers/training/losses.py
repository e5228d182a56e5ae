"""The personalization objective, apart from the LightningModule that runs it.

    loss = PersonalizeLoss(model, seed=0, decision_weight=5.0)
    sums, counts = loss.terms(batch, stage.losses, step, zero)     # per term: summed loss, its count
    total, logs = loss.combine(total, sums, reduced, stage.losses, world_size)

Three terms, each weighted per stage: the understanding NLL of the answer tokens (a recognition answer's
Yes / No counts ``decision_weight`` times), the AR image-token NLL, and the diffusion denoising loss through
the frozen connector and decoder. Each term is a sum divided by its *global* count (tokens or samples over
all ranks), times the world size that DDP's gradient averaging divides by, so DDP equals one process; every
sample's diffusion noise is seeded by (seed, step, sample id), not by where the sample landed.
"""

from __future__ import annotations

import torch
from torch import Tensor

TERMS = ("understanding", "image_tokens", "diffusion")
_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, step: int, uid: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_033 + uid) & _MASK64


def answer_token_weights(labels: Tensor, decisions: list, decision_weight: float) -> Tensor:
    """A weight per labelled answer token, in ``understanding_loss(reduction="none")``'s order: 1, and
    ``decision_weight`` at the first answer token of rows that carry a yes/no label (recognition)."""
    targets = labels[:, 1:]
    selected = targets != -100
    weights = selected.float()
    first = selected.float().argmax(1)
    for row, label in enumerate(decisions):
        if label is not None and bool(selected[row].any()):
            weights[row, first[row]] = decision_weight
    return weights[selected]


class PersonalizeLoss:
    def __init__(self, model, *, seed: int = 0, decision_weight: float = 1.0):
        self.model, self.seed, self.decision_weight = model, seed, decision_weight

    def diffusion(self, part: dict, step: int) -> Tensor:
        """Per-sample denoising loss of a generation part, its noise seeded by (seed, step, sample id)."""
        gens = [torch.Generator().manual_seed(sample_seed(self.seed, step, uid)) for uid in part["uid"]]
        return self.model.diffusion_loss(part["ids"], part["attention_mask"], part["latents"].to(part["ids"].device),
                                         generator=gens, reduction="none")

    def terms(self, batch: dict, weights, step: int, zero: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Per term: the summed loss of this rank's batch and what it is counted over (tokens, samples); a
        term whose weight is 0 or whose part is absent from the batch gives (`zero`, 0)."""
        bb = self.model.backbone
        sums = dict.fromkeys(TERMS, zero)
        counts = dict.fromkeys(TERMS, 0.0)
        parts = (("und", "understanding", bb.understanding_loss), ("img", "image_tokens", bb.image_token_loss))
        for key, name, loss_fn in parts:
            if key not in batch or getattr(weights, name) <= 0:
                continue
            p = batch[key]
            if key == "und" and self.decision_weight != 1.0:
                per_token = loss_fn(p["ids"], p["attention_mask"], p["labels"], reduction="none")
                token_weights = answer_token_weights(p["labels"], p["label"], self.decision_weight)
                sums[name], counts[name] = (per_token * token_weights).sum(), float(token_weights.sum())
            else:
                sums[name] = loss_fn(p["ids"], p["attention_mask"], p["labels"], reduction="sum")
                counts[name] = float((p["labels"][:, 1:] != -100).sum())
        if "gen" in batch and weights.diffusion > 0:
            per_sample = self.diffusion(batch["gen"], step)
            sums["diffusion"], counts["diffusion"] = per_sample.sum(), float(len(per_sample))
        return sums, counts

    @staticmethod
    def combine(total: Tensor, sums: dict[str, Tensor], reduced: Tensor, weights, world: int) -> tuple[Tensor, dict]:
        """Add each term to `total` as weight x sum / global count x world size. `reduced` holds the global
        counts, then the global sums (for the logs), in `sums`' order.

        `logs` holds ``train/<term>`` only for terms with samples on some rank this step (global count > 0):
        a step without a generation sample has no ``train/diffusion``, not a made-up 0. The choice rests on
        the all-reduced counts, so every rank logs the same keys at the same step."""
        names, logs = list(sums), {}
        for i, name in enumerate(names):
            n_global = reduced[i].clamp(min=1)
            if reduced[i] > 0:
                total = total + getattr(weights, name) * sums[name] / n_global * world
                logs[f"train/{name}"] = reduced[len(names) + i] / n_global
        return total, logs
