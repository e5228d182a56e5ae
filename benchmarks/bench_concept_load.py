"""Concept-file loading, side by side: with the header and finite checks of `unipers.concepts.io` vs without.

    python benchmarks/bench_concept_load.py                  # tiny file + a 7B-sized one, 200 loads per arm
    python benchmarks/bench_concept_load.py --loads 1000 --rounds 5
    python benchmarks/bench_concept_load.py --quick          # tiny file only, 50 loads (smoke test)

Files: **tiny**, the embedded tiny backbone's concept file (one concept ``bo``, hidden 64, the default layout
8 shared + 4 und + 4 gen, identifier head row: 18 rows in 5 tensors, written by ``ARBackbone.add_concept`` and
``save_concepts``); **7b-sized**, one concept at Anole-7B's hidden size 4096 with 16 + 8 + 8 slots and every
head row (66 rows in 8 tensors, 1 MiB), written by ``save_concepts`` from a bare ``ConceptBank``.

Arms, each timed per call (``time.perf_counter``) ``--loads`` times per round, in alternating order over
``--rounds`` rounds, one torch thread:

- **raw read**: ``safe_open`` + ``metadata()`` + ``get_tensor`` of every key: what reading the file costs.
- **unchecked load**: the loader as it was before the checks (the metadata parsed and trusted, the rows of
  every concept read and handed to ``ConceptBank.add``).
- **checked load**: ``load_concepts`` (header checked against itself without reading data, then the rows
  read, each checked finite, then ``ConceptBank.add``).
- **header check alone**: ``read_metadata``, which runs the same header checks and reads no tensor.

Each load goes into an emptied bank (``bank.clear()``, not timed). Prints a markdown table of the medians,
and the checked load's extra time over the unchecked one; writes JSON to ``--out`` (benchmarks/results/ is
not versioned).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARMS = ("raw read", "unchecked load", "checked load", "header check alone")
FINGERPRINT = "bench"


def tiny_file(folder: Path) -> tuple[Path, dict]:
    from unipers.concepts.io import save_concepts
    from unipers.models.backbone import ARBackbone
    from unipers.models.tiny import ensure_tiny

    backbone = ARBackbone.from_pretrained(ensure_tiny()[0])
    backbone.add_concept("bo", "dog")
    path = save_concepts(backbone.bank, folder / "tiny.safetensors", base_fingerprint=FINGERPRINT)
    return path, {"base_vocab_size": backbone.bank.base_vocab_size, "hidden_size": backbone.bank.hidden_size,
                  "head_rows": backbone.bank.head_rows}


def sized_file(folder: Path) -> tuple[Path, dict]:
    import torch

    from unipers.concepts.bank import ConceptBank, SlotLayout
    from unipers.concepts.io import save_concepts

    shape = {"base_vocab_size": 65536, "hidden_size": 4096, "head_rows": "all"}
    bank = ConceptBank(shape["base_vocab_size"], shape["hidden_size"], SlotLayout(16, 8, 8), head_rows="all")
    bank.add("bo", class_word="dog")
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(generator=torch.Generator().manual_seed(0))
    return save_concepts(bank, folder / "7b.safetensors", base_fingerprint=FINGERPRINT), shape


def unchecked_load(bank, path: Path) -> list[str]:
    """The loader before the checks: metadata parsed and trusted, rows handed to the bank as they come."""
    from safetensors import safe_open

    from unipers.concepts.bank import SlotLayout

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        if meta["base_fingerprint"] != FINGERPRINT or int(meta["hidden_size"]) != bank.hidden_size:
            raise ValueError("wrong base")
        entries = json.loads(meta["concepts"])
        for e in entries:
            prefix = f"{e['name']}/"
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            bank.add(e["name"], class_word=e["class_word"], layout=SlotLayout(**e["layout"]),
                     head_groups=e["head_groups"],
                     embed_init={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("embed/")},
                     head_init={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("head/")})
    return [e["name"] for e in entries]


def arms(bank, path: Path) -> dict:
    from safetensors import safe_open

    from unipers.concepts.io import load_concepts, read_metadata

    def raw():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            return meta, {k: f.get_tensor(k) for k in f.keys()}

    return {
        "raw read": raw,
        "unchecked load": lambda: unchecked_load(bank, path),
        "checked load": lambda: load_concepts(bank, path, base_fingerprint=FINGERPRINT),
        "header check alone": lambda: read_metadata(path),
    }


def bench(name: str, path: Path, shape: dict, loads: int, rounds: int) -> dict:
    import torch

    from unipers.concepts.bank import ConceptBank

    bank = ConceptBank(shape["base_vocab_size"], shape["hidden_size"], head_rows=shape["head_rows"])
    fns = arms(bank, path)
    # Both loaders must leave the same rows in the bank: the checks change speed, not what is loaded.
    fns["unchecked load"]()
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.clear()
    fns["checked load"]()
    assert before.keys() == bank.state_dict().keys()
    assert all(torch.equal(v, before[k]) for k, v in bank.state_dict().items()), "the two loaders differ"
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    for r in range(rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:  # alternate, so drifting load hits every arm alike
            fn = fns[arm]
            bank.clear()
            fn()  # warm-up
            for _ in range(loads):
                bank.clear()
                t = time.perf_counter()
                fn()
                times[arm].append(time.perf_counter() - t)
    bank.clear()
    median = {a: statistics.median(ts) for a, ts in times.items()}
    return {"file": name, "bytes": path.stat().st_size, "loads_per_arm": loads * rounds,
            "median_s": median, "fastest_s": {a: min(ts) for a, ts in times.items()},
            "check_overhead_s": median["checked load"] - median["unchecked load"],
            "check_overhead_ratio": median["checked load"] / median["unchecked load"]}


def table(results: list[dict]) -> str:
    head = ["", *(f"{r['file']} ({r['bytes'] / 1024:,.0f} KiB)" for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ARMS:
        cells = [f"{arm} (median)", *(f"{r['median_s'][arm] * 1e6:,.0f} µs" for r in results)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(["checked - unchecked", *(f"{r['check_overhead_s'] * 1e6:+,.0f} µs "
                                     f"({r['check_overhead_ratio']:.2f}x)" for r in results)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", type=int, default=200, help="timed loads per arm and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, in alternating arm order")
    p.add_argument("--quick", action="store_true", help="tiny file only, 50 loads, 1 round")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "concept_load.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.loads, args.rounds = 50, 1
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [("tiny", *tiny_file(Path(tmp)))]
        if not args.quick:
            files.append(("7b-sized", *sized_file(Path(tmp))))
        for name, path, shape in files:
            r = bench(name, path, shape, args.loads, args.rounds)
            print(f"  {name}: " + ", ".join(f"{a} {r['median_s'][a] * 1e6:,.0f} µs" for a in ARMS), flush=True)
            results.append(r)
    md = table(results)
    print()
    print(md)
    payload = {
        "benchmark": "concept_load",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"loads": args.loads, "rounds": args.rounds, "torch_threads": 1},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "machine": platform.machine()},
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "table_markdown": md,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
