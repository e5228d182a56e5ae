"""Concept files: safetensors holding only concept rows, plus the metadata needed to use them safely.

Tensors are named ``<name>/embed/<group>`` and ``<name>/head/<group>``. The safetensors header carries:
``format``, ``unipers_version``, ``base_fingerprint`` (of the AR backbone), ``hidden_size``, ``dtype`` (of
the rows; files written before it was recorded lack it) and ``concepts`` (JSON: name, class word, slot
layout, head groups per concept). A file can hold one concept or many; loading checks the base fingerprint
first and refuses a mismatch, naming both fingerprints. An optional ``provenance`` (JSON: concept name ->
object: step, metric/value, date, source file and sha256, training config, rename history) is written by
`unipers.concepts.library` so that a merged file keeps where each of its concepts came from.

Nothing in a file is trusted before its header has been checked against itself (`read_metadata`, on the
header alone): the required keys present and well-typed, slot counts at most ``MAX_SLOTS``, exactly the
tensors the layouts imply, each of exactly the implied shape and of one float dtype. Only then are the
rows read, and each must be finite. A failure is a ``ConceptFileError`` naming the file, key and problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

from unipers import __version__
from unipers.concepts.bank import GROUPS, MAX_SLOTS, ConceptBank, SlotLayout
from unipers.concepts.names import ConceptNameError, validate_name
from unipers.errors import UnipersError
from unipers.safetensors_checks import FLOAT_DTYPES, Header, dtype_code, dtype_name, read_header, short

FORMAT = "unipers.concepts/1"
MAX_HIDDEN_SIZE = 65536
"""The largest hidden size a concept file may declare (the largest open models use 16384)."""
_ENTRY_KEYS = ("name", "class_word", "layout", "head_groups")


class ConceptFileError(UnipersError, ValueError):
    """A concept file that cannot be loaded here; the message names the file and the problem."""


def save_concepts(bank: ConceptBank, path: str | os.PathLike, *, base_fingerprint: str,
                  names: Optional[Iterable[str]] = None, extra: Optional[dict[str, str]] = None) -> Path:
    """Write the given concepts (default: all) atomically to `path`. Rows holding NaN or inf are refused
    (ValueError naming the concept): such a file would load, and answer nonsense, everywhere it went."""
    import torch

    from unipers.io import save_safetensors_atomic

    names = list(bank.names if names is None else names)
    tensors, entries = {}, []
    for name in names:
        info, rows = bank.info[name], bank.rows[name]
        for kind, table in (("embed", rows.embed), ("head", rows.head)):
            for group, p in table.items():
                bad = int((~torch.isfinite(p.detach())).sum())
                if bad:
                    raise ValueError(f"{path}: not saved: concept {name!r} has {bad} non-finite value(s) (NaN or "
                                     f"inf) in its {kind} rows of group {group!r}")
                tensors[f"{name}/{kind}/{group}"] = p
        entries.append({"name": name, "class_word": info.class_word, "layout": info.layout.to_dict(),
                        "head_groups": list(info.head_groups)})
    codes = {dtype_code(t.dtype) for t in tensors.values()}
    metadata = {
        "format": FORMAT,
        "unipers_version": __version__,
        "base_fingerprint": base_fingerprint,
        "hidden_size": str(bank.hidden_size),
        "concepts": json.dumps(entries),
        # One float dtype for every row (the bank's): the loader then refuses a tensor of another one.
        **({"dtype": dtype_name(codes.pop())} if len(codes) == 1 and None not in codes else {}),
        **(extra or {}),
    }
    return save_safetensors_atomic(tensors, path, metadata)


def _entry_tensors(header: Header, entry, index: int, hidden: int, seen: set[str]) -> dict[str, tuple[int, int]]:
    """Check one entry of ``concepts``; the tensors (key -> shape) its layout and head groups imply."""
    where = f"metadata 'concepts' entry {index}"
    header.check_keys(entry, where, _ENTRY_KEYS)
    name = entry["name"]
    if not isinstance(name, str):
        header.fail(f"{where}: name must be a string, got {short(name)}")
    try:
        validate_name(name)
    except ConceptNameError as err:
        header.fail(f"{where}: {err}")
    if name in seen:
        header.fail(f"{where}: concept {name!r} is listed twice")
    seen.add(name)
    where = f"metadata 'concepts', concept {name!r}:"
    if entry["class_word"] is not None and not isinstance(entry["class_word"], str):
        header.fail(f"{where} class_word must be a string or null, got {short(entry['class_word'])}")
    counts = header.check_keys(entry["layout"], f"{where} layout", ("num_shared", "num_und", "num_gen"))
    layout = SlotLayout(**{k: header.check_int(v, f"{where} layout {k}", 0, MAX_SLOTS) for k, v in counts.items()})
    groups = entry["head_groups"]
    if (not isinstance(groups, list) or not all(isinstance(g, str) and g in GROUPS for g in groups)
            or len(set(groups)) != len(groups)):
        header.fail(f"{where} head_groups must be a list of distinct groups of {', '.join(GROUPS)}, "
                    f"got {short(groups)}")
    out = {f"{name}/embed/{g}": (layout.count(g), hidden) for g in GROUPS if layout.count(g)}
    out.update({f"{name}/head/{g}": (layout.count(g), hidden) for g in groups if layout.count(g)})
    return out


def _checked_header(path: str | os.PathLike) -> tuple[Header, dict]:
    """The file's header, checked against itself (no tensor data read), and its metadata with ``concepts``
    parsed. Raises ConceptFileError naming the file, the key and the problem."""
    header = read_header(path, ConceptFileError, what="concept file")
    meta = header.metadata
    if meta.get("format") != FORMAT:
        header.fail(f"not a unipers concept file (format {short(meta.get('format'))}, expected {FORMAT!r})")
    header.text("unipers_version")
    header.text("base_fingerprint")
    hidden = header.integer("hidden_size", 1, MAX_HIDDEN_SIZE)
    code = None
    if "dtype" in meta:
        code = {dtype_name(c): c for c in FLOAT_DTYPES}.get(meta["dtype"])
        if code is None:
            header.fail(f"metadata 'dtype' is {short(meta['dtype'])}, not one of "
                        f"{', '.join(dtype_name(c) for c in FLOAT_DTYPES)}")
    entries = header.json("concepts")
    if not isinstance(entries, list):
        header.fail(f"metadata 'concepts' must be a JSON list, got {short(entries)}")
    expected, seen = {}, set()
    for i, entry in enumerate(entries):
        expected.update(_entry_tensors(header, entry, i, hidden, seen))
    header.expect_tensors(expected, dtype=code)
    parsed = {"concepts": entries}
    if "provenance" in meta:
        parsed["provenance"] = _checked_provenance(header, seen)
    return header, {**meta, **parsed}


def _checked_provenance(header: Header, names: set[str]) -> dict:
    """``provenance``: a JSON object from concept names of this file (some or all) to JSON objects."""
    provenance = header.json("provenance")
    if not isinstance(provenance, dict):
        header.fail(f"metadata 'provenance' must be a JSON object (concept name -> record), got {short(provenance)}")
    for name, record in provenance.items():
        if name not in names:
            header.fail(f"metadata 'provenance' has a record for {short(name)}, which is no concept of this file")
        if not isinstance(record, dict):
            header.fail(f"metadata 'provenance', concept {name!r}: must be a JSON object, got {short(record)}")
    return provenance


def read_metadata(path: str | os.PathLike) -> dict:
    """The header of a concept file, with ``concepts`` (and ``provenance``, when present) parsed, after
    checking the file against it (see the module docstring). Reads no tensors."""
    return _checked_header(path)[1]


def load_concepts(bank: ConceptBank, path: str | os.PathLike, *, base_fingerprint: str,
                  vocabulary: Iterable[str] = (), names: Optional[Iterable[str]] = None) -> list[str]:
    """Add the concepts of `path` (default: all it holds) to `bank`; returns their names. Every check,
    names included, runs before the first concept is added: a refused file leaves the bank as it was."""
    header, meta = _checked_header(path)
    if meta["base_fingerprint"] != base_fingerprint:
        raise ConceptFileError(
            f"{path}: trained on base model {meta['base_fingerprint']}, but the loaded base is {base_fingerprint}; "
            "load it with the backbone it was trained on"
        )
    if int(meta["hidden_size"]) != bank.hidden_size:
        raise ConceptFileError(f"{path}: hidden size {meta['hidden_size']} does not match the base's {bank.hidden_size}")
    entries = {e["name"]: e for e in meta["concepts"]}
    wanted = list(entries if names is None else names)
    for name in wanted:
        if name not in entries:
            raise ConceptFileError(f"{path}: holds no concept {name!r} (it holds {', '.join(entries)})")
    vocabulary, taken = set(vocabulary), set(bank.info)
    for name in wanted:
        taken.add(validate_name(name, vocabulary=vocabulary, taken=taken))
    rows = header.read([k for k in header.shapes if k.split("/", 1)[0] in wanted])
    for name in wanted:
        e = entries[name]
        part = {kind: {g: rows[f"{name}/{kind}/{g}"] for g in GROUPS if f"{name}/{kind}/{g}" in rows}
                for kind in ("embed", "head")}
        bank.add(name, class_word=e["class_word"], layout=SlotLayout(**e["layout"]), head_groups=e["head_groups"],
                 vocabulary=vocabulary, embed_init=part["embed"], head_init=part["head"])
    return wanted
