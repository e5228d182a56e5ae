"""Concept files: safetensors holding only concept rows, plus the metadata needed to use them safely.

Tensors are named ``<name>/embed/<group>`` and ``<name>/head/<group>``. The safetensors header carries:
``format``, ``unipers_version``, ``base_fingerprint`` (of the AR backbone), ``hidden_size`` and
``concepts`` (JSON: name, class word, slot layout, head groups per concept). A file can hold one concept or
many; loading checks the base fingerprint first and refuses a mismatch, naming both fingerprints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

from unipers import __version__
from unipers.concepts.bank import ConceptBank, SlotLayout
from unipers.errors import UnipersError

FORMAT = "unipers.concepts/1"


class ConceptFileError(UnipersError, ValueError):
    """A concept file that cannot be loaded here; the message names the file and the problem."""


def save_concepts(bank: ConceptBank, path: str | os.PathLike, *, base_fingerprint: str,
                  names: Optional[Iterable[str]] = None, extra: Optional[dict[str, str]] = None) -> Path:
    """Write the given concepts (default: all) atomically to `path`."""
    from unipers.io import save_safetensors_atomic

    names = list(bank.names if names is None else names)
    tensors, entries = {}, []
    for name in names:
        info, rows = bank.info[name], bank.rows[name]
        tensors.update({f"{name}/embed/{g}": p for g, p in rows.embed.items()})
        tensors.update({f"{name}/head/{g}": p for g, p in rows.head.items()})
        entries.append({"name": name, "class_word": info.class_word, "layout": info.layout.to_dict(),
                        "head_groups": list(info.head_groups)})
    metadata = {
        "format": FORMAT,
        "unipers_version": __version__,
        "base_fingerprint": base_fingerprint,
        "hidden_size": str(bank.hidden_size),
        "concepts": json.dumps(entries),
        **(extra or {}),
    }
    return save_safetensors_atomic(tensors, path, metadata)


def read_metadata(path: str | os.PathLike) -> dict:
    """The header of a concept file, with ``concepts`` parsed. Reads no tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"{path}: no such concept file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:
        raise ConceptFileError(f"{path}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise ConceptFileError(f"{path}: not a unipers concept file (format {meta.get('format')!r}, expected {FORMAT!r})")
    meta["concepts"] = json.loads(meta["concepts"])
    return meta


def load_concepts(bank: ConceptBank, path: str | os.PathLike, *, base_fingerprint: str,
                  vocabulary: Iterable[str] = (), names: Optional[Iterable[str]] = None) -> list[str]:
    """Add the concepts of `path` (default: all it holds) to `bank`; returns their names."""
    from safetensors import safe_open

    meta = read_metadata(path)
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
    with safe_open(str(path), framework="pt") as f:
        for name in wanted:
            e = entries[name]
            prefix = f"{name}/"
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            bank.add(
                name, class_word=e["class_word"], layout=SlotLayout(**e["layout"]), head_groups=e["head_groups"],
                vocabulary=vocabulary,
                embed_init={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("embed/")},
                head_init={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("head/")},
            )
    return wanted
