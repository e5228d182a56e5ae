"""A judge model for open-ended answers, from a local folder (no API, no download, no remote code).

Questions with options are scored by option likelihood (runner.py). A held-out question with only a
reference answer ("Where does <bo> live?" -> "<bo> lives in the kitchen.") needs someone to say whether a
free answer agrees with it: a causal language model given as ``eval.judge_path`` reads

    A question about bo, its reference answer and a candidate answer.
    Question: Where does bo live?
    Reference answer: bo lives in the kitchen.
    Candidate answer: In the kitchen, by the window.
    Does the candidate answer agree with the reference answer? Answer yes or no.
    Answer:

and its verdict is whether " yes" is more likely than " no" as the next token (P(yes) over the two is
kept). Concept markers are written as the plain name, which any judge can read.

    judge = Judge.load("checkpoints/qwen2.5-7b-instruct", device="cuda")
    judge.p_yes(["Where does bo live?"], ["bo lives in the kitchen."], ["In the kitchen."])   # [0.97]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from unipers.models.embedders import MetricModelError
from unipers.models.padding import pad_batch

PROMPT = ("A question about {name}, its reference answer and a candidate answer.\n"
          "Question: {question}\nReference answer: {reference}\nCandidate answer: {candidate}\n"
          "Does the candidate answer agree with the reference answer? Answer yes or no.\nAnswer:")


class Judge:
    def __init__(self, model, tokenizer, path: Path, device: str | torch.device = "cpu", batch_size: int = 8):
        self.model, self.tokenizer, self.path = model.to(device).eval(), tokenizer, Path(path)
        self.device, self.batch_size = torch.device(device), batch_size
        self.yes_no = [self._first_token(w) for w in (" yes", " no")]
        if self.yes_no[0] == self.yes_no[1]:
            raise MetricModelError(f"eval.judge_path={path}: ' yes' and ' no' start with the same token")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 8) -> "Judge":
        """A transformers causal LM folder with its tokenizer, loaded locally; a folder that is not one is
        a MetricModelError naming eval.judge_path."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise MetricModelError(f"eval.judge_path={path}: not a local model folder (no config.json)")
        try:
            # dtype "auto": the folder's own (a 7B judge in bf16 is 15 GB, in float32 30 GB)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                         dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise MetricModelError(f"eval.judge_path={path}: cannot load a causal LM and its tokenizer ({err})") from err
        return cls(model, tokenizer, path, device, batch_size)

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise MetricModelError(f"eval.judge_path={self.path}: {word.strip()!r} has no tokens")
        return ids[0]

    @property
    def name(self) -> str:
        return str(self.path)

    @torch.no_grad()
    def p_yes(self, name: str, questions: Sequence[str], references: Sequence[str],
              candidates: Sequence[str]) -> list[float]:
        """P(" yes") against P(" no") for the next token after each judge prompt."""
        if not (len(questions) == len(references) == len(candidates)):
            raise ValueError(f"{len(questions)} questions, {len(references)} references, {len(candidates)} candidates")
        prompts = [PROMPT.format(name=name, question=q, reference=r, candidate=c.strip() or "(no answer)")
                   for q, r, c in zip(questions, references, candidates)]
        out: list[float] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for i in range(0, len(prompts), self.batch_size):
            ids, mask = pad_batch([self.tokenizer(p).input_ids for p in prompts[i:i + self.batch_size]], pad, side="left")
            ids, mask = ids.to(self.device), mask.to(self.device)
            position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # left padding: positions count real tokens only
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            pair = logits[:, self.yes_no].float().softmax(-1)
            out += pair[:, 0].cpu().tolist()
        return out
