"""Callbacks: concept files (interval, best, last), a checkpoint on SIGTERM, validation samples.

Concept files go to ``RUN/concepts/``, written atomically by rank 0:
``step_000100.safetensors`` every `save_every` steps, ``best_recognition`` / ``best_diffusion`` when the
held-out split improves, and ``last`` at the end.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def bank_digest(bank) -> str:
    """sha256 of every concept row, in a fixed order."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(bank.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank_zero(trainer: L.Trainer) -> bool:
    return trainer.is_global_zero


class ConceptFiles(L.Callback):
    BEST = {"val/recognition": ("best_recognition", max), "val/diffusion": ("best_diffusion", min)}

    def __init__(self, folder: str | Path, save_every: int = 0):
        self.folder, self.save_every = Path(folder), save_every
        self.best: dict[str, float] = {}

    def _save(self, pl_module, name: str, trainer: L.Trainer) -> None:
        if _rank_zero(trainer):
            pl_module.model.save_concepts(self.folder / f"{name}.safetensors", extra={"step": str(trainer.global_step)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.save_every and step % self.save_every == 0:
            self._save(pl_module, f"step_{step:06d}", trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for key, (name, better) in self.BEST.items():
            value = trainer.callback_metrics.get(key)
            if value is None:
                continue
            value = float(value)
            if key not in self.best or better(value, self.best[key]) != self.best[key]:
                self.best[key] = value
                self._save(pl_module, name, trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(pl_module, "last", trainer)
        # Every rank records a digest of its rows: replicas that drifted apart show up in RUN/ranks/.
        ranks = self.folder.parent / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank{trainer.global_rank}.sha256").write_text(bank_digest(pl_module.model.bank) + "\n")

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best", {}))


class CheckpointOnSignal(L.Callback):
    """SIGTERM (a kill, a preemption) -> finish the step, write ``last.ckpt``, stop.

    Lightning itself finishes the batch and exits without saving anything (DESIGN.md); it raises only after
    ``on_train_batch_end``, so the checkpoint written here is the same kind ModelCheckpoint writes.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            trainer.save_checkpoint(self.folder / "last.ckpt")
            trainer.should_stop = True


class ValidationSamples(L.Callback):
    """At each validation, rank 0 writes one answer and one image per concept to ``RUN/samples/``."""

    def __init__(self, folder: str | Path, *, max_new_tokens: int = 24, steps: int = 10, guidance: float = 3.0):
        self.folder = Path(folder)
        self.max_new_tokens, self.steps, self.guidance = max_new_tokens, steps, guidance

    @torch.no_grad()
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not _rank_zero(trainer):
            return
        from torchvision.utils import save_image

        model = pl_module.model
        bb, step = model.backbone, trainer.global_step
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [f"# step {step}\n"]
        for name in model.bank.names:
            question = f"What do you know about <{name}>?"
            ids = torch.tensor([model.prompts.encode_question(question)], device=bb.device)
            answer = bb.tokenizer.decode(bb.generate(ids, max_new_tokens=self.max_new_tokens)[0],
                                         skip_special_tokens=True)
            lines.append(f"- **{question}** {answer.strip()}")
            cond = model.condition(*model.encode_batch([f"A photo of <{name}>."], mode="gen"))
            uncond = model.condition(*model.encode_batch([""], mode="plain"))
            image = model.decoder.sample(cond, uncond, num_steps=self.steps, guidance=self.guidance,
                                         generator=torch.Generator().manual_seed(0))
            save_image(image, self.folder / f"step_{step:06d}_{name}.png")
        (self.folder / f"step_{step:06d}.md").write_text("\n".join(lines) + "\n")
