"""Concept names: what a user may call a concept, checked before anything is trained or saved.

A name becomes the prompt marker ``<name>``, a key in concept files and part of file paths, so it must be
safe in all three and must not collide with a token the base model already has.
"""

from __future__ import annotations

import re
from typing import Iterable

from unipers.errors import UnipersError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
# <name> markers in prompt text; the same grammar as NAME_PATTERN.
MARKER_PATTERN = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_-]{0,31})>")
RESERVED = {"image", "s", "pad", "unk", "eoss"}


class ConceptNameError(UnipersError, ValueError):
    """A concept name that cannot be used; the message says why."""


def validate_name(name: str, vocabulary: Iterable[str] = (), taken: Iterable[str] = ()) -> str:
    """Return `name` unchanged, or raise ConceptNameError naming the problem.

    `vocabulary` holds the base tokenizer's token strings: ``<name>`` must not already be one of them
    (e.g. ``<image>``), or prompts would be ambiguous. `taken` holds concepts already in the bank.
    """
    if not isinstance(name, str) or not name:
        raise ConceptNameError("concept name is empty")
    stripped = name.strip("<>")
    if stripped != name:
        raise ConceptNameError(f"concept name {name!r}: give the bare name ({stripped!r}); prompts write it as <{stripped}>")
    if not NAME_PATTERN.fullmatch(name):
        raise ConceptNameError(
            f"concept name {name!r}: use 1-32 letters, digits, '_' or '-', starting with a letter or digit "
            "(other characters break prompts or file paths)"
        )
    if name.lower() in RESERVED:
        raise ConceptNameError(f"concept name {name!r} is reserved by the prompt format")
    vocab = set(vocabulary)
    if f"<{name}>" in vocab:
        raise ConceptNameError(f"concept name {name!r}: '<{name}>' is already a token of the base vocabulary")
    if name in set(taken):
        raise ConceptNameError(f"concept name {name!r} is already loaded in this bank")
    return name
