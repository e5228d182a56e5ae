"""The benchmark's metrics as pure functions: decisions and embeddings in, numbers out.

    recognition_accuracy([True, True, False], [True, False, False])  # {"pos": 1.0, "neg": 0.5, "weighted": 0.75, ...}
    parse_yes_no("Yes, <bo> is here.")                               # True; "I don't know" -> None
    parse_option("(B) the red one", {"A": "blue", "B": "red"})       # "B"
    option_choices({"A": [-1.0, -2.0], "B": [-2.5]})                 # ("A", "B"): argmax of sum, of mean
    mean_pairwise_cosine(generated, references)                      # CLIP-I / DINO
    mean_paired_cosine(images, texts)                                # CLIP-T (a cosine, not CLIP's x100 logit)
    pairwise_cosine_rows(generated, references), paired_cosines(images, texts)   # the same, per image

Nothing here loads a model: the runner computes decisions, log-probs and embeddings, these functions
score them, and the tests check them on cases with known answers.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


# ---- recognition ------------------------------------------------------------------------------------------
def recognition_accuracy(decisions: Sequence[Optional[bool]], labels: Sequence[bool]) -> dict:
    """Positive accuracy, negative accuracy and Yo'Chameleon's weighted accuracy (pos + neg) / 2.

    A decision of None (an answer that could not be parsed) counts as wrong on either side and is also
    counted in ``unparsed``. ``weighted`` is None unless both sides have samples: one side alone says
    nothing about the other (an always-yes model would score 1.0 on positives only).
    """
    if len(decisions) != len(labels):
        raise ValueError(f"{len(decisions)} decisions for {len(labels)} labels")
    pos = [d is True for d, y in zip(decisions, labels) if y]
    neg = [d is False for d, y in zip(decisions, labels) if not y]
    acc_pos = sum(pos) / len(pos) if pos else None
    acc_neg = sum(neg) / len(neg) if neg else None
    weighted = (acc_pos + acc_neg) / 2 if pos and neg else None
    unparsed = sum(d is None for d in decisions)
    return {"pos": acc_pos, "neg": acc_neg, "weighted": weighted, "n_pos": len(pos), "n_neg": len(neg),
            "unparsed": unparsed, "unparsed_rate": unparsed / len(decisions) if decisions else None}


def parse_yes_no(text: str) -> Optional[bool]:
    """True for an answer that says yes, False for no, None when it says both or neither.

    Whole words only, any case: "Yes," "yes." "YES" count; "not", "know", "nothing", "eyes", "nose" do
    not ("I don't know" is unparsed, not "no"). The anchor repos matched substrings, so "I know" was a
    "no" and "eyes" a "yes".
    """
    says_yes, says_no = bool(_YES.search(text)), bool(_NO.search(text))
    return None if says_yes == says_no else says_yes


# ---- multiple choice --------------------------------------------------------------------------------------
def option_choices(logprobs: Mapping[str, Sequence[float]]) -> tuple[str, str]:
    """The options with the highest summed and the highest mean per-token log-probability.

    `logprobs` maps each option letter to the log-probs of its text's tokens as the answer. The sum
    favours short options, the mean removes the length effect; both are reported. Ties go to the first
    option in the mapping's order.
    """
    if not logprobs:
        raise ValueError("no options to choose from")
    empty = [k for k, v in logprobs.items() if len(v) == 0]
    if empty:
        raise ValueError(f"option(s) {', '.join(empty)} have no tokens")
    sums = {k: float(sum(v)) for k, v in logprobs.items()}
    means = {k: sums[k] / len(v) for k, v in logprobs.items()}
    return max(sums, key=sums.__getitem__), max(means, key=means.__getitem__)


_NORM = re.compile(r"[^\w]+")


def _normal(text: str) -> str:
    return _NORM.sub(" ", text.lower()).strip()


def parse_option(text: str, options: Mapping[str, str]) -> Optional[str]:
    """The option a generated answer picks, or None.

    In order: a letter at the start ("B", "B.", "(B) ...", "B) ..."); a letter after answer/option/choice
    ("The answer is C"); an answer equal to one option's text; an answer containing exactly one option's
    text as whole words. A bare leading article ("A dog ...") is not read as option A.
    """
    letters = "|".join(re.escape(k) for k in sorted(options, key=len, reverse=True))
    if not letters:
        return None
    stripped = text.strip()
    start = re.match(rf"^[(\[]?({letters})(?:[)\].:,]|$)", stripped)
    if start:
        return start.group(1)
    keyword = re.search(rf"\b(?:answer|option|choice)\b\s*(?:is|:)?\s*[(\[]?({letters})(?![A-Za-z0-9])", stripped,
                        re.IGNORECASE)
    if keyword and keyword.group(1) in options:
        return keyword.group(1)
    said = _normal(stripped)
    texts = {k: _normal(v) for k, v in options.items()}
    exact = [k for k, v in texts.items() if v and v == said]
    if len(exact) == 1:
        return exact[0]
    inside = [k for k, v in texts.items() if v and re.search(rf"(?<!\w){re.escape(v)}(?!\w)", said)]
    # An option whose text is inside another matched option's text is not a separate mention.
    inside = [k for k in inside if not any(k != o and texts[k] in texts[o] for o in inside)]
    return inside[0] if len(inside) == 1 else None


def accuracy(predictions: Sequence[Optional[str]], answers: Sequence[str]) -> Optional[float]:
    """Share of predictions equal to the answer (None predictions are wrong); None when there are none."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return None
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


# ---- captions ---------------------------------------------------------------------------------------------
def names_concept(text: str, name: str, output_ids: Sequence[int] = (), identifier_id: Optional[int] = None) -> bool:
    """Does a caption name the concept: its identifier token among the output ids, or the name as a word
    (``bo``, ``<bo>``, ``Bo``; not ``bonus``)?"""
    if identifier_id is not None and identifier_id in output_ids:
        return True
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def caption_recall(named: Sequence[bool]) -> Optional[float]:
    """Share of captions that name the concept; None without captions."""
    return sum(map(bool, named)) / len(named) if named else None


# ---- embeddings -------------------------------------------------------------------------------------------
def normalize(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def mean_pairwise_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine over every (row of a, row of b) pair: CLIP-I and DINO of generated vs reference images.

    Embeddings are L2-normalized here, whatever the caller passed.
    """
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("mean_pairwise_cosine needs at least one embedding on each side")
    return float((normalize(a) @ normalize(b).T).mean())


def pairwise_cosine_rows(a: Tensor, b: Tensor) -> list[float]:
    """Per row of a, its mean cosine with every row of b: CLIP-I / DINO per generated image (their mean is
    `mean_pairwise_cosine`)."""
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("pairwise_cosine_rows needs at least one embedding on each side")
    return (normalize(a) @ normalize(b).T).mean(1).tolist()


def paired_cosines(a: Tensor, b: Tensor) -> list[float]:
    """Cosine of row i of a with row i of b: CLIP-T per image (their mean is `mean_paired_cosine`)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (normalize(a) * normalize(b)).sum(-1).tolist()


def mean_paired_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine of row i of a with row i of b: CLIP-T of each image with its own prompt. A plain cosine
    in [-1, 1], not CLIPScore's 100 x cosine (nor 2.5 x max(cos, 0))."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((normalize(a) * normalize(b)).sum(-1).mean())


def mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None (or NaN); None when none are."""
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None
