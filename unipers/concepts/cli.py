"""`unipers concepts`: list, inspect, merge, remove and rename concept files (no model is loaded).

    unipers concepts list runs/                      # every concept file below, one row per concept
    unipers concepts inspect bo.safetensors          # everything in full: fingerprints, norms, config
    unipers concepts merge bo.safetensors mam.safetensors --out pets.safetensors
    unipers concepts remove pets.safetensors --concept bo --out mam_only.safetensors
    unipers concepts rename pets.safetensors --concept bo --to rex --out pets2.safetensors

``list`` exits 2 after printing its table when a file below the folder claims the concept format and fails
its checks (shown as an error row), so a script notices a broken file. See docs/concepts.md.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="concepts_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="every concept file under a folder: name, class word, layout, bases, step, date")
    p.add_argument("folder", metavar="DIR", help="a folder, searched recursively for *.safetensors (or one file)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("inspect", help="one concept file in full: fingerprints, provenance, per-slot norms, config")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = sub.add_parser("merge", help="one file with every concept of the inputs (same base, decoder, connector)")
    p.add_argument("files", nargs="+", metavar="FILE")
    _out(p)
    p = sub.add_parser("remove", help="a new file without the given concepts (the input is left as it is)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--concept", action="append", required=True, metavar="NAME", help="a concept to drop (repeatable)")
    _out(p)
    p = sub.add_parser("rename", help="a new file with one concept renamed (rows bit for bit; history recorded)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--concept", required=True, metavar="NAME", help="the concept's current name")
    p.add_argument("--to", required=True, metavar="NEW", help="its new name")
    _out(p)


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the file to write (never an input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a concept file unipers wrote")


def _short(fp) -> str:
    return fp[:8] if fp else "-"


def _date(text) -> str:
    return text[:16].replace("T", " ") if text else "-"


def table(rows: list[list[str]]) -> str:
    """Aligned columns; a row of two cells (a path and an error) spans the rest and sets no widths."""
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    widths[0] = max(len(r[0]) for r in rows)
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _list(args) -> int:
    from pathlib import Path

    from unipers.concepts.io import ConceptFileError
    from unipers.concepts.library import list_folder

    files = list_folder(args.folder)
    broken = [f for f in files if "error" in f]
    if args.json:
        print(json.dumps(files, indent=2))
    elif not files:
        print(f"no concept files under {args.folder}")
    else:
        root = Path(args.folder)
        rows = [["path", "name", "class word", "layout", "base", "decoder", "step", "date"]]
        for f in files:
            path = str(Path(f["path"]).relative_to(root)) if root.is_dir() else f["path"]
            if "error" in f:
                rows.append([path, f"error: {f['error']}"])
                continue
            for c in f["concepts"]:
                step = c["step"]
                rows.append([path, c["name"], c["class_word"] or "-", c["slots"], _short(f["base_fingerprint"]),
                             _short(f["decoder_fingerprint"]), "-" if step is None else str(step), _date(c["date"])])
        print(table(rows))
    if broken:
        raise ConceptFileError(f"{len(broken)} file(s) under {args.folder} failed their checks, first "
                               f"{broken[0]['path']}: {broken[0]['error']}")
    return 0


def _inspect(args) -> int:
    from unipers.concepts.library import describe, slot_norms

    info = describe(args.file)
    norms = slot_norms(args.file)
    for c in info["concepts"]:
        c["norms"] = norms[c["name"]]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [info["path"]]
    for key in ("format", "unipers_version", "sha256", "date", "base_fingerprint", "decoder_fingerprint",
                "connector_fingerprint", "describe_first", "hidden_size", "dtype", "step", "metric", "value"):
        if info[key] is not None:
            lines.append(f"  {key:<22}{info[key]!r}" if key == "describe_first" else f"  {key:<22}{info[key]}")
    for c in info["concepts"]:
        record = c["provenance"]
        lines += ["", f"concept {c['name']}", f"  {'class word':<22}{c['class_word'] or '-'}",
                  f"  {'layout':<22}{c['slots']} (identifier + shared/und/gen)",
                  f"  {'head groups':<22}{', '.join(c['head_groups']) or '-'}"]
        for key, value in record.items():
            if key == "renamed":
                value = ", ".join(f"{r.get('from')} -> {r.get('to')}" for r in value if isinstance(r, dict))
            if key != "config" or value != info["config"]:
                lines += _field(key, value)
        lines.append("  norms (L2 of each row)")
        for group, values in c["norms"].items():
            lines.append(f"    {group:<20}{' '.join(f'{v:.4g}' for v in values)}")
    if info["config"]:
        lines += ["", "config", *("  " + line for line in info["config"].rstrip("\n").splitlines())]
    print("\n".join(lines))
    return 0


def _field(key: str, value) -> list[str]:
    if isinstance(value, str) and "\n" in value:
        return [f"  {key}", *("    " + line for line in value.rstrip("\n").splitlines())]
    return [f"  {key:<22}{value if isinstance(value, (str, int, float)) else json.dumps(value)}"]


def main(args: argparse.Namespace) -> int:
    from unipers.concepts import library

    action = args.concepts_command
    if action == "list":
        return _list(args)
    if action == "inspect":
        return _inspect(args)
    if action == "merge":
        out = library.merge(args.files, args.out, overwrite=args.overwrite)
        print(f"wrote {out}: the concepts of {', '.join(args.files)}")
    elif action == "remove":
        out = library.remove(args.file, args.concept, args.out, overwrite=args.overwrite)
        print(f"wrote {out} without {', '.join(args.concept)}. {args.file} still holds them, as do its copies, "
              "the run folder it came from and images made with them; delete those yourself (docs/concepts.md)")
    else:
        out = library.rename(args.file, args.concept, args.to, args.out, overwrite=args.overwrite)
        print(f"wrote {out}: {args.concept} is now <{args.to}>")
    return 0
