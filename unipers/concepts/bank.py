"""ConceptBank: the trainable concept rows shared by the AR backbone and, through it, the diffusion decoder.

Each concept has an identifier token (``<bo>``) and latent slots in three groups: *shared* (in both
understanding and generation prompts), *und* (understanding only) and *gen* (generation only). Concepts get
token ids after the base vocabulary (``id >= V``), in the order they were added.

Two facts (measured on this stack) shape this file:
- Rows live in their own small parameters, spliced in front of the frozen embedding table and appended to
  the frozen lm_head, so no gradient or optimizer state is ever allocated for the base vocabulary.
- Every (concept, group) is its own Parameter and only groups whose tokens occur in a batch enter the
  graph. With ``zero_grad(set_to_none=True)`` their ``.grad`` stays None, so AdamW (weight decay and
  momentum included) skips them: a concept absent from a batch stays bit-identical.
- Only the concepts a prompt names cost anything: embedding looks up the concepts whose ids occur, and the
  head adds columns for the concepts present in the batch alone (`columns`). A prompt's outputs are then
  bit-identical whatever else is loaded, and 1,000 loaded concepts cost what one does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from unipers.concepts.names import validate_name

GROUPS = ("identifier", "shared", "und", "gen")
HEAD_GROUPS = {"none": (), "identifier": ("identifier",), "all": GROUPS}
MAX_SLOTS = 1024
"""The most slots one group may have. Real layouts use 4 to 16; the bound lets a concept file's layout be
refused before rows are allocated for it (a layout of a billion slots would ask for hundreds of GB)."""


@dataclass(frozen=True)
class SlotLayout:
    """How many latent slots of each group a concept has (the identifier is always one token); each
    count is a whole number from 0 to ``MAX_SLOTS``."""

    num_shared: int = 8
    num_und: int = 4
    num_gen: int = 4

    def __post_init__(self) -> None:
        for key, value in (("num_shared", self.num_shared), ("num_und", self.num_und), ("num_gen", self.num_gen)):
            if type(value) is not int or not 0 <= value <= MAX_SLOTS:
                raise ValueError(f"SlotLayout.{key} must be a whole number from 0 to {MAX_SLOTS}, got {value!r}")

    def count(self, group: str) -> int:
        return {"identifier": 1, "shared": self.num_shared, "und": self.num_und, "gen": self.num_gen}[group]

    @property
    def total(self) -> int:
        return 1 + self.num_shared + self.num_und + self.num_gen

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ConceptInfo:
    """What the bank knows about one concept besides its rows."""

    name: str
    class_word: Optional[str]
    layout: SlotLayout
    head_groups: tuple[str, ...]
    first_id: int  # token id of the identifier; groups follow in GROUPS order

    def span(self, group: str) -> tuple[int, int]:
        start = self.first_id
        for g in GROUPS:
            n = self.layout.count(g)
            if g == group:
                return start, start + n
            start += n
        raise KeyError(group)

    def token_ids(self, group: str) -> list[int]:
        return list(range(*self.span(group)))

    @property
    def end_id(self) -> int:
        return self.first_id + self.layout.total


class ConceptRows(nn.Module):
    """One concept: an embedding Parameter per non-empty group, and head Parameters for `head_groups`."""

    def __init__(self, layout: SlotLayout, hidden_size: int, head_groups: Iterable[str]):
        super().__init__()
        self.embed = nn.ParameterDict(
            {g: nn.Parameter(torch.zeros(layout.count(g), hidden_size)) for g in GROUPS if layout.count(g)}
        )
        self.head = nn.ParameterDict(
            {g: nn.Parameter(torch.zeros(layout.count(g), hidden_size)) for g in head_groups if layout.count(g)}
        )


class ConceptBank(nn.Module):
    """Trainable rows for any number of concepts, addressed by token ids ``>= base_vocab_size``.

    The bank knows nothing about tokenizers or checkpoints: `ARBackbone.add_concept` computes the initial
    rows from the base model, and `unipers.concepts.io` saves and loads them.
    """

    def __init__(self, base_vocab_size: int, hidden_size: int, layout: SlotLayout = SlotLayout(),
                 head_rows: str = "identifier"):
        super().__init__()
        if head_rows not in HEAD_GROUPS:
            raise ValueError(f"head_rows={head_rows!r} is not one of {', '.join(HEAD_GROUPS)}")
        self.base_vocab_size = base_vocab_size
        self.hidden_size = hidden_size
        self.layout = layout
        self.head_rows = head_rows
        self.rows = nn.ModuleDict()
        self.info: dict[str, ConceptInfo] = {}
        self._index: dict = {}  # what `num_tokens` and `concept_index` derive from `info`; emptied on change

    # ---- membership -------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.info)

    @property
    def num_tokens(self) -> int:
        """Concept tokens after the base vocabulary (the full vocabulary is base_vocab_size + num_tokens)."""
        if "num_tokens" not in self._index:  # read on every forward: a sum over 1,000 concepts is not free
            self._index["num_tokens"] = sum(i.layout.total for i in self.info.values())
        return self._index["num_tokens"]

    def __len__(self) -> int:
        return len(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def add(self, name: str, *, class_word: Optional[str] = None, layout: Optional[SlotLayout] = None,
            head_groups: Optional[Iterable[str]] = None, vocabulary: Iterable[str] = (),
            embed_init: Optional[dict[str, Tensor]] = None, head_init: Optional[dict[str, Tensor]] = None) -> ConceptInfo:
        """Add a concept with zero rows, or rows copied from `embed_init` / `head_init` (group -> rows of
        exactly the group's shape, (slots, hidden_size); groups the concept lacks are skipped)."""
        validate_name(name, vocabulary=vocabulary, taken=self.info)
        layout = layout or self.layout
        head_groups = tuple(HEAD_GROUPS[self.head_rows] if head_groups is None else head_groups)
        info = ConceptInfo(name, class_word, layout, head_groups, self.base_vocab_size + self.num_tokens)
        rows = ConceptRows(layout, self.hidden_size, head_groups)
        with torch.no_grad():
            for table, init in ((rows.embed, embed_init or {}), (rows.head, head_init or {})):
                for group, value in init.items():
                    # No broadcasting: one row given for many slots is a bug or a corrupt file, not an init.
                    if group in table and tuple(value.shape) != tuple(table[group].shape):
                        raise ValueError(f"concept {name!r}: rows for {group} have shape {list(value.shape)}, "
                                         f"expected {list(table[group].shape)}")
                    if group in table:
                        table[group].copy_(value)
        device = next((p.device for p in self.parameters()), None)
        self.rows[name] = rows.to(device) if device is not None else rows
        self.info[name] = info
        self._index = {}
        return info

    def clear(self) -> None:
        """Remove every concept (ids restart after the base vocabulary)."""
        for name in list(self.info):
            del self.rows[name]
        self.info.clear()
        self._index = {}

    def remove(self, name: str) -> None:
        """Remove one concept. The concepts after it move down to close the gap: prompts read the ids from
        the bank when they are encoded, and a concept's outputs do not depend on the others loaded."""
        if name not in self.info:
            raise KeyError(f"concept {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})")
        del self.rows[name]
        kept = [i for n, i in self.info.items() if n != name]
        self.info.clear()
        next_id = self.base_vocab_size
        for info in kept:
            self.info[info.name] = replace(info, first_id=next_id)
            next_id += info.layout.total
        self._index = {}

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """No concept is loaded inside the block (the untrained base); the concepts loaded before come back,
        unchanged, after it (one added inside is dropped)."""
        info, rows = dict(self.info), {n: self.rows[n] for n in self.info}
        self.clear()
        try:
            yield
        finally:
            self.clear()
            for name, i in info.items():
                self.rows[name] = rows[name]
                self.info[name] = i
            self._index = {}

    @contextmanager
    def rows_replaced(self, values: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]]) -> Iterator[None]:
        """Inside the block, each named concept's rows hold ``values[name]`` ((embedding, head) by slot group,
        as `add` takes them); the trained rows come back, bit for bit, after it."""
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for name, (embed, head) in values.items():
                    rows = self.rows[name]
                    for table, init in ((rows.embed, embed), (rows.head, head)):
                        for group, value in init.items():
                            if group in table:
                                param = table[group]
                                if tuple(value.shape) != tuple(param.shape):
                                    raise ValueError(f"concept {name!r}: rows for {group} have shape "
                                                     f"{list(value.shape)}, expected {list(param.shape)}")
                                saved.append((param, param.detach().clone()))
                                param.copy_(value)
            yield
        finally:
            with torch.no_grad():
                for param, value in saved:
                    param.copy_(value)

    def concept_rows(self, name: str) -> ConceptRows:
        return self.rows[name]

    def parameters_of(self, names: Optional[Iterable[str]] = None, groups: Iterable[str] = GROUPS,
                      head: bool = True) -> Iterator[nn.Parameter]:
        """Parameters of the given concepts and slot groups: the optimizer's allow-list is built from this."""
        groups = set(groups)
        for name in self.names if names is None else names:
            rows = self.rows[name]
            yield from (p for g, p in rows.embed.items() if g in groups)
            if head:
                yield from (p for g, p in rows.head.items() if g in groups)

    def drop_gradients(self, keep: Iterable[str]) -> None:
        """Before the optimizer step: the gradient of every slot group not in `keep`, and of rows this step
        did not touch (all zero), becomes None, so AdamW (weight decay and momentum included) skips them and
        exactly the rows a stage names move."""
        keep = set(keep)
        for rows in self.rows.values():
            for table in (rows.embed, rows.head):
                for group, p in table.items():
                    if group not in keep or p.grad is None or not bool(p.grad.any()):
                        p.grad = None

    # ---- ids -> concepts ---------------------------------------------------------------------------------
    def _infos(self) -> list[ConceptInfo]:
        """`info`'s values in bank order (index = `concept_index`), kept between calls: read on every token."""
        if "infos" not in self._index:
            self._index["infos"] = list(self.info.values())
        return self._index["infos"]

    def concept_index(self, ids: Tensor) -> Tensor:
        """For concept token ids (each ``>= base_vocab_size``), the index of their concept in bank order."""
        starts = self._index.get("starts")
        if starts is None or starts.device != ids.device:
            starts = self._index["starts"] = torch.tensor([i.first_id for i in self.info.values()], dtype=torch.long,
                                                          device=ids.device)
        return torch.bucketize(ids, starts, right=True) - 1

    def _concept_ids(self, ids: Tensor) -> Tensor:
        """The concept token ids in `ids`, each checked to lie inside the bank."""
        found = ids[ids >= self.base_vocab_size]
        if found.numel() and int(found.max()) >= self.base_vocab_size + self.num_tokens:
            raise IndexError(f"token id {int(found.max())} is past the vocabulary ({self.base_vocab_size} + "
                             f"{self.num_tokens} concept tokens)")
        return found

    # ---- the two splices --------------------------------------------------------------------------------
    def embed(self, ids: Tensor, base: nn.Embedding) -> Tensor:
        """Embeddings for `ids`: base rows below V, concept rows above. Only groups present enter the graph."""
        out = base(ids.clamp(max=self.base_vocab_size - 1))
        used = torch.unique(self._concept_ids(ids))
        if not used.numel():
            return out
        infos = self._infos()
        used_list = used.tolist()
        for c in torch.unique(self.concept_index(used)).tolist():
            info = infos[c]
            for group, param in self.rows[info.name].embed.items():
                start, end = info.span(group)
                if not any(start <= u < end for u in used_list):
                    continue
                sel = (ids >= start) & (ids < end)
                out = out.index_put(torch.nonzero(sel, as_tuple=True), param[ids[sel] - start].to(out.dtype))
        return out

    def presence(self, ids: Tensor) -> Tensor:
        """(..., num_concepts) bool for ids (..., L): which concepts each sequence mentions. Concept logits
        exist only there."""
        out = torch.zeros(*ids.shape[:-1], len(self.info), dtype=torch.bool, device=ids.device)
        concept = ids >= self.base_vocab_size
        if len(self.info) and bool(concept.any()):
            self._concept_ids(ids)
            where = concept.nonzero(as_tuple=True)
            out[(*where[:-1], self.concept_index(ids[where]))] = True
        return out

    def present(self, presence: Tensor) -> list[int]:
        """Indices (bank order) of the concepts mentioned anywhere in `presence` (..., num_concepts)."""
        if not presence.shape[-1]:
            return []
        return presence.reshape(-1, presence.shape[-1]).any(0).nonzero().flatten().tolist()

    def columns(self, presence: Tensor) -> Tensor:
        """The token ids of `head_logits`' columns, ascending: every token of each concept in `presence`."""
        infos = self._infos()
        spans = [torch.arange(infos[c].first_id, infos[c].end_id) for c in self.present(presence)]
        return torch.cat(spans).to(presence.device) if spans else torch.zeros(0, dtype=torch.long, device=presence.device)

    def head_logits(self, hidden: Tensor, presence: Tensor) -> Tensor:
        """Logits of the concept tokens for `hidden` (..., H): one column per token of each concept mentioned
        anywhere in `presence` (ids in `columns(presence)`), so a concept no prompt names adds nothing.

        `presence` (..., num_concepts) must broadcast against hidden's leading dims. Within the batch a
        concept gets logits only where its own sequence mentions it (else the dtype minimum), so a concept
        absent from a sequence gets no gradient from it.
        """
        lead = hidden.shape[:-1]
        low = torch.finfo(hidden.dtype).min
        infos, blocks = self._infos(), []
        for c in self.present(presence):
            info, rows = infos[c], self.rows[infos[c].name]
            here = presence[..., c].expand(lead)[..., None]
            for group in GROUPS:
                count = info.layout.count(group)
                if not count:
                    continue
                if group in rows.head:
                    blocks.append(torch.where(here, hidden @ rows.head[group].to(hidden.dtype).T, low))
                else:
                    blocks.append(hidden.new_full((*lead, count), low))
        return torch.cat(blocks, -1) if blocks else hidden.new_zeros((*lead, 0))

    def extra_repr(self) -> str:
        return f"base_vocab_size={self.base_vocab_size}, concepts={self.names}, head_rows={self.head_rows}"
