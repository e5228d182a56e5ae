"""The benchmark's fixed texts, and how each row of the table (the concept file, or one of its five
baselines) writes a question, an answer or a generation prompt.

    personal   "Is <bo> in this photo?"      (the concept's prefix comes from PromptBuilder)
    none       "Is bo in this photo?"        (the name as plain text: no personal information)
    class      "Is the dog in this photo?"   (the marker becomes the class word)
    text       "bo is a dog. bo has a red collar.\nIs bo in this photo?"
    image      "<image>\nThis is bo.\n<image>\nIs bo in this photo?"   (a train photo in context)
    token      "Is <bo> in this photo?"      (the concept file with its rows back at their class-word init)

The first four run on the untrained base, which has no concept rows, so they write the name as plain
text; ``token`` keeps the concept's prompts and slots and removes only what training learned.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

IMAGE = "<image>"
RECOGNITION_QUESTION = "Is <{name}> in this photo?"
CAPTION_QUESTION = "Describe this photo."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# DreamBench-style (Ruiz et al., DreamBooth) recontextualisation prompts; {concept} is the subject.
GENERATION_TEMPLATES = (
    "a photo of {concept}",
    "{concept} on the beach",
    "{concept} in the snow",
    "{concept} in the jungle",
    "{concept} on a cobblestone street",
    "{concept} on top of a wooden floor",
    "{concept} with a city in the background",
    "{concept} with a mountain in the background",
    "{concept} on top of pink fabric",
    "{concept} floating on top of water",
)

PERSONAL = "personal"
BASELINES = ("none", "class", "text", "image", "token")
ON_BASE = ("none", "class", "text", "image")  # the untrained base; "token" needs the concept files loaded
METHOD_TITLES = {PERSONAL: "concept file", "none": "base: name only", "class": "base: class word",
                 "text": "base: text description", "image": "base: photo in context",
                 "token": "no concept token (init rows)"}


def style(method: str) -> str:
    """How a method writes its prompts: ``token`` asks exactly as the concept file does."""
    return PERSONAL if method == "token" else method


def check_templates(templates: Sequence[str]) -> list[str]:
    """Generation templates must name the subject as {concept} (and nothing else in braces)."""
    out = []
    for t in templates:
        if "{concept}" not in t:
            raise ValueError(f"eval.prompts: {t!r} has no {{concept}} placeholder")
        try:
            t.format(concept="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"eval.prompts: {t!r} is not a valid template ({err})") from err
        out.append(t)
    return out


def with_article(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def class_prompt(template: str, class_word: str) -> str:
    """The prompt with the subject as its class: "{concept} on the beach" -> "a dog on the beach" (CLIP-T)."""
    return template.format(concept=with_article(class_word))


def _marker(name: str) -> re.Pattern:
    return re.compile(re.escape(f"<{name}>"))


def rewrite(text: str, name: str, method: str, class_word: Optional[str]) -> str:
    """`text` with the concept's marker as the method writes it (personal: unchanged)."""
    if method == PERSONAL:
        return text
    if method == "class":
        return _marker(name).sub(f"the {class_word or 'object'}", text)
    return _marker(name).sub(name, text)


def description(name: str, class_word: Optional[str], facts: Sequence) -> str:
    """"bo is a dog. bo has a red collar." from concept.json's class word and facts (strings, or
    question/answer pairs whose answers are used)."""
    parts = [f"{name} is {with_article(class_word)}."] if class_word else []
    for fact in facts:
        text = fact.get("answer", "") if isinstance(fact, dict) else str(fact)
        text = _marker(name).sub(name, text).strip()
        if text:
            parts.append(text if text[-1] in ".!?" else text + ".")
    return " ".join(parts) if parts else f"{name} is a personal object."


def context(name: str, method: str, class_word: Optional[str], facts: Sequence) -> tuple[str, int]:
    """(text placed before the question, how many reference images it holds) for a method."""
    if method == "text":
        return description(name, class_word, facts) + "\n", 0
    if method == "image":
        return f"{IMAGE}\nThis is {name}.\n", 1
    return "", 0


def choice_question(question: str, options: dict[str, str]) -> str:
    """A multiple-choice question as the model sees it when it answers in words."""
    lines = [question.strip()] + [f"{k}. {v}" for k, v in options.items()] + [CHOICE_INSTRUCTION]
    return "\n".join(lines)


def generation_prompt(template: str, name: str, method: str, class_word: Optional[str]) -> str:
    """The generation prompt of a method (its context, for text and image, comes from `context`)."""
    if method == PERSONAL:
        return template.format(concept=f"<{name}>")
    if method == "class":
        return class_prompt(template, class_word or "object")
    return template.format(concept=name)
