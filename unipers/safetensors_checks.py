"""Check a safetensors file against what its own metadata promises, before anything is built from it.

    header = read_header(path, ConceptFileError, what="concept file")   # metadata, shapes, dtypes only
    hidden = header.integer("hidden_size", 1, 65536)                    # required, well-typed, bounded
    header.expect_tensors({"bo/embed/identifier": (1, hidden), ...})    # exact keys, exact shapes, floats
    tensors = header.read(["bo/embed/identifier"])                      # then the data, each checked finite

`read_header` keeps only the header: the metadata, and each tensor's shape and dtype through safetensors'
``get_slice``, which reads no tensor data. A file whose metadata claims a billion slots in a few kilobytes
therefore fails on comparing numbers, before any allocation. Every failure raises the caller's error class
with one line: the file, then the key, then the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, NoReturn, Optional

import torch

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
"""The dtypes a file of trained rows or weights may hold. Integer or bool tensors would be cast to floats
without a word, and 8-bit floats lose what was trained, so both are refused."""
DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool"}
_INT_TEXT = re.compile(r"[0-9]{1,18}")


def dtype_name(code: str) -> str:
    """torch's name for a safetensors dtype code ("F32" -> "float32")."""
    return DTYPE_NAMES.get(code, code.lower())


def dtype_code(dtype: torch.dtype) -> Optional[str]:
    """The safetensors code of a float dtype (torch.float32 -> "F32"), None for any other dtype."""
    return next((code for code, d in FLOAT_DTYPES.items() if d == dtype), None)


def short(value: Any, limit: int = 60) -> str:
    """repr(value) on one line, cut to `limit` characters: a message quotes the bad value, not a novel."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Header:
    """A safetensors file's header: `metadata` (str -> str), and `shapes` / `dtypes` per tensor key."""

    def __init__(self, path: Path, error: type[Exception], metadata: dict[str, str],
                 shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]):
        self.path, self.error = path, error
        self.metadata, self.shapes, self.dtypes = metadata, shapes, dtypes

    def fail(self, problem: str) -> NoReturn:
        """Raise the caller's error: ``<path>: <problem>``, on one line."""
        raise self.error(f"{self.path}: {' '.join(str(problem).split())}")

    # ---- metadata -------------------------------------------------------------------------------------
    def text(self, key: str) -> str:
        """A required metadata value."""
        if key not in self.metadata:
            self.fail(f"metadata {key!r} is missing")
        return self.metadata[key]

    def integer(self, key: str, low: int, high: int) -> int:
        """A required metadata value holding a whole number in [low, high]."""
        text = self.text(key)
        if not _INT_TEXT.fullmatch(text):
            self.fail(f"metadata {key!r} must be a whole number, got {short(text)}")
        return self.check_int(int(text), f"metadata {key!r}", low, high)

    def number(self, key: str, low: float, high: float) -> float:
        """A required metadata value holding a finite number in [low, high]."""
        text = self.text(key)
        try:
            value = float(text)
        except ValueError:
            self.fail(f"metadata {key!r} must be a number, got {short(text)}")
        return self.check_number(value, f"metadata {key!r}", low, high)

    def json(self, key: str) -> Any:
        """A required metadata value holding JSON, parsed."""
        text = self.text(key)
        try:
            return json.loads(text)
        except ValueError as err:
            self.fail(f"metadata {key!r} is not valid JSON ({err})")

    # ---- values inside the metadata -------------------------------------------------------------------
    def check_int(self, value: Any, where: str, low: int, high: int) -> int:
        """`value` is an int (not a bool, not 1e9) in [low, high]; `where` names it in the message."""
        if type(value) is not int:
            self.fail(f"{where} must be a whole number, got {short(value)}")
        if not low <= value <= high:
            self.fail(f"{where} is {value}, outside the allowed {low}..{high}")
        return value

    def check_number(self, value: Any, where: str, low: float, high: float) -> float:
        """`value` is a finite int or float in [low, high]."""
        if type(value) not in (int, float) or not math.isfinite(value):
            self.fail(f"{where} must be a finite number, got {short(value)}")
        if not low <= value <= high:
            self.fail(f"{where} is {value}, outside the allowed {low}..{high}")
        return float(value)

    def check_keys(self, mapping: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
        """`mapping` is a JSON object with every key of `required` and nothing outside required + optional."""
        if not isinstance(mapping, dict):
            self.fail(f"{where} must be a JSON object, got {short(mapping)}")
        required = list(required)
        missing = [k for k in required if k not in mapping]
        if missing:
            self.fail(f"{where} lacks the key {missing[0]!r}")
        unknown = sorted(set(mapping) - set(required) - set(optional))
        if unknown:
            self.fail(f"{where} has the unexpected key {short(unknown[0])}")
        return mapping

    # ---- tensors --------------------------------------------------------------------------------------
    def expect_tensors(self, expected: Mapping[str, tuple[int, ...]], dtype: Optional[str] = None,
                       exact: bool = True) -> None:
        """The file holds exactly the keys of `expected` (with ``exact=False``: only keys of it), each of
        exactly that shape and of a float dtype (of `dtype`, a safetensors code, when given)."""
        missing = [k for k in expected if k not in self.shapes]
        if exact and missing:
            self.fail(f"tensor {missing[0]!r} is missing ({len(missing)} of the {len(expected)} tensors the "
                      "metadata implies are absent)")
        unexpected = [k for k in self.shapes if k not in expected]
        if unexpected:
            self.fail(f"unexpected tensor {short(unexpected[0])} (the metadata implies no such tensor; "
                      f"{len(unexpected)} such)")
        for key, shape in self.shapes.items():
            want = tuple(expected[key])
            if shape != want:
                self.fail(f"tensor {key!r} has shape {list(shape)}, but the metadata implies {list(want)}")
            code = self.dtypes[key]
            if code not in FLOAT_DTYPES:
                self.fail(f"tensor {key!r} has dtype {dtype_name(code)}, not a floating dtype "
                          f"(allowed: {', '.join(dtype_name(c) for c in FLOAT_DTYPES)})")
            if dtype is not None and code != dtype:
                self.fail(f"tensor {key!r} has dtype {dtype_name(code)}, but the file was saved as {dtype_name(dtype)}")

    def read(self, keys: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of `keys`, after `expect_tensors`; each must match its header entry and be finite."""
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(self.path), framework="pt", device=str(device)) as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        except Exception as err:  # the file changed or vanished since its header was read
            self.fail(f"could not read tensor data ({' '.join(str(err).split())})")
        for key, t in out.items():
            if tuple(t.shape) != self.shapes.get(key) or dtype_code(t.dtype) != self.dtypes.get(key):
                self.fail(f"tensor {key!r} changed while the file was read; load it again")
            # A NaN or inf anywhere makes the sum non-finite; the exact test (20x slower on a CPU) runs
            # only then, since a sum of finite values can overflow too (float32 accumulation keeps that
            # rare for 16-bit rows, whose own sum overflows at 65504).
            if not math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    self.fail(f"tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)")
        return out


def read_header(path: str | os.PathLike, error: type[Exception], what: str = "safetensors file") -> Header:
    """Open `path` and keep its header only (no tensor data is read). A missing file or one safetensors
    cannot parse (truncated, not safetensors) raises `error` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes, dtypes = {}, {}
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key], dtypes[key] = tuple(int(n) for n in piece.get_shape()), str(piece.get_dtype())
    except Exception as err:
        raise error(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from err
    return Header(path, error, metadata, shapes, dtypes)
