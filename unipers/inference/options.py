"""The ranges of the numeric options of ask / recognize / generate, written once (``OPTION_RANGES``):
argparse refuses a bad flag through ``option_type`` before any model loads, and ``InferenceSession.ask`` /
``generate`` refuse the same values through ``check_option``, so the command line and the Python API cannot
drift apart.
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

from unipers.errors import UnipersError


class InputError(UnipersError, ValueError):
    """Bad input to ask / recognize / generate; the message names the file, the argument or the problem."""


@dataclass(frozen=True)
class OptionRange:
    """A numeric option's allowed values: ``low <= value <= high`` (``value > low`` when ``low_open``), a
    multiple of ``multiple`` for integers, and ``zero_too`` admits 0 below ``low`` (greedy decoding)."""

    integer: bool
    low: float
    high: float
    low_open: bool = False
    multiple: int = 1
    zero_too: bool = False
    text: str = ""
    """The range in words, where the numbers would not read well."""

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.integer:
            kind = f"a multiple of {self.multiple}" if self.multiple > 1 else "an integer"
            return f"{kind} from {self.low} to {self.high}"
        if self.low_open:
            return f"a number above {self.low:g} and at most {self.high:g}"
        span = f"a number from {self.low:g} to {self.high:g}"
        return f"0 or {span}" if self.zero_too else span

    def admits(self, value: float) -> bool:
        if self.zero_too and value == 0:
            return True
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high and (not self.integer or value % self.multiple == 0)


# Bounds that catch typos (0 steps, NaN guidance, 1e9 images) while leaving every real setting open; they
# match the eval section of the config (unipers/schema.py), whose settings go through the same session.
OPTION_RANGES: dict[str, OptionRange] = {
    "num_images": OptionRange(True, 1, 1024),
    "steps": OptionRange(True, 1, 1000),
    # guidance <= 1 turns classifier-free guidance off; NaN would do so silently, so only finite values pass.
    "guidance": OptionRange(False, 0.0, 100.0),
    # The side in pixels. Stable Diffusion VAEs downsample x8 (the decoder also checks its own factor in
    # InferenceSession.generate); the tiny and world decoders draw 32 px images, hence 32 and not 64 below.
    "size": OptionRange(True, 32, 2048, multiple=8),
    "max_new_tokens": OptionRange(True, 1, 4096),
    # 0 is greedy. A tiny positive temperature divides the logits into inf and sampling then fails on NaN;
    # below 0.01 sampling is greedy in all but name anyway.
    "temperature": OptionRange(False, 0.01, 10.0, zero_too=True),
    "top_p": OptionRange(False, 0.0, 1.0, low_open=True),
    # What torch.Generator.manual_seed takes (it wraps negatives), leaving room for the images' seed + i.
    "seed": OptionRange(True, -(2**63), 2**63 - 1, text="an integer from -2**63 to 2**63 - 1"),
    "threshold": OptionRange(False, 0.0, 1.0),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 32 else text[:29] + "..."


def _problem(name: str, value: Any) -> Optional[str]:
    """None when `value` is allowed for option `name`, else what it must be (without the name)."""
    spec = OPTION_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be {spec.describe()}; got {_shown(value)}"
    if spec.integer:
        try:
            number: float = operator.index(value)
        except TypeError:
            return f"must be {spec.describe()}; got {_shown(value)}"
    else:
        number = float(value)
        if not math.isfinite(number):
            return f"must be {spec.describe()}; got {_shown(value)}"
    if not spec.admits(number):
        return f"must be {spec.describe()}; got {_shown(value)}"
    return None


def check_option(name: str, value: Any) -> Any:
    """`value` if option `name` allows it, else InputError naming `name` and its range."""
    problem = _problem(name, value)
    if problem:
        raise InputError(f"{name} {problem}")
    return value


def option_type(name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` for option `name`: argparse's message then reads
    ``argument --steps: must be an integer from 1 to 1000; got '0'``."""
    integer = OPTION_RANGES[name].integer

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        problem = None if value is None else _problem(name, value)
        if value is None or problem:
            raise argparse.ArgumentTypeError(f"must be {OPTION_RANGES[name].describe()}; got {_shown(text)}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse
