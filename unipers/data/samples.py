"""Training-sample generation: recognition, text QA, captions and generation prompts.

    from unipers.data.samples import recognition_samples, balanced_counts
    per_pos, n_neg = balanced_counts(len(pos), len(neg), questions_per_photo=4, neg_per_pos=1.0)
    recs = recognition_samples("bo", pos, neg, "train", random.Random(0), per_positive=per_pos, n_negative=n_neg)

All text names the concept literally as ``<NAME>`` (``<bo>``); every choice is drawn from the
``random.Random`` passed in, so a seed reproduces the manifest exactly.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Optional, Sequence

from unipers.data.manifest import Sample

RECOGNITION_QUESTIONS = (
    "Is {c} in this photo?",
    "Can you see {c} in this image?",
    "Does this photo show {c}?",
    "Is {c} visible in this picture?",
    "Can you tell me if {c} is in this photo?",
    "Do you recognize {c} in this image?",
    "Is this a photo of {c}?",
    "Can you check whether {c} appears in this image?",
    "Is {c} anywhere in this picture?",
    "Hey, is {c} in this photo?",
)
POSITIVE_ANSWERS = (
    "Yes, {c} is in this photo.",
    "Yes, I can see {c} in this image.",
    "Yes, this is {c}.",
    "Yes, {c} is in the picture.",
    "Yes, I can confirm that {c} is in this photo.",
)
NEGATIVE_ANSWERS = (
    "No, {c} is not in this photo.",
    "No, I cannot see {c} in this image.",
    "No, this is not {c}.",
    "No, {c} is not in the picture.",
    "No, I can confirm that {c} is not in this photo.",
)
FACT_QUESTIONS = (
    "Tell me something about {c}.",
    "What is one thing you know about {c}?",
    "Share a fact about {c}.",
    "Can you tell me a detail about {c}?",
    "What should I know about {c}?",
)
SUMMARY_QUESTION = "What do you know about {c}?"
CAPTION_QUESTIONS = (
    "Describe this image.",
    "Write a short caption for this photo.",
    "What does this picture show?",
    "Caption this image.",
)
CAPTIONS_WITH_CLASS = (
    "A photo of {c}, a {w}.",
    "This is {c}, a {w}.",
    "A picture of {c} the {w}.",
    "An image of {c}, a {w}.",
    "{c}, a {w}, in a photo.",
)
CAPTIONS_PLAIN = (
    "A photo of {c}.",
    "This is {c}.",
    "A picture of {c}.",
    "An image showing {c}.",
)
GENERATION_PROMPT = "A photo of {c}."

def mention(name: str) -> str:
    return f"<{name}>"


def normalize_mentions(text: str, name: str, aliases: Sequence[str] = (), *, bare_name: bool = True) -> str:
    """Write every mention as ``<name>``: ``<alias>`` and whole-word ``alias`` become ``<name>``, and so
    does a whole-word bare ``name`` when ``bare_name``."""
    c = mention(name)
    for a in (*aliases, name):
        text = text.replace(f"<{a}>", c)
        if a != name or bare_name:
            text = re.sub(rf"(?<![<\w]){re.escape(a)}(?![>\w])", c, text)
    return text


def balanced_counts(n_pos_images: int, n_neg_images: int, *, questions_per_photo: int = 4,
                    neg_per_pos: float = 1.0, max_questions_per_photo: int = 50) -> tuple[int, int]:
    """(questions per positive photo, number of negative samples).

    Each positive photo gets at least ``questions_per_photo`` questions, more when there are many
    negatives, so that every negative image can be used once while keeping ``neg_per_pos`` negative
    samples per positive sample (capped at ``max_questions_per_photo`` per photo)."""
    if n_pos_images == 0:
        return 0, 0
    per_pos = questions_per_photo
    if n_neg_images and neg_per_pos > 0:
        per_pos = max(per_pos, math.ceil(n_neg_images / (neg_per_pos * n_pos_images)))
    per_pos = min(per_pos, max(questions_per_photo, max_questions_per_photo))
    n_neg = round(neg_per_pos * per_pos * n_pos_images) if n_neg_images else 0
    return per_pos, n_neg


def _cycle_templates(rng: random.Random, templates: Sequence[str], n: int) -> list[str]:
    """``n`` templates, each used once before any repeats (shuffled per round)."""
    out: list[str] = []
    while len(out) < n:
        batch = list(templates)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:n]


def recognition_samples(name: str, positives: Sequence[str], negatives: Sequence[str], split: str,
                        rng: random.Random, *, per_positive: int, n_negative: int) -> list[Sample]:
    """"Is <bo> in this photo?" with Yes for each positive image (``per_positive`` different questions)
    and No for ``n_negative`` samples cycling through the shuffled negative images."""
    c = mention(name)
    out = []
    for img in positives:
        for q in _cycle_templates(rng, RECOGNITION_QUESTIONS, per_positive):
            out.append(Sample("recognition", name, split, image=img, question=q.format(c=c),
                              answer=rng.choice(POSITIVE_ANSWERS).format(c=c), label=True))
    order: list[str] = []
    while negatives and len(order) < n_negative:
        batch = list(negatives)
        rng.shuffle(batch)
        order.extend(batch)
    for img in order[:n_negative]:
        out.append(Sample("recognition", name, split, image=img, question=rng.choice(RECOGNITION_QUESTIONS).format(c=c),
                          answer=rng.choice(NEGATIVE_ANSWERS).format(c=c), label=False))
    return out


MAX_PROMPT_CHARS = 500


def read_photo_prompts(path: Path | str, name: str, photos: Sequence[str]) -> dict[str, str]:
    """{photo file name: its generation prompt} from a JSON object, checked: every key one of ``photos``
    (file names), every prompt a string naming ``<name>`` and no other concept (a bare ``name`` is rewritten
    to ``<name>``, as in a facts file), at most MAX_PROMPT_CHARS characters. A ValueError names the file
    and the key."""
    from unipers.concepts.names import MARKER_PATTERN

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{path}: expected a JSON object {{"photo file name": "A photo of <{name}> ...", ...}}')
    known, out = set(photos), {}
    for key, prompt in data.items():
        if key not in known:
            raise ValueError(f"{path}: {key!r} is not one of the {len(known)} photos loaded")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: {key!r}: the prompt must be a non-empty string")
        prompt = normalize_mentions(" ".join(prompt.split()), name)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path}: {key!r}: the prompt is {len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
        others = sorted({m for m in MARKER_PATTERN.findall(prompt) if m != name})
        if mention(name) not in prompt or others:
            why = f"names {', '.join(f'<{m}>' for m in others)}" if others else f"does not name <{name}>"
            raise ValueError(f"{path}: {key!r}: the prompt {why}; write the concept as <{name}> and no other")
        out[key] = prompt
    return out


def read_facts(path: Path | str, name: str) -> tuple[list[str], list[dict]]:
    """(facts, question/answer pairs) from a facts file.

    ``.json``: a list of ``{"question", "answer"}`` (``Human`` / ``AI`` keys are accepted too).
    Anything else: one fact per line; blank lines and ``#`` comments are skipped. In both, a bare word
    equal to ``name`` is rewritten to ``<name>`` (documented in docs/prepare.md and ``--facts --help``)."""
    # The bare-name rewrite stays: a facts file is about this one concept, people write "bo likes
    # balls." for it, and without the rewrite such a fact would silently teach the plain word "bo" instead
    # of the concept. Its cost, a concept named after an ordinary word ("dragon") cannot use that word in
    # its facts, is stated in the docs together with the way out (another name, or rephrasing).
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"facts file not found: {path}")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{\"question\", \"answer\"}} objects")
        pairs = []
        for i, item in enumerate(data):
            q = item.get("question", item.get("Human")) if isinstance(item, dict) else None
            a = item.get("answer", item.get("AI")) if isinstance(item, dict) else None
            if not isinstance(q, str) or not isinstance(a, str):
                raise ValueError(f"{path}[{i}]: needs string 'question' and 'answer'")
            pairs.append({"question": normalize_mentions(q, name), "answer": normalize_mentions(a, name)})
        return [], pairs
    facts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            line = line if line[-1] in ".!?" else line + "."
            facts.append(normalize_mentions(line, name))
    return facts, []


def qa_samples(name: str, facts: Sequence[str], pairs: Sequence[dict], rng: random.Random, *,
               source: str | None = None) -> list[Sample]:
    """Text-only QA: one templated question per fact, a summary question over all facts, and the
    given question/answer pairs as they are."""
    c = mention(name)
    out = []
    for fact, q in zip(facts, _cycle_templates(rng, FACT_QUESTIONS, len(facts))):
        out.append(Sample("qa", name, "train", question=q.format(c=c), answer=fact, source=source))
    if facts:
        out.append(Sample("qa", name, "train", question=SUMMARY_QUESTION.format(c=c), answer=" ".join(facts),
                          source=source))
    for i, p in enumerate(pairs):
        out.append(Sample("qa", name, "train", question=p["question"], answer=p["answer"],
                          source=f"{source}#{i}" if source else None))
    return out


def caption_samples(name: str, class_word: str | None, images: Sequence[str], split: str, rng: random.Random,
                    *, per_image: int = 2) -> list[Sample]:
    """Captions that name the concept (and its class word when given), ``per_image`` distinct ones each."""
    c = mention(name)
    templates = CAPTIONS_WITH_CLASS if class_word else CAPTIONS_PLAIN
    out = []
    for img in images:
        for t in _cycle_templates(rng, templates, min(per_image, len(templates))):
            out.append(Sample("caption", name, split, image=img, question=rng.choice(CAPTION_QUESTIONS),
                              answer=t.format(c=c, w=class_word)))
    return out


def generation_samples(name: str, images: Sequence[str], split: str, prompts: Optional[dict] = None) -> list[Sample]:
    """"A photo of <bo>." for each photo (or its own prompt in ``prompts``: {image: prompt}), using all
    generation slots."""
    prompt, prompts = GENERATION_PROMPT.format(c=mention(name)), prompts or {}
    return [Sample("generation", name, split, image=img, prompt=prompts.get(img, prompt)) for img in images]


def soft_positive_samples(name: str, soft: Sequence[dict]) -> list[Sample]:
    """Generation prompts for soft positives (``{"image", "similarity", "gen_slots"}``): the prompt uses
    only ``gen_slots`` of the concept's generation slots."""
    prompt = GENERATION_PROMPT.format(c=mention(name))
    return [Sample("generation", name, "train", image=s["image"], prompt=prompt, gen_slots=s["gen_slots"],
                   similarity=s["similarity"], source="soft_positive") for s in soft]
