"""Callbacks: concept files (interval, best, last), a checkpoint on SIGTERM, Slurm requeue on SIGUSR1,
validation samples.

Concept files go to ``RUN/concepts/``, written atomically by rank 0:
``step_000100.safetensors`` every `save_every` steps, ``best_recognition`` / ``best_diffusion`` when the
held-out split improves, and ``last`` at the end.

A run killed at any moment and resumed picks the same best files as one never killed: a best file records
its metric's value in its header, and a resumed run compares against the file on disk (the truth, even when
the kill came after the file was written but before the next checkpoint); and a checkpoint at a step that
validates is written after that validation (``StepCheckpoints``), so resuming never skips a validation.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


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
    BEST = {"val/recognition": ("best_recognition", +1), "val/diffusion": ("best_diffusion", -1)}  # +1: higher is better

    def __init__(self, folder: str | Path, save_every: int = 0, config: str | None = None):
        # `config`: the run's resolved config as YAML, kept in every file so a concept carries how it was made.
        self.folder, self.save_every, self.config = Path(folder), save_every, config
        self.best: dict[str, float] = {}

    def _save(self, pl_module, name: str, trainer: L.Trainer, extra: dict | None = None) -> None:
        if _rank_zero(trainer):
            recorded = {"step": str(trainer.global_step), **({"config": self.config} if self.config else {})}
            pl_module.model.save_concepts(self.folder / f"{name}.safetensors", extra={**recorded, **(extra or {})})

    def on_train_start(self, trainer, pl_module) -> None:
        self.best.update(self.saved_best())

    def saved_best(self) -> dict[str, float]:
        """{metric: value} recorded in the best files already in the folder (a resumed run's)."""
        from safetensors import safe_open

        found = {}
        for key, (name, sign) in self.BEST.items():
            path = self.folder / f"{name}.safetensors"
            if not path.is_file():
                continue
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("metric") == key and "value" in meta:
                found[key] = float(meta["value"])
        return found

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.save_every and step % self.save_every == 0:
            self._save(pl_module, f"step_{step:06d}", trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for key, (name, sign) in self.BEST.items():
            value = trainer.callback_metrics.get(key)
            if value is None:
                continue
            value = float(value)
            if key not in self.best or sign * (value - self.best[key]) > 0:
                self.best[key] = value
                self._save(pl_module, name, trainer, {"metric": key, "value": repr(value)})

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


class StepCheckpoints(ModelCheckpoint):
    """A resumable checkpoint every `every` optimizer steps (``step_000050.ckpt``). At a step that validates it
    is written after the validation, so it holds the best-file state that validation produced and a run
    resumed from it does not skip that validation."""

    def __init__(self, folder: str | Path, every: int):
        super().__init__(dirpath=folder, filename="step_{step:06d}", auto_insert_metric_name=False,
                         every_n_train_steps=every or None, save_top_k=-1, save_last=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if every and trainer.global_step % every == 0 and validates_after_this_batch(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves then
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def validates_after_this_batch(trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch: every
    ``val_check_interval`` batches counted over the whole run (``check_val_every_n_epoch=None``)."""
    loop = trainer.fit_loop.epoch_loop
    every = trainer.val_check_batch
    if not trainer.enable_validation or not every or every == float("inf") or trainer.check_val_every_n_epoch:
        return False
    return (loop.total_batch_idx + 1) % int(every) == 0


class _OnSignal(L.Callback):
    """Acts on a signal at the end of an optimizer step, on every rank at the same step.

    The local flag is all-reduced once per optimizer step (a fraction of a millisecond): ranks that saw the signal
    one step apart would otherwise save different steps, or wait for each other forever. Mid gradient
    accumulation is never a resumable point, so nothing happens there.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._step = 0

    def signalled(self, trainer) -> bool:
        raise NotImplementedError

    def act(self, trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step  # the resumed step: the next change marks an optimizer step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        flag = torch.tensor(float(self.signalled(trainer)), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item():
            self.act(trainer, pl_module)


class CheckpointOnSignal(_OnSignal):
    """SIGTERM (a kill, a preemption) -> finish the step, write ``last.ckpt``, stop.

    Lightning itself finishes the batch and exits without saving anything; it raises only after
    ``on_train_batch_end``, so the checkpoint written here is the same kind ModelCheckpoint writes.

    A SIGTERM that lands after this check in a step (while ModelCheckpoint writes, say) is caught at the
    next step, unless Lightning stops first: at the end of an epoch, or inside validation, it raises
    SIGTERMException before another step ends. ``on_exception`` writes ``last.ckpt`` then, from that
    consistent point (Lightning resumes mid-validation by skipping the rest of it). One process only:
    with several ranks that exception is not raised on all of them at the same point, and a collective
    save would hang.
    """

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self.saved = False

    def signalled(self, trainer) -> bool:
        return trainer.received_sigterm

    def act(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.folder / "last.ckpt")
        self.saved = True
        trainer.should_stop = True

    def message(self, trainer) -> str:
        return (f"stopped by SIGTERM at step {trainer.global_step}; {self.folder / 'last.ckpt'} holds it: rerun "
                "with ckpt_path=last to resume")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and not self.saved and trainer.world_size == 1:
            trainer.save_checkpoint(self.folder / "last.ckpt")
            self.saved = True


def in_slurm_step() -> bool:
    """Started by ``srun`` inside a Slurm job (not the batch shell, not an interactive ``bash`` job)."""
    env = os.environ
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


class SlurmRequeue(_OnSignal):
    """SIGUSR1 (``--signal=USR1@90`` before the time limit, or ``scancel --signal=USR1``) -> at the end of
    the step, on every rank at once: write ``last.ckpt``, ignore SIGTERM, rank 0 runs ``scontrol requeue``,
    exit. The requeued job resumes with ``ckpt_path=last`` to the same rows as an uninterrupted run.

    The handler only sets a flag: Lightning's own auto-requeue saves inside the handler, mid-step, and the
    resumed run skips or repeats batches.
    """

    requested = False

    @classmethod
    def listen(cls) -> None:
        """Install the flag-setting handler (early: a signal before it exists would kill the task)."""
        def flag(signum, frame):
            cls.requested = True
        signal.signal(signal.SIGUSR1, flag)

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self.listen()

    def signalled(self, trainer) -> bool:
        return SlurmRequeue.requested

    def act(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.folder / "last.ckpt")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # scontrol requeue sends it; the state is saved
        code = 0
        if trainer.is_global_zero:
            env = os.environ
            job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env
                   else env.get("SLURM_JOB_ID", ""))
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                result = "ok" if done.returncode == 0 else done.stderr.strip()
            except (OSError, subprocess.SubprocessError) as err:
                result = str(err)
            print(f"SIGUSR1 at step {trainer.global_step}: saved {self.folder / 'last.ckpt'}; "
                  f"scontrol requeue {job}: {result}", flush=True)
            code = 0 if result == "ok" else 1  # not requeued: fail the job visibly; ckpt_path=last resumes it
        raise SystemExit(code)


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
            image = model.generate_images([f"A photo of <{name}>."], [0], steps=self.steps, guidance=self.guidance)
            save_image(image, self.folder / f"step_{step:06d}_{name}.png")
        (self.folder / f"step_{step:06d}.md").write_text("\n".join(lines) + "\n")
