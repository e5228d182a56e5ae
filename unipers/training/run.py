"""`unipers train`: personalize concept rows (or align the connector) from a config.

    unipers train personalize data.concepts=[data/bo,data/mam] trainer.max_steps=300 seed=0 run_dir=runs/bo
    unipers train personalize ... ckpt_path=last        # resume the run folder's newest checkpoint
    unipers train personalize backbone/anole-7b decoder/sd15 my_site.yaml key=value ...   # merged in order

The run folder holds the resolved config, ``run.json`` (git commit, unipers version, base fingerprints,
command line), ``checkpoints/`` (Lightning, trainable state only), ``concepts/`` (concept files), ``logs/``
(CSV by default) and ``samples/`` (answers and images written at validation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

CHECKPOINTS, CONCEPTS, LOGS, SAMPLES = "checkpoints", "concepts", "logs", "samples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="CONFIG... key=value...",
                        help="YAML configs (paths, or shipped names: personalize, backbone/anole-7b), merged in "
                             "order, then key=value overrides (e.g. trainer.max_steps=100)")


def main(args: argparse.Namespace) -> int:
    from unipers.config import ConfigError, load_config, split_config_args

    try:
        cfg = load_config(*split_config_args(args.items))
    except ConfigError as err:
        print(f"unipers train: {err}", file=sys.stderr)
        return 2
    out = train(cfg)
    print(f"run folder: {out}")
    return 0


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes) when unipers runs from a source checkout;
    None for an installed wheel, whose version says what ran."""
    from unipers.paths import source_checkout

    root = source_checkout()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(cfg, run_dir: Path, fingerprints: dict) -> None:
    from unipers import __version__
    from unipers.config import to_yaml
    from unipers.io import atomic_file

    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(to_yaml(cfg))
    info = {"unipers_version": __version__, "git_commit": git_commit(), "fingerprints": fingerprints,
            "command": sys.argv, "stage": cfg.stage}
    with atomic_file(run_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")


def checkpoint_step(path: Path) -> int:
    """The optimizer step a Lightning checkpoint was written at (read through a memory map)."""
    import torch

    from unipers.config import ConfigError

    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception as err:
        raise ConfigError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"{path}: global_step is {step!r}, not a step count")
    return step


def resolve_ckpt(value: str | None, run_dir: Path) -> str | None:
    """`last` -> the run folder's checkpoint of the highest step (None on a fresh run); a path must exist.
    By step, not by file time: a copied or touched folder keeps its order."""
    if value is None:
        return None
    if value == "last":
        ckpts = sorted((run_dir / CHECKPOINTS).glob("*.ckpt"))
        if not ckpts:
            return None
        return str(max(ckpts, key=lambda p: (checkpoint_step(p), p.name == "last.ckpt")))
    if not Path(value).is_file():
        raise FileNotFoundError(f"ckpt_path: no such checkpoint {value}")
    return value


def check_fresh_run(run_dir: Path) -> None:
    """A run without ckpt_path may only start in a folder that holds no other run's checkpoints or outputs:
    its config.yaml and run.json would describe one run and the files another."""
    if (run_dir / CONCEPTS / "last.safetensors").exists() or (run_dir / "connector.safetensors").exists():
        raise FileExistsError(f"{run_dir}: holds a finished run; give a new run_dir")
    found = [p for pattern in (f"{CHECKPOINTS}/*.ckpt", f"{CONCEPTS}/*.safetensors")
             for p in sorted(run_dir.glob(pattern))]
    if found:
        raise FileExistsError(f"{run_dir}: holds an unfinished run ({found[0].relative_to(run_dir)}); resume it "
                              "with ckpt_path=last, or give a new run_dir")


def check_logger_installed(kind: str) -> None:
    """Before any model loads: the logger's package is an extra (``pip install "unipers[tensorboard]"``)."""
    import importlib.util

    from unipers.config import ConfigError

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(kind, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise ConfigError(f"trainer.logger={kind}: {kind} is not installed (pip install \"unipers[{kind}]\")")


def make_logger(cfg, run_dir: Path):
    from lightning.pytorch import loggers

    # One version folder per attempt (logs/version_0, version_1 after a resume): Lightning's CSV writer
    # would otherwise delete the first attempt's metrics when the resumed run writes its own.
    kind = cfg.trainer.logger
    if kind == "csv":
        return loggers.CSVLogger(run_dir, name=LOGS)
    if kind == "tensorboard":
        return loggers.TensorBoardLogger(run_dir, name=LOGS)
    return loggers.WandbLogger(save_dir=str(run_dir), name=run_dir.name)


def check_strategy(cfg) -> None:
    """FSDP runs on CUDA devices only, and Lightning says so after the model is built (minutes at 7B): say
    it first."""
    import torch

    from unipers.schema import ConfigError

    t = cfg.trainer
    if t.strategy == "fsdp" and (t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())):
        raise ConfigError(f"trainer.strategy=fsdp needs CUDA GPUs (trainer.accelerator={t.accelerator}, and "
                          f"{'no GPU is visible' if t.accelerator == 'auto' else 'a CPU run'}); use "
                          "trainer.strategy=ddp on CPU")


def make_strategy(cfg):
    """DDP keeps the frozen base out of broadcast and all-reduce; FSDP shards it (30B-class)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    kind, cpu = cfg.trainer.strategy, cfg.trainer.accelerator == "cpu"
    if kind == "ddp" or (kind == "auto" and cfg.trainer.devices * cfg.trainer.num_nodes > 1):
        return DDPStrategy(process_group_backend="gloo" if cpu else None, find_unused_parameters=False)
    if kind == "fsdp":
        from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer

        # use_orig_params: trainable concept rows and frozen weights share FSDP units.
        return FSDPStrategy(auto_wrap_policy={ChameleonDecoderLayer}, use_orig_params=True,
                            sharding_strategy="FULL_SHARD", state_dict_type="full")
    return "auto"


def build_trainer(cfg, run_dir: Path, callbacks: list, validate: bool = True):
    import lightning as L

    from unipers.training.callbacks import CheckpointOnSignal, SlurmRequeue, StepCheckpoints, in_slurm_step

    t = cfg.trainer
    validate = validate and t.val_every > 0
    ckpt_dir = run_dir / CHECKPOINTS
    periodic = StepCheckpoints(ckpt_dir, t.checkpoint_every)
    plugins, slurm = [], []
    if in_slurm_step():  # ranks from srun; requeue is ours (SlurmRequeue), not Lightning's mid-step one
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins, slurm = [SLURMEnvironment(auto_requeue=False)], [SlurmRequeue(ckpt_dir)]
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=make_strategy(cfg),
        precision=t.precision, max_steps=t.max_steps, max_epochs=-1,
        gradient_clip_val=t.gradient_clip_val or None, accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_every if validate else None, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if validate else 0, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every, logger=make_logger(cfg, run_dir), enable_progress_bar=t.progress_bar,
        callbacks=[periodic, CheckpointOnSignal(ckpt_dir), *slurm, *callbacks], plugins=plugins or None,
        use_distributed_sampler=False,  # the MixtureSampler shards over ranks itself
        deterministic=False, enable_model_summary=False,
    )


def cpu_threads_for_run(cfg, model):
    """``trainer.cpu_threads`` applied for the run when it trains on the CPU (unipers.runtime)."""
    import contextlib

    import torch

    from unipers.runtime import cpu_threads, threads_for

    accel = cfg.trainer.accelerator
    if accel not in ("cpu", "auto") or (accel == "auto" and torch.cuda.is_available()):
        return contextlib.nullcontext()
    return cpu_threads(threads_for(cfg.trainer.cpu_threads, sum(p.numel() for p in model.parameters())))


def train(cfg, callbacks: Sequence = ()) -> Path:
    """Run `cfg` (personalize or align) into ``cfg.run_dir``; returns it. The run folder is locked while the
    run writes to it. Raises ``StoppedBySignal`` when a SIGTERM stopped the run after writing
    ``checkpoints/last.ckpt`` (``ckpt_path=last`` resumes it)."""
    from unipers.io import folder_lock
    from unipers.training.callbacks import SlurmRequeue, in_slurm_step

    check_logger_installed(cfg.trainer.logger)
    check_strategy(cfg)
    if in_slurm_step():
        SlurmRequeue.listen()  # before the (slow) model load: an unhandled SIGUSR1 would kill the task
    run_dir = Path(cfg.run_dir)
    with folder_lock(run_dir, first_process=launching_process()):
        if cfg.ckpt_path is None:
            check_fresh_run(run_dir)
        return (run_align if cfg.stage == "align" else run_personalize)(cfg, callbacks)


def launching_process() -> bool:
    """Rank 0 of node 0 (or a single process): the one that holds the run folder's lock. Lightning's DDP
    workers and Slurm's other tasks run inside the run that process locked."""
    import os

    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def fit(trainer, module, *, datamodule, ckpt_path) -> None:
    """``trainer.fit``, with a SIGTERM stop turned into ``StoppedBySignal`` once its checkpoint is written."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from unipers.errors import StoppedBySignal
    from unipers.training.callbacks import CheckpointOnSignal

    guard = next(c for c in trainer.callbacks if isinstance(c, CheckpointOnSignal))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as err:
        if not guard.saved:
            raise
        raise StoppedBySignal(guard.message(trainer)) from err
    if guard.saved:
        raise StoppedBySignal(guard.message(trainer))


def run_align(cfg, extra_callbacks: Sequence = ()) -> Path:
    """Train the connector (and optionally decoder LoRA / blocks) on image-caption pairs; writes
    ``RUN/connector.safetensors`` (+ ``connector.decoder.safetensors`` when the decoder trained)."""
    import lightning as L

    from unipers.config import ConfigError
    from unipers.data.pairs import build_align_data
    from unipers.models.unified import UnifiedModel
    from unipers.models.decoder_delta import decoder_delta_path
    from unipers.training.align import AlignModule
    from unipers.training.state import check_checkpoint

    if not cfg.data.pairs:
        raise ConfigError("data.pairs is empty: give a folder with captions.jsonl, or a glob of tar shards")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir, t, a = Path(cfg.run_dir), cfg.trainer, cfg.align
    model = UnifiedModel.from_config(cfg)
    module = AlignModule(model, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=a.warmup_steps,
                         max_steps=t.max_steps, train_decoder=a.train_decoder, lora_rank=a.lora_rank,
                         unfreeze_blocks=tuple(a.unfreeze_blocks), caption_dropout=a.caption_dropout, seed=cfg.seed)
    pairs = Path(cfg.data.pairs)

    class Pairs(L.LightningDataModule):
        def train_dataloader(self):  # built here, so ranks are known
            latents = None
            if pairs.is_dir() and cfg.data.cache_latents:
                latents = self.cached_latents()
            return build_align_data("folder" if pairs.is_dir() else "shards", cfg.data.pairs,
                                    image_size=model.decoder.image_size, batch_size=cfg.data.batch_size,
                                    num_workers=cfg.data.num_workers, seed=cfg.seed,
                                    rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                                    latents=latents)

        def cached_latents(self):
            """Every image's VAE latents, encoded once (by rank 0; the others load its file)."""
            from unipers.data.collate import latent_cache
            from unipers.data.pairs import CaptionFolderDataset

            paths = CaptionFolderDataset(pairs, pairs / "captions.jsonl", model.decoder.image_size).image_paths
            encode = dict(root=pairs, batch_size=cfg.data.cache_batch_size)
            latents = latent_cache(model, paths, **encode) if self.trainer.global_rank == 0 else None
            self.trainer.strategy.barrier("align-latents")
            return latents if latents is not None else latent_cache(model, paths, **encode)

    ckpt = resolve_ckpt(cfg.ckpt_path, run_dir)
    out = run_dir / "connector.safetensors"
    if ckpt:
        check_checkpoint(module, ckpt)
    write_run_info(cfg, run_dir, model.fingerprints)
    trainer = build_trainer(cfg, run_dir, list(extra_callbacks), validate=False)
    with cpu_threads_for_run(cfg, model):
        fit(trainer, module, datamodule=Pairs(), ckpt_path=ckpt)
    if trainer.is_global_zero:
        module.save_connector(out)
        if a.train_decoder != "none":
            fps = {f"{kind}_fingerprint": value for kind, value in model.fingerprints.items()}
            module.save_decoder_delta(decoder_delta_path(out), {**fps, "stage": "align"})
    return run_dir


def run_personalize(cfg, extra_callbacks: Sequence = ()) -> Path:
    """Train the concepts of `cfg.data.concepts`; `extra_callbacks` are added to the Trainer's."""
    import lightning as L

    from unipers.config import ConfigError
    from unipers.data.augment import ViewSpec
    from unipers.data.datamodule import ConceptDataModule
    from unipers.models.unified import UnifiedModel
    from unipers.training.schedule import Schedule

    if not cfg.data.concepts:
        raise ConfigError("data.concepts is empty: give folders written by `unipers prepare`, "
                          "e.g. data.concepts=[data/bo]")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    p, t = cfg.personalize, cfg.trainer
    schedule = Schedule(p.schedule, t.max_steps, warmup_steps=p.warmup_steps, lr_schedule=p.lr_schedule)
    data = ConceptDataModule(cfg.data.concepts, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                             seed=cfg.seed, task_weights=cfg.data.task_weights, steps=t.max_steps,
                             accumulate=t.accumulate_grad_batches,
                             stages=schedule.task_stages(cfg.data.task_weights), formats=schedule.formats(),
                             augment=ViewSpec.from_config(cfg.data.augment))
    model = UnifiedModel.from_config(cfg)
    for concept in data.concepts:
        model.add_concept(concept["name"], concept.get("class_word"), init=cfg.bank.init,
                          init_noise=cfg.bank.init_noise, seed=cfg.seed)
    with cpu_threads_for_run(cfg, model):  # the cached descriptions and tokens round as training does
        return _fit_personalize(cfg, model, data, schedule, extra_callbacks)


def _fit_personalize(cfg, model, data, schedule, extra_callbacks: Sequence) -> Path:
    from unipers.config import to_yaml
    from unipers.training.callbacks import ConceptFiles, ValidationSamples
    from unipers.training.personalize import PersonalizeModule
    from unipers.training.state import check_checkpoint

    run_dir, p, t = Path(cfg.run_dir), cfg.personalize, cfg.trainer
    data.attach(model)
    if t.compile:
        for layer in model.backbone.model.model.layers:
            layer.compile()
    module = PersonalizeModule(model, schedule, lr=t.lr, weight_decay=t.weight_decay, seed=cfg.seed,
                               decision_weight=p.decision_weight)
    ckpt = resolve_ckpt(cfg.ckpt_path, run_dir)
    if ckpt:
        check_checkpoint(module, ckpt)
    write_run_info(cfg, run_dir, model.fingerprints)
    callbacks = [ConceptFiles(run_dir / CONCEPTS, p.save_every, config=to_yaml(cfg)), *extra_callbacks]
    if t.val_every and data.val_records:
        callbacks.append(ValidationSamples(run_dir / SAMPLES))
    trainer = build_trainer(cfg, run_dir, callbacks, validate=bool(data.val_records))
    fit(trainer, module, datamodule=data, ckpt_path=ckpt)
    return run_dir
