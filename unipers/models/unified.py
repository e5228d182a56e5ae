"""UnifiedModel: backbone + connector + decoder around one ConceptBank.

    model = UnifiedModel.from_config(load_config(["personalize"]))      # or .from_pretrained(dirs...)
    model.add_concept("bo", "dog")
    ids, mask = model.encode_batch(["A photo of <bo> on a beach."], mode="gen")
    loss = model.diffusion_loss(ids, mask, latents)

Understanding goes through the backbone's spliced head; generation runs the generation prompt through the
frozen backbone, takes its last hidden states, maps them through the connector and conditions the frozen
decoder. The concept rows are the only trainable tensors while personalizing (the connector trains only in
the align stage), so both losses shape the same rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from unipers.concepts.bank import SlotLayout
from unipers.concepts.io import ConceptFileError, load_concepts, read_metadata, save_concepts
from unipers.concepts.prompts import PromptBuilder
from unipers.models.backbone import ARBackbone
from unipers.models.connector import Conditioning, Connector, ConnectorFileError, read_connector_metadata
from unipers.models.decoder import DiffusionDecoder
from unipers.models.fingerprint import config_fields, fingerprint
from unipers.models.padding import pad_batch


@torch.no_grad()
def describe_images(backbone: ARBackbone, prompts: PromptBuilder, images: Sequence[Tensor],
                    batch_size: int = 32) -> list[list[int]]:
    """The base's greedy answer to the describe question (``backbone.describe_first``) about each image
    (VQ tokens), with no concept in context: ids without the end-of-turn token. See
    `PromptBuilder.encode_described_qa`."""
    out = []
    eos, pad = backbone.tokenizer.eos_token_id, backbone.tokenizer.pad_token_id
    for i in range(0, len(images), batch_size):
        seqs = [prompts.describe_prompt(t) for t in images[i:i + batch_size]]
        ids, mask = pad_batch(seqs, pad, side="left")
        new = backbone.generate(ids.to(backbone.device), mask.to(backbone.device), max_new_tokens=prompts.describe_tokens)
        for row in new.cpu().tolist():
            out.append(row[: row.index(eos)] if eos in row else row)  # pads only follow an end-of-turn
    return out


class UnifiedModel(nn.Module):
    def __init__(self, backbone: ARBackbone, connector: Connector, decoder: DiffusionDecoder, *,
                 describe_first: Optional[str] = None, describe_tokens: int = 16):
        super().__init__()
        self.backbone = backbone
        self.connector = connector
        self.decoder = decoder
        self.prompts = PromptBuilder.for_backbone(backbone, describe_question=describe_first,
                                                  describe_tokens=describe_tokens)
        self.decoder_fingerprint = fingerprint(decoder, config_fields(decoder.unet.config))

    @classmethod
    def from_pretrained(cls, backbone: str | os.PathLike, decoder: str | os.PathLike,
                        connector: str | os.PathLike | None = None, *, layout: SlotLayout = SlotLayout(),
                        head_rows: str = "identifier", dtype: str = "float32",
                        describe_first: Optional[str] = None) -> "UnifiedModel":
        """Local folders (or "tiny"), like ``from_config`` with those values; `connector` is an aligned
        connector file (its decoder delta, if any, is applied), None for a fresh one.

            model = UnifiedModel.from_pretrained("checkpoints/anole-7b", "checkpoints/sd15",
                                                 "aligned/connector.safetensors", dtype="bfloat16")
        """
        from dataclasses import replace

        from unipers.config import Config

        cfg = Config()
        cfg.backbone = replace(cfg.backbone, path=str(backbone), dtype=dtype, describe_first=describe_first)
        cfg.decoder = replace(cfg.decoder, path=str(decoder), dtype=dtype)
        cfg.connector = replace(cfg.connector, path=None if connector is None else str(connector))
        cfg.bank = replace(cfg.bank, num_shared=layout.num_shared, num_und=layout.num_und, num_gen=layout.num_gen,
                           head_rows=head_rows)
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg) -> "UnifiedModel":
        """Build from a `unipers.config.Config`: local folders only ("tiny" = embedded preset)."""
        from unipers.models.backbone import DTYPES, load_dtypes
        from unipers.models.tiny import resolve_path

        # bfloat16 on a CPU without bf16 kernels loads as float32 (load_dtypes says why, and prints it).
        dtypes = load_dtypes({"backbone.dtype": cfg.backbone.dtype, "decoder.dtype": cfg.decoder.dtype})
        layout = SlotLayout(cfg.bank.num_shared, cfg.bank.num_und, cfg.bank.num_gen)
        backbone = ARBackbone.from_pretrained(
            resolve_path(cfg.backbone.path, "backbone"), dtype=dtypes["backbone.dtype"],
            attn_implementation=cfg.backbone.attn_implementation, layout=layout, head_rows=cfg.bank.head_rows,
            gradient_checkpointing=cfg.backbone.gradient_checkpointing,
        )
        decoder = DiffusionDecoder.from_pretrained(
            resolve_path(cfg.decoder.path, "decoder"), dtype=DTYPES[dtypes["decoder.dtype"]],
            attention=cfg.decoder.attention, gradient_checkpointing=cfg.decoder.gradient_checkpointing,
        )
        c = cfg.connector
        if c.path:
            connector = Connector.load(c.path)
        else:
            # An unaligned connector is a fixed function of its config (seed 0, whatever the run's seed):
            # every rank, every resume and every later inference session builds the same one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                connector = Connector(c.kind, in_dim=backbone.hidden_size, out_dim=decoder.cross_attention_dim,
                                      pooled_dim=decoder.pooled_dim, num_queries=c.num_queries,
                                      num_layers=c.num_layers, num_heads=c.num_heads)
        model = cls(backbone, connector, decoder, describe_first=cfg.backbone.describe_first,
                    describe_tokens=cfg.backbone.describe_tokens)
        if c.path:
            model.check_connector(c.path)
            model.apply_aligned_decoder(c.path)
        model.freeze_connector()
        return model

    def apply_aligned_decoder(self, connector_path: str | os.PathLike) -> None:
        """If align also trained the decoder, its delta sits beside the connector: apply it. The decoder's
        fingerprint then names the aligned decoder, so concept files record which one they were made with."""
        from unipers.models.decoder_delta import apply_decoder_delta, decoder_delta_path

        delta = decoder_delta_path(connector_path)
        if delta.is_file():
            apply_decoder_delta(self.decoder, delta)
            self.decoder_fingerprint = fingerprint(self.decoder, config_fields(self.decoder.unet.config))

    # ---- identity ---------------------------------------------------------------------------------------
    @property
    def fingerprints(self) -> dict[str, str]:
        return {"backbone": self.backbone.base_fingerprint, "decoder": self.decoder_fingerprint}

    def check_connector(self, path: str | os.PathLike) -> None:
        """Refuse a connector aligned for another backbone/decoder pair, naming both fingerprints."""
        meta = read_connector_metadata(path)
        for kind, ours in self.fingerprints.items():
            theirs = meta.get(f"{kind}_fingerprint")
            if theirs is not None and theirs != ours:
                raise ConnectorFileError(f"{path}: connector aligned for {kind} {theirs}, but the loaded {kind} is {ours}")

    def freeze_connector(self, frozen: bool = True) -> None:
        self.connector.requires_grad_(not frozen)

    @property
    def bank(self):
        return self.backbone.bank

    # ---- concepts ---------------------------------------------------------------------------------------
    def add_concept(self, name: str, class_word: Optional[str] = None, **kwargs):
        return self.backbone.add_concept(name, class_word, **kwargs)

    def load_concepts(self, path: str | os.PathLike, names: Optional[Iterable[str]] = None) -> list[str]:
        """Add a concept file's concepts; refused (naming both sides) if trained on another backbone,
        decoder or connector: the rows only mean something to the models that shaped them."""
        meta = read_metadata(path)
        for kind, ours in (("decoder", self.decoder_fingerprint), ("connector", self.connector_fingerprint)):
            theirs = meta.get(f"{kind}_fingerprint")
            if theirs is not None and theirs != ours:
                raise ConceptFileError(f"{path}: trained with {kind} {theirs}, but the loaded {kind} is {ours}")
        theirs, ours = meta.get("describe_first"), self.prompts.describe_question or ""
        if theirs is not None and theirs != ours:  # the rows learned to sit beside (or without) a description
            raise ConceptFileError(f"{path}: trained with backbone.describe_first={theirs or None!r}, but this "
                                   f"model asks with {ours or None!r}; set backbone.describe_first to match")
        return load_concepts(self.bank, path, base_fingerprint=self.backbone.base_fingerprint,
                             vocabulary=self.backbone.vocabulary, names=names)

    def save_concepts(self, path: str | os.PathLike, names: Optional[Iterable[str]] = None,
                      extra: Optional[dict[str, str]] = None) -> Path:
        extra = {"decoder_fingerprint": self.decoder_fingerprint, "connector_fingerprint": self.connector_fingerprint,
                 "describe_first": self.prompts.describe_question or "", **(extra or {})}
        return save_concepts(self.bank, path, base_fingerprint=self.backbone.base_fingerprint, names=names, extra=extra)

    @property
    def connector_fingerprint(self) -> str:
        return fingerprint(self.connector, self.connector.config)

    # ---- batches ----------------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], *, mode: str = "gen", gen_slots: Optional[Sequence[Optional[int]]] = None,
                     images: Optional[Sequence[Sequence[Tensor]]] = None) -> tuple[Tensor, Tensor]:
        """Encode and right-pad prompts: (ids, attention_mask) on the backbone's device."""
        gen_slots = list(gen_slots) if gen_slots is not None else [None] * len(texts)
        images = list(images) if images is not None else [()] * len(texts)
        seqs = [self.prompts.encode(t, mode=mode, gen_slots=k, images=im) for t, k, im in zip(texts, gen_slots, images)]
        ids, mask = pad_batch(seqs, self.backbone.tokenizer.pad_token_id)
        return ids.to(self.backbone.device), mask.to(self.backbone.device)

    def describe(self, images: Sequence[Tensor], batch_size: int = 32) -> list[list[int]]:
        """The base's description of each image (`describe_images`)."""
        return describe_images(self.backbone, self.prompts, images, batch_size)

    # ---- the two paths ----------------------------------------------------------------------------------
    def condition(self, ids: Tensor, attention_mask: Tensor) -> Conditioning:
        """Generation prompt -> decoder conditioning (backbone hidden states through the connector)."""
        hidden, _ = self.backbone.hidden_states(ids, attention_mask)
        return self.connector(hidden.to(next(self.connector.parameters()).dtype), attention_mask.bool())

    def encode_prompt(self, prompts: Sequence[str], negative: str = "", *, mode: str = "gen",
                      images: Optional[Sequence[Sequence[Tensor]]] = None) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for classifier-free guidance: the prompts' conditioning, and the `negative` prompt's
        (one per prompt; "" is the unconditional input the align stage trains). `images` (VQ tokens per
        prompt) go into the prompts only."""
        cond = self.condition(*self.encode_batch(prompts, mode=mode, images=images))
        uncond = self.condition(*self.encode_batch([negative] * len(prompts), mode=mode))
        return cond, uncond

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], *, negative: str = "", mode: str = "gen",
                        images: Optional[Sequence[Sequence[Tensor]]] = None, steps: int = 25, guidance: float = 5.0,
                        size: Optional[int] = None, scheduler: Optional[str] = None,
                        batched_cfg: bool = True) -> Tensor:
        """Images (N, 3, H, W) in [0, 1], one per prompt, image i drawn from ``seeds[i]``: a batch gives the
        same images as one call per prompt."""
        cond, uncond = self.encode_prompt(prompts, negative, mode=mode, images=images)
        return self.decoder.sample(cond, uncond, num_steps=steps, guidance=guidance, height=size, width=size,
                                   scheduler=scheduler, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                   batched_cfg=batched_cfg)

    def diffusion_loss(self, ids: Tensor, attention_mask: Tensor, latents: Tensor, generator=None,
                       reduction: str = "mean") -> Tensor:
        """Denoising loss of `latents` conditioned on the prompts; `generator` may be one per sample."""
        return self.decoder.loss(latents, self.condition(ids, attention_mask), generator=generator,
                                 reduction=reduction)

    def understanding_loss(self, ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.backbone.understanding_loss(ids, attention_mask, labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The optimizer's allow-list: parameters flagged trainable, and nothing else."""
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        """One line, as peft prints it: trainable parameters (the concept rows), all parameters, the share."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def train(self, mode: bool = True) -> "UnifiedModel":
        super().train(mode)
        self.decoder.eval()  # frozen parts stay in eval under Lightning
        return self
