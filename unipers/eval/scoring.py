"""Model-side primitives of the benchmark, on a loaded `InferenceSession`, batched.

    p = Prompter(session, target, method="personal")         # or "none" / "text" / "image"
    ids = p.question("<image>\\nIs <bo> in this photo?", [tokens])
    first_token_logits(session, [ids])                       # the answer's first-token logits (Yes vs No)
    answer_logprobs(session, [ids], [p.answer("a red collar")])   # per-token log-probs of an answer
    generate_answers(session, [ids], max_new_tokens=32)      # greedy answers as (ids, text)

Prompts follow the training layout (`PromptBuilder.encode_question`: BOS, concept prefix, text, separator),
so "the answer's first token" is the token after the separator, as in `InferenceSession.recognize` and
the validation step of `personalize`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from unipers.concepts.prompts import PromptError
from unipers.eval.prompts import PERSONAL, context, rewrite
from unipers.inference.session import InputError
from unipers.models.padding import pad_batch


class Prompter:
    """Token ids of questions and answers as one method (the concept file, or a baseline) writes them."""

    def __init__(self, session, target, method: str, reference: Optional[Tensor] = None):
        self.session, self.target, self.method = session, target, method
        self.prompts = session.model.prompts
        self.context, n_ref = context(target.name, method, target.class_word, target.facts)
        if n_ref and reference is None:
            raise ValueError(f"{method} baseline of {target.name}: needs a reference photo (no train photos)")
        self.reference = [reference] * n_ref

    def rewrite(self, text: str) -> str:
        return rewrite(text, self.target.name, self.method, self.target.class_word)

    def question(self, text: str, images: Sequence[Tensor] = ()) -> list[int]:
        """Prompt ids ending with the separator; the concept is in context even when `text` omits it."""
        try:
            if self.method != PERSONAL:
                return self.prompts.encode_question(self.context + self.rewrite(text),
                                                    images=[*self.reference, *images], mode="plain")
            ids = self.prompts.encode_question(text, images=images)
        except PromptError as err:
            raise InputError(f"{self.target.name}: {err}") from err
        if f"<{self.target.name}>" not in text:
            # Captions: "Describe this photo." names no concept, but the concept file must be in context;
            # the same layout `encode` gives a text that mentions it: BOS, prefix, space, text.
            space = self.session.backbone.tokenizer(" ", add_special_tokens=False).input_ids
            ids = ids[:1] + self.prompts.prefix(self.target.name, "und") + space + ids[1:]
        return ids

    def recognition(self, layout, text: str, image: Tensor, description: Optional[Sequence[int]]) -> list[int]:
        """`question` about ``image`` in the model's recognition layout (`unipers.concepts.recognition`): after
        the image, or as turn two after the base's ``description`` of it; ``text`` holds no placeholder."""
        try:
            return layout.question(text, image, description, ask=self.question)
        except PromptError as err:
            raise InputError(f"{self.target.name}: {err}") from err

    def answer(self, text: str) -> list[int]:
        """Answer ids as the training labels hold them (concept markers as identifier tokens), no EOS."""
        return self.prompts.encode(self.rewrite(text), mode="plain", bos=False)

    @property
    def identifier_id(self) -> Optional[int]:
        bank = self.session.model.bank
        return bank.info[self.target.name].first_id if self.method == PERSONAL and self.target.name in bank else None


def _batches(n: int, size: int):
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + max(1, size)))


@torch.no_grad()
def first_token_logits(session, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> Tensor:
    """(N, V) float logits over the base vocabulary of the token after each prompt (left-padded batches):
    the first token of an answer (Yes / No, an option letter)."""
    bb = session.backbone
    rows = []
    for part in _batches(len(seqs), batch_size):
        ids, mask = pad_batch(seqs[part], bb.tokenizer.pad_token_id, side="left")
        ids, mask = ids.to(bb.device), mask.to(bb.device)
        hidden, _ = bb.hidden_states(ids, mask)
        rows.append(bb.logits(hidden[:, -1], bb.bank.presence(ids))[:, : bb.vocab_size].float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def answer_logprobs(session, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                    batch_size: int = 8) -> list[list[float]]:
    """Log-probability of each answer token given the prompt and the answer so far (teacher forcing)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
    bb = session.backbone
    out: list[list[float]] = []
    for part in _batches(len(prompts), batch_size):
        seqs = [list(p) + list(a) for p, a in zip(prompts[part], answers[part])]
        labels = [[-100] * len(p) + list(a) for p, a in zip(prompts[part], answers[part])]
        ids, mask = pad_batch(seqs, bb.tokenizer.pad_token_id)
        labels, _ = pad_batch(labels, 0, labels=True)
        ids, mask, labels = ids.to(bb.device), mask.to(bb.device), labels.to(bb.device)
        hidden, _ = bb.hidden_states(ids, mask)
        targets = labels[:, 1:]
        sel = targets != -100
        rows = sel.nonzero(as_tuple=True)[0]
        presence = bb.bank.presence(ids)[rows]
        logits = bb.logits(hidden[:, :-1][sel], presence).float()
        columns = bb.to_columns(targets[sel], presence)
        picked = torch.log_softmax(logits, -1).gather(-1, columns[:, None]).squeeze(-1).cpu()
        counts = sel.sum(1).tolist()
        out.extend(chunk.tolist() for chunk in picked.split(counts))
    return out


@torch.no_grad()
def generate_answers(session, seqs: Sequence[Sequence[int]], max_new_tokens: int,
                     batch_size: int = 8) -> list[tuple[list[int], str]]:
    """Greedy answers: (new token ids before the end-of-turn token, decoded text) per prompt."""
    bb = session.backbone
    eos = bb.tokenizer.eos_token_id
    out = []
    for part in _batches(len(seqs), batch_size):
        ids, mask = pad_batch(seqs[part], bb.tokenizer.pad_token_id, side="left")
        new = bb.generate(ids.to(bb.device), mask.to(bb.device), max_new_tokens=max_new_tokens).cpu().tolist()
        for row in new:
            row = row[: row.index(eos)] if eos in row else row
            out.append((row, session.decode(row)))
    return out

