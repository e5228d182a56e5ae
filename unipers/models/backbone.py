"""ARBackbone: a frozen transformers Chameleon (Chameleon-7B/30B, Anole-7B layouts) with a ConceptBank spliced in.

The HF model is never modified: concept ids (>= V) are embedded by the bank before ``model.model`` runs on
``inputs_embeds``, and concept logits are appended to the frozen ``lm_head``'s. Logits are computed only
where a loss needs them, never for the whole (B, L, 65536) block.

Facts about transformers' Chameleon that this relies on: ``model.model(...).last_hidden_state`` is already normed; the stock
``forward`` sets every image-token logit to the dtype minimum, so the image-token loss computes its own
logits from hidden states; the VQ model has an encoder only, so image tokens come from
``get_image_tokens`` and are cached per image.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Hashable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unipers.concepts.bank import GROUPS, ConceptBank, ConceptInfo, SlotLayout
from unipers.models.fingerprint import config_fields, fingerprint

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_ENV = "UNIPERS_CPU_BF16"
"""1 keeps a config's bfloat16 on a CPU, 0 loads float32 instead; unset, `cpu_bf16_supported` decides."""


def cpu_bf16_supported() -> bool:
    """Whether this process's CPU kernels run bfloat16 natively: AVX512-BF16 or AMX on x86 (and ATen
    dispatching at AVX-512, not at AVX2 as ``ATEN_CPU_CAPABILITY=avx2`` forces), or what oneDNN counts
    as bf16 support on other CPUs. Without them every bf16 op converts element by element."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("DEFAULT", "NO AVX", "AVX2"):
        return False
    if capability.startswith("AVX512"):
        return any(bool(getattr(torch.cpu, probe, lambda: False)())
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def runs_on_cpu() -> bool:
    """Models built here run on the CPU: no CUDA device. (An explicit ``--device cpu`` on a GPU machine
    is not known when the weights load, and keeps the config's dtype.)"""
    return not torch.cuda.is_available()


def load_dtypes(requested: dict[str, str]) -> dict[str, str]:
    """The dtypes to load with, for config keys (``{"backbone.dtype": "bfloat16", ...}``).

    bfloat16 on a CPU without bf16 kernels loads as float32, with one line on stderr saying so. Not a
    refusal: emulated bf16 is about a hundred times slower (45 minutes per 512 px VQ encode), so float32
    is the only useful choice there, and the shipped real-checkpoint configs ask for bf16; refusing would
    make every CPU user add the same two overrides. float32 keeps the fingerprints (sampled at bf16), so
    concept files and connectors load either way; the cost, twice the weights' memory, is in the line.
    ``UNIPERS_CPU_BF16=1`` keeps bf16 (a CPU the check misjudges), ``=0`` always falls back."""
    import os
    import sys

    wanted = [k for k, v in requested.items() if v == "bfloat16"]
    if not wanted or not runs_on_cpu():
        return dict(requested)
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override not in ("", "0", "1"):
        from unipers.schema import ConfigError

        raise ConfigError(f"{CPU_BF16_ENV}={override!r}: use 1 (keep bfloat16 on the CPU) or 0 (load float32)")
    if override == "1" or (override == "" and cpu_bf16_supported()):
        return dict(requested)
    print(f"unipers: {' and '.join(k + '=bfloat16' for k in wanted)} load as float32: this CPU has no bfloat16 "
          f"kernels (emulated bf16 is ~100x slower; float32 takes twice the memory); {CPU_BF16_ENV}=1 keeps "
          "bfloat16", file=sys.stderr, flush=True)
    return {k: "float32" if k in wanted else v for k, v in requested.items()}


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that skip padding, so a left- or right-padded row matches the same row unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ARBackbone(nn.Module):
    def __init__(self, model: nn.Module, processor, bank: ConceptBank, base_fingerprint: str):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.bank = bank
        self.base_fingerprint = base_fingerprint
        mapping = model.model.vocabulary_mapping
        self.register_buffer("image_token_ids", torch.tensor(mapping.image_tokens, dtype=torch.long), persistent=False)
        self.boi_id = processor.image_start_token_id
        self.eoi_id = processor.image_end_token_id
        self.image_seq_length = processor.image_seq_length
        self._image_cache: dict[Hashable, Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "float32", attn_implementation: str = "sdpa",
                        layout: SlotLayout = SlotLayout(), head_rows: str = "identifier",
                        gradient_checkpointing: bool = False) -> "ARBackbone":
        """Load a local HF Chameleon folder (weights + processor). Never contacts a hub; no remote code."""
        from transformers import AutoProcessor, ChameleonForConditionalGeneration

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        model = ChameleonForConditionalGeneration.from_pretrained(
            path, dtype=DTYPES[dtype], attn_implementation=attn_implementation, local_files_only=True
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if processor.tokenizer.sep_token is None:
            # ChameleonProcessor appends sep_token to every prompt: None would add the text "None".
            raise ValueError(f"{path}: the tokenizer has no sep_token (Chameleon uses <reserved08706>)")
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base_fp = fingerprint(model, config_fields(model.config))
        bank = ConceptBank(model.config.vocab_size, model.config.hidden_size, layout, head_rows)
        return cls(model, processor, bank, base_fp)

    # Lightning switches every submodule to train mode; the frozen base must stay in eval (dropout off).
    # HF checkpoints a layer only while that layer is training, so with gradient checkpointing on, the
    # decoder layers' own flag follows `mode`; their children (attention dropout) stay in eval.
    def train(self, mode: bool = True) -> "ARBackbone":
        super().train(mode)
        self.model.eval()
        if getattr(self.model, "is_activation_checkpointing", False):
            from transformers.modeling_layers import GradientCheckpointingLayer

            for module in self.model.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = mode
        return self

    @property
    def vocab_size(self) -> int:
        return self.bank.base_vocab_size

    @property
    def hidden_size(self) -> int:
        return self.bank.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def vocabulary(self) -> set[str]:
        return set(self.tokenizer.get_vocab())

    # ---- concepts ---------------------------------------------------------------------------------------
    def add_concept(self, name: str, class_word: Optional[str] = None, *, init: str = "class_word",
                    init_noise: float = 0.01, seed: int = 0, layout: Optional[SlotLayout] = None) -> ConceptInfo:
        """Add a concept whose rows start at the class word's mean embedding, or at random at table scale."""
        layout = layout or self.bank.layout
        embed_init, head_init = self.initial_rows(name, class_word, init=init, init_noise=init_noise, seed=seed,
                                                  layout=layout)
        return self.bank.add(name, class_word=class_word, layout=layout, vocabulary=self.vocabulary,
                             embed_init=embed_init, head_init=head_init)

    def initial_rows(self, name: str, class_word: Optional[str] = None, *, init: str = "class_word",
                     init_noise: float = 0.01, seed: int = 0, layout: Optional[SlotLayout] = None
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The rows a concept starts training from, (embedding, head) by slot group: a function of the
        base, the name, the class word and the seed only."""
        layout = layout or self.bank.layout
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        word_ids: list[int] = []
        if init == "class_word" and class_word:
            word_ids = self.tokenizer(class_word, add_special_tokens=False).input_ids
            if not word_ids:
                raise ValueError(f"class word {class_word!r} has no tokens in this vocabulary")
        elif init not in ("class_word", "random"):
            raise ValueError(f"init={init!r} is not one of class_word, random")

        def rows(weight: Tensor) -> dict[str, Tensor]:
            # One pass over the table (1 GB in fp32 at 7B), then cheap draws per group.
            table = weight.detach()
            if word_ids:
                center = table[word_ids].float().mean(0).cpu()
                scale = table.float().std().cpu() * init_noise
            else:
                center, scale = table.float().mean(0).cpu(), table.float().std(0).cpu()
            return {g: center + torch.randn(layout.count(g), table.shape[1], generator=gen) * scale
                    for g in GROUPS if layout.count(g)}

        return rows(self.model.get_input_embeddings().weight), rows(self.model.lm_head.weight)

    # ---- forward pieces ---------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        return self.bank.embed(ids, self.model.get_input_embeddings())

    def hidden_states(self, ids: Tensor, attention_mask: Optional[Tensor] = None, *, cache=None,
                      position_ids: Optional[Tensor] = None) -> tuple[Tensor, object]:
        """Final (normed) hidden states (B, L, H), and the KV cache when one is passed in.

        With a cache, `attention_mask` covers past and new tokens; positions are derived from it.
        """
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long, device=ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -ids.shape[1]:]
        out = self.model.model(
            inputs_embeds=self.embed(ids), attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state, out.cache

    def logits(self, hidden: Tensor, presence: Tensor, text_only: bool = True) -> Tensor:
        """Logits for `hidden` (..., H): the base vocabulary, then the tokens of the concepts `presence`
        names (their ids: ``bank.columns(presence)``; `to_ids` / `to_columns` convert).

        text_only=True reproduces the stock model (image tokens at the dtype minimum); False leaves them.
        """
        base = self.model.lm_head(hidden)
        if text_only:
            base = base.index_fill(-1, self.image_token_ids, torch.finfo(base.dtype).min)
        if len(self.bank) == 0 or not bool(presence.any()):
            return base
        return torch.cat([base, self.bank.head_logits(hidden, presence)], -1)

    def to_ids(self, columns: Tensor, presence: Tensor) -> Tensor:
        """Token ids of `logits` columns (e.g. an argmax)."""
        concept = self.bank.columns(presence)
        if not concept.numel():
            return columns
        vocab = self.vocab_size
        return torch.where(columns >= vocab, concept[(columns - vocab).clamp(min=0, max=len(concept) - 1)], columns)

    def to_columns(self, ids: Tensor, presence: Tensor) -> Tensor:
        """`logits` columns of token ids (e.g. targets); a concept token whose concept `presence` does not
        name has no column, and is an error."""
        is_concept = ids >= self.vocab_size
        if not bool(is_concept.any()):
            return ids
        concept = self.bank.columns(presence)
        index = torch.searchsorted(concept, ids[is_concept]).clamp(max=max(len(concept) - 1, 0))
        if not concept.numel() or not bool((concept[index] == ids[is_concept]).all()):
            raise ValueError("a target is a token of a concept the sequence does not name")
        return ids.masked_scatter(is_concept, index + self.vocab_size)

    # ---- the recognition decision: one place for training, inference and eval --------------------------
    @property
    def yes_no_ids(self) -> tuple[int, int]:
        """Token ids of "Yes" and "No", the first token of a recognition answer."""
        if getattr(self, "_yes_no_ids", None) is None:
            self._yes_no_ids = tuple(self.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
        return self._yes_no_ids

    def says_yes(self, logits: Tensor) -> Tensor:
        """The decision, from the logits (..., V) of an answer's first token: "Yes" outscores "No"."""
        yes, no = self.yes_no_ids
        return logits[..., yes] > logits[..., no]

    def yes_probability(self, logits: Tensor) -> Tensor:
        """P(yes) from the same logits: a softmax over "Yes" and "No" alone (> 0.5 exactly where `says_yes`)."""
        yes, no = self.yes_no_ids
        return torch.softmax(logits[..., [yes, no]].float(), -1)[..., 0]

    def full_logits(self, ids: Tensor, attention_mask: Optional[Tensor] = None, text_only: bool = True) -> Tensor:
        """(B, L, V + every concept token) logits, the dtype minimum for concepts a row does not name: the
        layout of an exported checkpoint's vocabulary, for tests, export checks and small-scale inspection."""
        hidden, _ = self.hidden_states(ids, attention_mask)
        presence = self.bank.presence(ids)[:, None, :]
        logits = self.logits(hidden, presence, text_only=text_only)
        if len(self.bank) == 0:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size + self.bank.num_tokens), torch.finfo(logits.dtype).min)
        full[..., : self.vocab_size] = logits[..., : self.vocab_size]
        full[..., self.bank.columns(presence)] = logits[..., self.vocab_size:]
        return full

    def _selected(self, ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor):
        hidden, _ = self.hidden_states(ids, attention_mask)
        targets = labels[:, 1:]
        sel = targets != IGNORE_INDEX
        rows = sel.nonzero(as_tuple=True)[0]
        return hidden[:, :-1][sel], self.bank.presence(ids)[rows], targets[sel]

    def understanding_loss(self, ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                           reduction: str = "mean") -> Tensor:
        """Next-token NLL on labelled (answer) positions only; logits computed at those positions alone."""
        hidden, presence, targets = self._selected(ids, attention_mask, labels)
        if targets.numel() == 0:
            return hidden.sum() * 0.0
        logits = self.logits(hidden, presence, text_only=True).float()
        return F.cross_entropy(logits, self.to_columns(targets, presence), reduction=reduction)

    def image_token_loss(self, ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                         reduction: str = "mean") -> Tensor:
        """NLL of image tokens over the image-token vocabulary, from hidden states (no stock mask)."""
        hidden, _, targets = self._selected(ids, attention_mask, labels)
        if targets.numel() == 0:
            return hidden.sum() * 0.0
        weight = self.model.lm_head.weight[self.image_token_ids]
        index = torch.searchsorted(self.image_token_ids, targets)
        if not bool((self.image_token_ids[index.clamp(max=len(self.image_token_ids) - 1)] == targets).all()):
            raise ValueError("image_token_loss: a labelled position is not an image token")
        return F.cross_entropy((hidden @ weight.T).float(), index, reduction=reduction)

    @torch.no_grad()
    def generate(self, ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Tensor:
        """Continue left-padded prompts (B, L): greedy at temperature 0, else nucleus sampling.

        Returns the new tokens (B, <= max_new_tokens), `pad_token_id` after a row stopped. Concept logits
        follow the prompt's concepts (presence comes from the prompt, not the newest token).
        """
        from transformers import DynamicCache

        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        presence = self.bank.presence(ids)
        stop = torch.tensor(sorted(set(stop_ids) | {self.tokenizer.eos_token_id}), device=ids.device)
        pad = self.tokenizer.pad_token_id
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache = DynamicCache(config=self.model.config) if use_cache else None
        seq, mask, out = ids, attention_mask, []
        step_ids = ids
        for _ in range(max_new_tokens):
            if use_cache:
                hidden, cache = self.hidden_states(step_ids, mask, cache=cache)
            else:
                hidden, _ = self.hidden_states(seq, mask)
            logits = self.logits(hidden[:, -1], presence).float()
            nxt = self.to_ids(_pick(logits, temperature, top_p, generator), presence)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stop)
            step_ids = nxt[:, None]
            seq = torch.cat([seq, step_ids], 1)
            mask = torch.cat([mask, (~done | torch.isin(nxt, stop)).long()[:, None]], 1)
            if bool(done.all()):
                break
        return torch.stack(out, 1) if out else ids.new_zeros(ids.shape[0], 0)

    # ---- images -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """VQ-encode (B, 3, H, W) processor-normalised pixels into image token ids (B, image_seq_length)."""
        dtype = self.model.model.vqmodel.quant_conv.weight.dtype
        return self.model.model.get_image_tokens(pixel_values.to(self.device, dtype)).long()

    def image_tokens(self, pixel_values: Tensor, keys: Iterable[Hashable]) -> Tensor:
        """`encode_images` with a per-image cache keyed by the caller (e.g. file path + content hash)."""
        keys = list(keys)
        missing = [i for i, k in enumerate(keys) if k not in self._image_cache]
        if missing:
            fresh = self.encode_images(pixel_values[missing]).cpu()
            for i, row in zip(missing, fresh):
                self._image_cache[keys[i]] = row
        return torch.stack([self._image_cache[k] for k in keys]).to(self.device)

    def image_segment(self, tokens: Tensor) -> list[int]:
        """One image as it sits in a sequence: begin-image, its tokens, end-image."""
        return [self.boi_id, *tokens.tolist(), self.eoi_id]


def _pick(logits: Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> Tensor:
    """Greedy (temperature 0) or nucleus sampling over (B, V) logits."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
