"""Align stage (stage 0): train the connector on generic image–caption pairs with the diffusion loss,
optionally with LoRA adapters on the UNet attention projections or with whole UNet blocks unfrozen.
Run once per backbone/decoder pair, usually on many GPUs.

    model = UnifiedModel.from_config(cfg)                      # no connector.path: a fresh connector
    module = AlignModule(model, lr=1e-4, weight_decay=0.01, warmup_steps=500, max_steps=20_000,
                         train_decoder="lora", lora_rank=8)
    L.Trainer(max_steps=20_000, strategy="ddp").fit(module, build_align_data("shards", PATTERN, ...))
    module.save_connector("aligned/connector.safetensors")     # rank 0 writes; other ranks return

    # personalize: connector.path=aligned/connector.safetensors (checked against both base fingerprints);
    # if the decoder was trained, UnifiedModel.from_config applies its delta (unipers.models.decoder_delta)

The optimizer sees an explicit allow-list (``trainable_names``); everything else is frozen and stays in
eval mode. Lightning checkpoints keep only the allow-listed tensors. The connector file carries both base
fingerprints, so it is refused on another pair; the decoder delta (``*.decoder.safetensors``) holds only
the trained decoder tensors (LoRA factors, merged into the weights on apply, or the unfrozen blocks).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from unipers import __version__
from unipers.io import atomic_file, save_safetensors_atomic
from unipers.models.decoder_delta import (DECODER_MODES, DELTA_FORMAT, add_lora, decoder_delta_path,
                                          lora_factors)
from unipers.training.state import check_trainable_state
from unipers.training.schedule import warmup_cosine


class AlignModule(L.LightningModule):
    """Connector (+ optional decoder LoRA / blocks) trained with the diffusion loss on plain captions.

    ``train_decoder``: "none" (connector only), "lora" (adapters of ``lora_rank`` on the UNet attention
    projections) or "blocks" (the UNet submodules named in ``unfreeze_blocks``, e.g. "mid_block",
    "up_blocks.1", trained in full; they stay in eval mode, the tiny and SD UNets have no dropout).
    ``caption_dropout`` replaces that share of captions with "" so the empty plain prompt learns to be the
    unconditional input for classifier-free guidance.
    """

    def __init__(self, model, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0, max_steps: int,
                 train_decoder: str = "none", lora_rank: int = 8, unfreeze_blocks: Sequence[str] = ("mid_block",),
                 caption_dropout: float = 0.0, seed: int = 0):
        super().__init__()
        if train_decoder not in DECODER_MODES:
            raise ValueError(f"train_decoder={train_decoder!r} is not one of {', '.join(DECODER_MODES)}")
        if max_steps < 1 or warmup_steps < 0 or not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"need max_steps >= 1, warmup_steps >= 0, 0 <= caption_dropout < 1; got "
                             f"{max_steps}, {warmup_steps}, {caption_dropout}")
        unfreeze_blocks = [str(b) for b in unfreeze_blocks]
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(dict(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                       max_steps=max_steps, train_decoder=train_decoder, lora_rank=lora_rank,
                                       unfreeze_blocks=unfreeze_blocks, caption_dropout=caption_dropout, seed=seed))
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps, self.max_steps = lr, weight_decay, warmup_steps, max_steps
        self.train_decoder, self.lora_rank, self.unfreeze_blocks = train_decoder, lora_rank, unfreeze_blocks
        self.caption_dropout, self.seed = caption_dropout, seed
        self.strict_loading = False  # checkpoints hold the allow-list only

        model.requires_grad_(False)
        model.freeze_connector(False)
        unet = model.decoder.unet
        self.lora: dict[str, nn.Module] = {}
        if train_decoder == "lora":
            self.lora = add_lora(unet, lora_rank, seed=seed)
        elif train_decoder == "blocks":
            children = [n for n, _ in unet.named_children()]
            for block in unfreeze_blocks:
                try:
                    unet.get_submodule(block).requires_grad_(True)
                except AttributeError:
                    raise ValueError(f"unfreeze_blocks: the UNet has no submodule {block!r} "
                                     f"(top level: {', '.join(children)})") from None
        self.trainable_names: tuple[str, ...] = tuple(n for n, p in self.named_parameters() if p.requires_grad)
        expected = {f"model.connector.{n}" for n, _ in model.connector.named_parameters()}
        if not expected <= set(self.trainable_names):
            raise RuntimeError("connector parameters missing from the allow-list")

    # ---- steps ---------------------------------------------------------------------------------------
    def generator(self, batch_idx: int = 0) -> torch.Generator:
        """CPU generator seeded from (seed, global step, rank, micro-batch): same noise on any device/resume."""
        trainer = self._trainer
        micro = batch_idx % trainer.accumulate_grad_batches if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        digest = hashlib.sha256(f"align/{self.seed}/{self.global_step}/{rank}/{micro}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def shared_step(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        captions = list(batch["captions"])
        if self.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=generator) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids, mask = self.model.encode_batch(captions, mode="plain")
        latents = batch.get("latents")  # precomputed, or the VAE posterior mean here (no grad)
        if latents is None:
            latents = self.model.decoder.encode_images(batch["pixels"])
        return self.model.diffusion_loss(ids, mask, latents, generator=generator)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.shared_step(batch, self.generator(batch_idx))
        self.log("train/diffusion", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def configure_optimizers(self):
        named = dict(self.named_parameters())
        params = [named[n] for n in self.trainable_names]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay: biases, norms
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        schedule = functools.partial(warmup_cosine, total=self.max_steps, ramp=self.warmup_steps,
                                     delay=self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_names)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint, self.trainer.ckpt_path if self._trainer is not None else "checkpoint")

    def check_checkpoint(self, checkpoint: dict, path) -> None:
        # strict_loading is off for the frozen weights, not for what we train
        check_trainable_state(self, checkpoint["state_dict"], self.trainable_names, path)

    # ---- outputs -------------------------------------------------------------------------------------
    def save_connector(self, path: str | os.PathLike) -> Path:
        """Write the connector (+ ``*.decoder.safetensors`` if the decoder trained); only global rank 0 writes."""
        path = Path(path)
        if self._trainer is not None and self.trainer.global_rank != 0:
            return path
        fps = self.model.fingerprints
        meta = {"backbone_fingerprint": fps["backbone"], "decoder_fingerprint": fps["decoder"],
                "unipers_version": __version__, "stage": "align", "steps": str(self.global_step),
                "train_decoder": self.train_decoder}
        with atomic_file(path, suffix=".safetensors.tmp") as tmp:
            self.model.connector.save(tmp, meta)
        if self.train_decoder != "none":
            self.save_decoder_delta(decoder_delta_path(path), meta)
        return path

    def save_decoder_delta(self, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
        """Only the trained decoder tensors, keyed by their path in the stock decoder."""
        meta = {**metadata, "unipers.format": DELTA_FORMAT, "kind": self.train_decoder}
        if self.train_decoder == "lora":
            meta["lora_rank"] = str(self.lora_rank)
            tensors = {}
            for name, layer in self.lora.items():
                tensors[f"unet.{name}.lora_A"], tensors[f"unet.{name}.lora_B"], scale = lora_factors(layer)
                meta[f"scale.unet.{name}"] = repr(scale)
        else:
            meta["blocks"] = json.dumps(list(self.unfreeze_blocks))  # applying checks it holds exactly these
            prefix = "model.decoder."
            named = dict(self.named_parameters())
            tensors = {n[len(prefix):]: named[n] for n in self.trainable_names if n.startswith(prefix)}
        return save_safetensors_atomic(tensors, path, metadata=meta)
