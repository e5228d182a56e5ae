"""PersonalizeModule: trains concept rows with the understanding, AR image-token and diffusion losses.

The module composes; the math lives in the parts: the objective in `PersonalizeLoss` (losses.py), the
gradient step of the rows in `ConceptBank.drop_gradients`, the LR in `Schedule`.

Three properties are kept on purpose:
- **Exactly the rows a stage names move.** After backward (and DDP's all-reduce) the gradients of slot
  groups outside the stage, and of rows this step did not touch (zero gradient), are set to None, so
  AdamW skips them: weight decay and momentum cannot move them.
- **DDP equals one process.** Each loss is a sum divided by its *global* count (tokens or samples,
  all-reduced), times the world size that DDP's gradient averaging divides by; every sample's diffusion
  noise is seeded by (seed, step, sample id), not by where the sample landed.
- **Finite or fail.** A non-finite loss (all-reduced, so every rank sees the same value) stops the run before
  its backward, and rows that become non-finite after a step stop it before any callback can save them:
  a diverged run exits non-zero (`DivergedError`) and never writes NaN concept files or checkpoints.
- **Checkpoints hold trainable state only.** Frozen weights are dropped on save (`strict_loading=False`)
  and are neither broadcast nor all-reduced by DDP (`_ddp_params_and_buffers_to_ignore`).
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch import Tensor

from unipers.errors import DivergedError
from unipers.models.unified import UnifiedModel
from unipers.training.losses import PersonalizeLoss
from unipers.training.schedule import Schedule
from unipers.training.state import CheckpointError, check_trainable_state


def non_finite_concepts(bank) -> list[str]:
    """The concepts of `bank` with a NaN or infinite row. One fused norm over every row answers the common
    case (all finite); only when it is not finite (a NaN, an inf, or rows so large their squares overflow)
    are the concepts checked one by one."""
    params = list(bank.parameters())
    if not params or bool(torch.isfinite(torch.nn.utils.get_total_norm(params, foreach=True))):
        return []
    return [name for name in bank.names
            if not all(bool(torch.isfinite(p).all()) for p in bank.concept_rows(name).parameters())]


class PersonalizeModule(L.LightningModule):
    def __init__(self, model: UnifiedModel, schedule: Schedule, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, decision_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.decision_weight = decision_weight
        self.loss = PersonalizeLoss(model, seed=seed, decision_weight=decision_weight)
        self.strict_loading = False
        trainable = {id(p) for p in model.trainable_parameters()}
        self._ddp_params_and_buffers_to_ignore = [
            n for n, p in self.named_parameters() if id(p) not in trainable] + [n for n, _ in self.named_buffers()]
        self._val: list[dict] = []

    # ---- helpers ----------------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _global_sum(self, values: Tensor) -> Tensor:
        """Sum over ranks. Called once per step with a fixed shape on every rank (a collective)."""
        values = values.detach().float().to(self.device)
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        return self.trainer.strategy.reduce(values, reduce_op="sum")

    # ---- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        step = self.global_step
        weights = self.schedule.at(step).losses
        # Every trainable parameter takes part in every step (zero gradient when unused), so DDP needs no
        # find_unused_parameters; zero gradients are dropped again before the optimizer step.
        total = sum((p * 0).sum() for p in self.model.trainable_parameters())
        sums, counts = self.loss.terms(batch, weights, step, zero=total.detach())
        names = list(sums)
        reduced = self._global_sum(torch.tensor([counts[n] for n in names] + [sums[n].item() for n in names]))
        if not torch.isfinite(reduced).all():
            bad = [n for n, v in zip(names, reduced[len(names):]) if not torch.isfinite(v)]
            raise DivergedError(f"training diverged at step {step}: the {', '.join(bad)} loss is not finite "
                                f"(trainer.lr={self.lr:g}); nothing of this step was saved")
        total, logs = self.loss.combine(total, sums, reduced, weights, self.world)
        logs["train/stage"] = float(self.schedule.index_at(step))
        self._log_step(logs, batch_size=len(batch["concepts"]))
        return total

    def _log_step(self, logs: dict, batch_size: int) -> None:
        """Log this step's terms, and only them. Lightning keeps a step metric's last value until the epoch
        ends and writes it again at every later step that did not log it: a term absent from this step (no
        generation sample, say) would repeat an old loss in metrics.csv. So the stale entries are dropped
        first. `combine` picks the terms from all-reduced counts, so every rank logs (and drops) the same
        keys at the same step, and nothing here is a collective."""
        results = getattr(self.trainer, "_results", None) if self._trainer is not None else None
        if results is not None:
            for metric in results.values():
                meta = metric.meta
                if meta.fx == "training_step" and meta.name.startswith("train/") and meta.name not in logs:
                    metric.reset()  # leaves the logged set until the term is logged again
        self.log_dict(logs, prog_bar=True, batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.model.bank.drop_gradients(keep=self.schedule.at(self.global_step).train)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Before on_train_batch_end, where checkpoints and concept files are written. The rows are the same
        # on every rank (all-reduced gradients), so every rank stops at the same step.
        bad = non_finite_concepts(self.model.bank)
        if bad:
            raise DivergedError(f"training diverged at step {self.global_step}: the rows of "
                                f"{', '.join('<' + b + '>' for b in bad)} are not finite (trainer.lr={self.lr:g}); "
                                "nothing of this step was saved")

    def configure_optimizers(self):
        # The schedule knows max_steps: trainer.estimated_stepping_batches would skip restoring the loader
        # state on resume (Lightning #20550).
        opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation -------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bb, out = self.model.backbone, {}
        if "und" in batch:
            p = batch["und"]
            out["und_sum"] = bb.understanding_loss(p["ids"], p["attention_mask"], p["labels"], reduction="sum").item()
            out["und_count"] = int((p["labels"][:, 1:] != -100).sum())
            rows = [i for i, label in enumerate(p["label"]) if label is not None]
            if rows:
                out["recognition"] = list(zip(self._says_yes(p, rows), (p["label"][i] for i in rows)))
        if "gen" in batch:
            out["gen"] = self.loss.diffusion(batch["gen"], 0).tolist()
        self._val.append(out)

    def _says_yes(self, part: dict, rows: list[int]) -> list[bool]:
        """Yes/No from the answer's first-token logits (the position before the first labelled token)."""
        bb = self.model.backbone
        ids, mask, labels = (part[k][rows] for k in ("ids", "attention_mask", "labels"))
        hidden, _ = bb.hidden_states(ids, mask)
        first = (labels != -100).float().argmax(1) - 1
        h = hidden[torch.arange(len(rows)), first]
        return bb.says_yes(bb.logits(h, bb.bank.presence(ids))).tolist()

    def on_validation_epoch_end(self) -> None:
        outs, self._val = self._val, []
        metrics = {}
        count = sum(o.get("und_count", 0) for o in outs)
        if count:
            metrics["val/understanding"] = sum(o.get("und_sum", 0.0) for o in outs) / count
        decisions = [d for o in outs for d in o.get("recognition", [])]
        pos = [yes for yes, label in decisions if label]
        neg = [not yes for yes, label in decisions if not label]
        if pos:
            metrics["val/recognition_pos"] = sum(pos) / len(pos)
        if neg:
            metrics["val/recognition_neg"] = sum(neg) / len(neg)
        if pos or neg:  # Yo'Chameleon's weighted accuracy; one side alone when the split has only that side
            sides = [metrics[k] for k in ("val/recognition_pos", "val/recognition_neg") if k in metrics]
            metrics["val/recognition"] = sum(sides) / len(sides)
        gen = [x for o in outs for x in o.get("gen", [])]
        if gen:
            metrics["val/diffusion"] = sum(gen) / len(gen)
        if metrics:
            self.log_dict(metrics, prog_bar=False, rank_zero_only=True)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["unipers"] = {"concepts": self.model.bank.names, **self.model.fingerprints}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint, self.trainer.ckpt_path if self._trainer is not None else "checkpoint")

    def check_checkpoint(self, checkpoint: dict, path) -> None:
        """CheckpointError naming `path` unless `checkpoint` was saved by this run's configuration."""
        saved: Optional[dict] = checkpoint.get("unipers")
        if saved is not None:
            for kind, ours in self.model.fingerprints.items():
                if saved.get(kind) != ours:
                    raise CheckpointError(f"{path}: trained on {kind} {saved.get(kind)}, this run has {ours}")
            if saved["concepts"] != self.model.bank.names:
                raise CheckpointError(f"{path}: holds concepts {saved['concepts']}, this run {self.model.bank.names}")
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        check_trainable_state(self, checkpoint["state_dict"], trainable, path)
