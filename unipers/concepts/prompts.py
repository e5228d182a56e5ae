"""Prompt layouts: text with ``<name>`` markers and ``<image>`` placeholders -> token ids.

Every concept a prompt mentions gets a prefix sentence before the text, in the Yo'Chameleon style:

    understanding:  <bo> is <shared...><und...>.  Is <bo> in this photo?
    generation:     <bo> is <shared...><gen...>.  <bo> reading a book in a library

so the shared slots appear in both, the und slots only in understanding and the gen slots only in
generation. ``gen_slots=k`` keeps the first k gen slots (soft positives use fewer slots the less they look
like the concept). Mode ``plain`` adds no prefix: the base model's view, used by baselines.

Concept tokens are not added to the tokenizer: text between markers is tokenized on its own and concept ids
(>= V) are inserted, so the base tokenizer is never changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

from unipers.concepts.bank import ConceptBank
from unipers.concepts.names import MARKER_PATTERN
from unipers.errors import UnipersError

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
MODES = ("und", "gen", "plain")
_TEXT_CACHE_SIZE = 1 << 16  # distinct text pieces remembered per builder (templates: a few thousand)
_SPLIT = re.compile(r"(<image>|<[A-Za-z0-9][A-Za-z0-9_-]{0,31}>)")


class PromptError(UnipersError, ValueError):
    """A prompt that cannot be encoded (unknown concept, image count mismatch, too long)."""


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]


class PromptBuilder:
    def __init__(self, tokenizer, bank: ConceptBank, *, boi_id: int, eoi_id: int, max_length: Optional[int] = None,
                 describe_question: Optional[str] = None, describe_tokens: int = 16):
        """``describe_question``: recognition in two turns, "describe, then decide" (see
        `encode_described_qa`); None asks about the image directly."""
        self.tokenizer = tokenizer
        self.bank = bank
        self.boi_id, self.eoi_id = boi_id, eoi_id
        self.max_length = max_length
        self.describe_question, self.describe_tokens = describe_question, describe_tokens
        self.vocab = tokenizer.get_vocab()
        self._text_ids: dict[str, tuple[int, ...]] = {}

    @classmethod
    def for_backbone(cls, backbone, **layout) -> "PromptBuilder":
        return cls(backbone.tokenizer, backbone.bank, boi_id=backbone.boi_id, eoi_id=backbone.eoi_id,
                   max_length=backbone.model.config.max_position_embeddings, **layout)

    def mentioned(self, text: str) -> list[str]:
        """Loaded concepts named in `text`, in order of first mention. Unknown markers raise."""
        names: list[str] = []
        for name in MARKER_PATTERN.findall(text):
            if name in self.bank:
                if name not in names:
                    names.append(name)
            elif f"<{name}>" not in self.vocab:
                loaded = ", ".join(f"<{n}>" for n in self.bank.names) or "none"
                raise PromptError(f"prompt mentions <{name}>, which is not a loaded concept (loaded: {loaded})")
        return names

    def prefix(self, name: str, mode: str, gen_slots: Optional[int] = None) -> list[int]:
        """`<name> is <slots>.` for one concept, as ids."""
        info = self.bank.info[name]
        slots = info.token_ids("shared")
        if mode == "und":
            slots += info.token_ids("und")
        elif mode == "gen":
            gen = info.token_ids("gen")
            slots += gen if gen_slots is None else gen[: max(0, min(gen_slots, len(gen)))]
        return [info.first_id, *self._text(" is "), *slots, *self._text(".")]

    def encode(self, text: str, *, mode: str = "und", images: Sequence[Tensor] = (), gen_slots: Optional[int] = None,
               bos: bool = True) -> list[int]:
        """Ids for `text`: BOS, one prefix per mentioned concept (unless plain), then the text."""
        if mode not in MODES:
            raise PromptError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        ids = [self.tokenizer.bos_token_id] if bos else []
        if mode != "plain":
            for name in self.mentioned(text):
                ids += self.prefix(name, mode, gen_slots) + self._text(" ")
        ids += self._body(text, images)
        self._check_length(ids, text)
        return ids

    def encode_qa(self, question: str, answer: str, *, images: Sequence[Tensor] = (), mode: str = "und",
                  self_prompt: bool = False) -> Encoded:
        """A question and its answer: labels only on the answer and its end-of-turn token.

        self_prompt (Yo'Chameleon): the prompt names the concept by its identifier only, and the answer
        starts with the concept's prefix, so the model learns to recall its own latent tokens.
        """
        prompt_mode = "plain" if self_prompt else mode
        prompt = self.encode(question, mode=prompt_mode, images=images) + [self.tokenizer.sep_token_id]
        recall: list[int] = []
        if self_prompt:
            for name in self.mentioned(question):
                recall += self.prefix(name, mode) + self._text(" ")
        answer_ids = recall + self._body(answer, ()) + [self.tokenizer.eos_token_id]
        ids = prompt + answer_ids
        self._check_length(ids, question)
        return Encoded(ids, [IGNORE_INDEX] * len(prompt) + answer_ids)

    def encode_question(self, question: str, *, images: Sequence[Tensor] = (), mode: str = "und") -> list[int]:
        """The prompt side of `encode_qa`, for inference: the model continues after the separator."""
        return self.encode(question, mode=mode, images=images) + [self.tokenizer.sep_token_id]

    # ---- describe, then decide ----------------------------------------------------------------------------
    # Recognition in two turns. Turn one asks the base about the image with no concept in context, and its
    # own greedy answer (the "description", `UnifiedModel.describe`) is kept; turn two asks about the
    # concept, whose prefix then stands beside the base's words for the image:
    #     <s> <image>\nWhat is in this photo? <sep> A purple striped star. </s> <bo> is <slots>. Is <bo> ...? <sep>
    # The description does not depend on any concept, so it is computed once per image and base.
    def describe_prompt(self, image: Tensor) -> list[int]:
        """Turn one up to its separator: the ids the base continues with its description."""
        if not self.describe_question:
            raise PromptError("no describe question is set (backbone.describe_first)")
        return self.encode_question(f"{IMAGE_MARKER}\n{self.describe_question}", images=[image], mode="plain")

    def encode_described_qa(self, question: str, answer: str, *, image: Tensor, description: Sequence[int],
                            mode: str = "und", self_prompt: bool = False) -> Encoded:
        """`encode_qa` of a question about the image in ``image``, asked as turn two after the base's
        ``description`` of it (ids, no end-of-turn); labels only on turn two's answer."""
        first = self.description_turn(image, description, question)
        enc = self.encode_qa(question, answer, mode=mode, self_prompt=self_prompt)
        ids = first + enc.ids[1:]
        self._check_length(ids, question)
        return Encoded(ids, [IGNORE_INDEX] * len(first) + enc.labels[1:])

    def encode_described_question(self, question: str, *, image: Tensor, description: Sequence[int],
                                  mode: str = "und") -> list[int]:
        """The prompt side of `encode_described_qa`, for inference."""
        ids = self.description_turn(image, description, question) + self.encode_question(question, mode=mode)[1:]
        self._check_length(ids, question)
        return ids

    def description_turn(self, image: Tensor, description: Sequence[int], question: str = "") -> list[int]:
        """Turn one whole, the description as its answer; turn two (``question``) follows without BOS and
        must not hold the image again."""
        if IMAGE_MARKER in question:
            raise PromptError(f"a described question takes its image in turn one, not as {IMAGE_MARKER}: {question!r}")
        return self.describe_prompt(image) + list(description) + [self.tokenizer.eos_token_id]

    # ---- pieces -----------------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._text_ids.get(text)
        if ids is None:  # training re-encodes the same templated pieces every step: tokenize each once
            ids = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
            if len(self._text_ids) < _TEXT_CACHE_SIZE:
                self._text_ids[text] = ids
        return list(ids)

    def _body(self, text: str, images: Sequence[Tensor]) -> list[int]:
        ids: list[int] = []
        images = list(images)
        wanted = text.count(IMAGE_MARKER)
        if wanted != len(images):
            raise PromptError(f"prompt has {wanted} {IMAGE_MARKER} placeholder(s) but {len(images)} image(s) were given")
        for piece in _SPLIT.split(text):
            if not piece:
                continue
            if piece == IMAGE_MARKER:
                ids += [self.boi_id, *images.pop(0).tolist(), self.eoi_id]
            elif piece[1:-1] in self.bank and piece.startswith("<"):
                ids.append(self.bank.info[piece[1:-1]].first_id)
            else:
                ids += self._text(piece)
        return ids

    def _check_length(self, ids: list[int], text: str) -> None:
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptError(
                f"prompt is {len(ids)} tokens, longer than the model's context of {self.max_length}: {text[:60]!r}..."
            )
