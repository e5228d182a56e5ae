"""A concept library on files: describe, list, merge, remove and rename concept files, without any model.

    describe("bo.safetensors")                          # what `unipers concepts inspect` shows
    list_folder("concepts/")                             # every concept file under a folder, recursively
    merge(["bo.safetensors", "mam.safetensors"], "pets.safetensors")
    remove("pets.safetensors", ["bo"], "mam_only.safetensors")
    rename("pets.safetensors", "bo", "rex", "pets2.safetensors")

Rows are copied bit for bit (same bytes, same dtype). Every input is checked in full (its header against
itself, then every row finite) before anything is written, and the output is written atomically: a refused
or failed operation leaves every file as it was. An output may not be an input, and an existing output is
replaced only with ``overwrite=True`` and only when it is itself a unipers concept file.

Every file written here carries ``provenance``: per concept, where it came from (source file name and
sha256, step, best metric and value, date, training config, unipers version) and its rename history. A
concept whose source has no record gets one built from that source's own metadata; a concept that has one
keeps it. The written file holds the keys that must agree (`SHARED_KEYS`), ``concepts`` and
``provenance``; a source's ``step``, ``metric``, ``value`` and ``config`` move into its concepts' records,
and other file-level keys are dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from unipers import __version__
from unipers.concepts.io import FORMAT, ConceptFileError, _checked_header, read_metadata
from unipers.concepts.names import validate_name
from unipers.io import OutputError, atomic_file
from unipers.safetensors_checks import short

SHARED_KEYS = ("base_fingerprint", "hidden_size", "dtype", "decoder_fingerprint", "connector_fingerprint",
               "describe_first")
"""File-level keys every input of a merge must agree on: the rows mean something only to those models.
The last three are absent from files saved from a bare bank (no decoder, no connector): absent agrees with
any value, as when loading, where an absent fingerprint is not checked."""
RUN_KEYS = ("step", "metric", "value", "config")
"""File-level keys of a training run's file that describe how its concepts were made."""


@dataclass
class _Source:
    """A concept file read and checked in full: its metadata and every tensor."""

    path: Path
    meta: dict
    tensors: dict
    sha256: str
    mtime: str

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.meta["concepts"]]

    def shared(self, key: str) -> Optional[str]:
        if key == "dtype" and "dtype" not in self.meta:  # older files: the rows' own dtype, when they share one
            codes = {t.dtype for t in self.tensors.values()}
            return str(codes.pop()).removeprefix("torch.") if len(codes) == 1 else None
        if key == "hidden_size":
            return str(int(self.meta[key]))
        return self.meta.get(key)

    def run_values(self) -> dict:
        """The file-level ``step``, ``metric``, ``value`` and ``config`` it has (numbers as numbers)."""
        kinds = {"step": int, "value": float}
        return {k: _number(self.meta[k], kinds.get(k)) for k in RUN_KEYS if k in self.meta}

    def rows_of(self, name: str) -> dict:
        return {k: t for k, t in self.tensors.items() if k.split("/", 1)[0] == name}

    def record(self, name: str) -> dict:
        """`name`'s provenance: the one recorded in the file, else built from the file's own metadata."""
        recorded = self.meta.get("provenance", {}).get(name)
        if recorded is not None:
            return json.loads(json.dumps(recorded))
        return {"source": self.path.name, "sha256": self.sha256, "date": self.mtime,
                "unipers_version": self.meta["unipers_version"], **self.run_values()}


def _number(text: str, kind):
    """`text` as `kind` (int, float) when it is a finite number of that kind (JSON has no NaN), else as is."""
    try:
        value = kind(text) if kind else text
    except ValueError:
        return text
    return value if kind is not float or math.isfinite(value) else text


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: str | os.PathLike) -> _Source:
    """Check `path` in full (header, then every row finite); ConceptFileError naming the file otherwise."""
    path = Path(path)
    header, meta = _checked_header(path)
    tensors = header.read(list(header.shapes))
    try:
        data, mtime = path.read_bytes(), path.stat().st_mtime
    except OSError as err:
        raise ConceptFileError(f"{path}: could not be read ({err.strerror or err})") from err
    return _Source(path, meta, tensors, hashlib.sha256(data).hexdigest(), _iso(mtime))


def layout_text(layout: dict) -> str:
    """``1+8/4/4``: the identifier, then the shared / und / gen slot counts."""
    return f"1+{layout['num_shared']}/{layout['num_und']}/{layout['num_gen']}"


# ---- reading ----------------------------------------------------------------------------------------------
def describe(path: str | os.PathLike) -> dict:
    """Everything known about a concept file, after checking it in full: the file-level keys (fingerprints,
    hidden size, dtype, unipers version, step, best metric and value, config, sha256, date) and per concept
    its name, class word, layout, head groups and provenance (recorded, or built from the file's metadata).
    A file's ``date`` is its modification time (ISO 8601, UTC); a concept's is its record's."""
    src = _read(path)
    meta = src.meta
    out = {"path": str(src.path), "format": meta["format"], "unipers_version": meta["unipers_version"],
           "sha256": src.sha256, "date": src.mtime, "hidden_size": int(meta["hidden_size"]),
           "dtype": src.shared("dtype")}
    for key in ("base_fingerprint", "decoder_fingerprint", "connector_fingerprint", "describe_first"):
        out[key] = meta.get(key)
    out.update({key: src.run_values().get(key) for key in RUN_KEYS})
    out["provenance_recorded"] = "provenance" in meta
    out["concepts"] = []
    for entry in meta["concepts"]:
        record = src.record(entry["name"])
        out["concepts"].append({**entry, "slots": layout_text(entry["layout"]), "step": record.get("step"),
                                "date": record.get("date") or src.mtime, "provenance": record})
    return out


def slot_norms(path: str | os.PathLike) -> dict[str, dict[str, list[float]]]:
    """{concept: {"embed/<group>" or "head/<group>": [L2 norm of each row]}}, after checking the file in full."""
    import torch

    src = _read(path)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in src.names}
    for key, t in src.tensors.items():
        name, part = key.split("/", 1)
        out[name][part] = torch.linalg.vector_norm(t.float(), dim=-1).tolist()
    order = [f"{kind}/{g}" for kind in ("embed", "head") for g in ("identifier", "shared", "und", "gen")]
    return {n: {k: groups[k] for k in order if k in groups} for n, groups in out.items()}


def _claims_concept_format(path: Path) -> Optional[bool]:
    """Whether the raw safetensors header says ``format: unipers.concepts/...``; None when it cannot be
    parsed (then nobody can tell what the file is, so it is reported rather than skipped)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
        return str(meta.get("format", "")).startswith(FORMAT.split("/")[0] + "/")
    except (OSError, ValueError, AttributeError):
        return None


def list_folder(folder: str | os.PathLike) -> list[dict]:
    """`describe` of every concept file under `folder` (recursively, sorted by path). Other safetensors
    files (model weights, connectors) are skipped; a file that claims the concept format, or whose header
    cannot be read at all, and fails its checks is a row ``{"path", "error"}`` (the one-line problem)."""
    folder = Path(folder)
    if not folder.exists():
        raise ConceptFileError(f"{folder}: no such folder")
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    rows = []
    for path in files:
        if _claims_concept_format(path) is False:
            continue
        try:
            rows.append(describe(path))
        except ConceptFileError as err:
            problem = str(err).removeprefix(f"{path}: ")
            rows.append({"path": str(path), "error": problem})
    return rows


# ---- writing ----------------------------------------------------------------------------------------------
def _check_out(out: str | os.PathLike, inputs: Iterable[Path], overwrite: bool) -> Path:
    """Refuse (OutputError) an output that is an input, that exists (without `overwrite`), or that exists
    and is not a unipers concept file: a mistyped path must never replace someone's weights."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise OutputError(f"{out}: a concept file's name ends in .safetensors")
    for item in inputs:
        same = out.exists() and item.exists() and os.path.samefile(out, item)  # a hard link too
        if same or out.absolute().resolve() == item.absolute().resolve():
            raise OutputError(f"{out}: is one of the inputs; write to another file (the input stays as it is)")
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise OutputError(f"{out}: already exists (--overwrite replaces a concept file unipers wrote)")
    if out.is_symlink() or not out.is_file():
        raise OutputError(f"{out}: exists and is not a file unipers wrote; --overwrite replaces only concept files")
    try:
        read_metadata(out)
    except ConceptFileError as err:
        problem = str(err).removeprefix(f"{out}: ")
        raise OutputError(f"{out}: exists and is not a unipers concept file ({problem}); --overwrite replaces "
                          "only concept files unipers wrote") from None
    return out


def _write(out: Path, shared: dict[str, str], entries: list[dict], provenance: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    codes = {t.dtype for t in tensors.values()}
    metadata = {"format": FORMAT, "unipers_version": __version__,
                **{k: v for k, v in shared.items() if v is not None and k != "dtype"},
                **({"dtype": str(codes.pop()).removeprefix("torch.")} if len(codes) == 1 else {}),
                "concepts": json.dumps(entries), "provenance": json.dumps(provenance)}
    with atomic_file(out, suffix=".safetensors.tmp") as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)
        read_metadata(tmp)  # what was written must load: checked before it replaces anything
    return out


def merge(paths: Iterable[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """One file holding every concept of `paths`, rows bit for bit. Refused (ConceptFileError naming both
    files and the key) unless the inputs agree on every key of `SHARED_KEYS` (the optional ones may be absent
    from some: absent agrees with any value, and the written file records the value the others have), or
    when a concept name occurs twice (rename one first)."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ConceptFileError(f"merge needs at least two concept files, got {len(paths)}")
    out = _check_out(out, paths, overwrite)
    sources = [_read(p) for p in paths]
    shared: dict[str, Optional[str]] = {}
    owner: dict[str, _Source] = {}
    for src in sources:
        for key in SHARED_KEYS:
            value = src.shared(key)
            if value is None:
                continue
            if key in shared and shared[key] != value:
                raise ConceptFileError(
                    f"cannot merge {owner[key].path} and {src.path}: they differ in {key!r} ({short(shared[key])} vs "
                    f"{short(value)}); concepts merge only when made for the same models")
            shared.setdefault(key, value)
            owner.setdefault(key, src)
    for src in sources:
        if src.shared("dtype") is None:  # an old file without `dtype` whose rows mix dtypes
            raise ConceptFileError(f"cannot merge {src.path}: its rows do not share one dtype")
    seen: dict[str, _Source] = {}
    entries, provenance, tensors = [], {}, {}
    for src in sources:
        for entry in src.meta["concepts"]:
            name = entry["name"]
            if name in seen:
                raise ConceptFileError(
                    f"cannot merge {seen[name].path} and {src.path}: both hold a concept named {name!r}; rename "
                    f"one first: unipers concepts rename {src.path} --concept {name} --to NEW --out NEW_FILE")
            seen[name] = src
            entries.append(entry)
            provenance[name] = src.record(name)
            tensors.update(src.rows_of(name))
    return _write(out, shared, entries, provenance, tensors)


def _strings(value) -> Iterable[str]:
    """Every string in a JSON value (object keys included), numbers as text."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif value is not None:
        yield str(value)


def _mentions(value, names: Iterable[str]) -> bool:
    """Whether `value` (any JSON) holds one of `names` at the start of a word, whatever follows (``data/bo``,
    ``bo_photos`` and ``bos`` mention ``bo``; ``backbone`` does not), in any case. The raw strings are
    searched, not their JSON text, where an escape (``\\n``) would glue a letter to the name."""
    patterns = [re.compile(rf"(?<![A-Za-z0-9]){re.escape(n)}", re.IGNORECASE) for n in names]
    return any(p.search(text) for text in _strings(value) for p in patterns)


def remove(path: str | os.PathLike, names: Iterable[str], out: str | os.PathLike, *,
           overwrite: bool = False) -> Path:
    """A new file `out` holding `path`'s concepts except `names`, rows bit for bit.

    `out` holds only the kept concepts' tensors and metadata: no byte of a removed concept's rows, and no
    record field that mentions a removed name (a kept concept's config naming the removed concept's data
    folder, a source file named after it, a rename from it) is written; such fields are dropped and listed
    under ``withheld`` in that concept's record. The kept concepts' own names and class words stay.

    What this does not undo: `path` itself is not changed (delete it yourself once `out` is checked), and
    copies of it, a run's ``RUN/concepts/step_*.safetensors`` and best files, its checkpoints and every image
    generated with the concept still hold it. The base model was never changed by training, so there is
    nothing to remove from it.
    """
    path = Path(path)
    names = list(dict.fromkeys(names))
    out = _check_out(out, [path], overwrite)
    src = _read(path)
    held = src.names
    for name in names:
        if name not in held:
            raise ConceptFileError(f"{path}: holds no concept {name!r} (it holds {', '.join(held)})")
    kept = [n for n in held if n not in names]
    if not kept:
        raise ConceptFileError(f"{path}: removing {', '.join(names)} would leave no concept; delete the file instead")
    provenance, tensors = {}, {}
    for name in kept:
        record, withheld = {}, []
        for key, value in src.record(name).items():
            if not _mentions({key: value}, names):
                record[key] = value
            elif not _mentions(key, names):  # the field's name alone may say it was withheld
                withheld.append(key)
        if withheld:
            record["withheld"] = sorted(set(record.get("withheld", [])) | set(withheld))
        provenance[name] = record
        tensors.update(src.rows_of(name))
    entries = [e for e in src.meta["concepts"] if e["name"] in kept]
    return _write(out, {k: src.shared(k) for k in SHARED_KEYS}, entries, provenance, tensors)


def rename(path: str | os.PathLike, old: str, new: str, out: str | os.PathLike, *,
           overwrite: bool = False) -> Path:
    """A new file `out` with concept `old` of `path` called `new` (rows bit for bit); the concept's record
    gains ``renamed: [..., {"from": old, "to": new}]``. Prompts then write ``<new>``."""
    path = Path(path)
    out = _check_out(out, [path], overwrite)
    src = _read(path)
    held = src.names
    if old not in held:
        raise ConceptFileError(f"{path}: holds no concept {old!r} (it holds {', '.join(held)})")
    validate_name(new)
    if new in held:
        raise ConceptFileError(f"{path}: already holds a concept named {new!r}; choose another name")
    entries, provenance, tensors = [], {}, {}
    for entry in src.meta["concepts"]:
        name = entry["name"]
        record = src.record(name)
        if name == old:
            history = record.get("renamed") if isinstance(record.get("renamed"), list) else []
            record["renamed"] = [*history, {"from": old, "to": new}]
            entry = {**entry, "name": new}
        entries.append(entry)
        provenance[entry["name"]] = record
        for key, t in src.rows_of(name).items():
            tensors[f"{entry['name']}/{key.split('/', 1)[1]}"] = t
    return _write(out, {k: src.shared(k) for k in SHARED_KEYS}, entries, provenance, tensors)
