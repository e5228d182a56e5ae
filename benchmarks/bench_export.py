"""Peak memory of `unipers export` against the size of the model, the old way beside the new one.

    python benchmarks/bench_export.py                  # medium model (100M parameters, 193 MiB in bf16), ~40 s
    python benchmarks/bench_export.py --quick          # a smaller one (37 MiB), ~25 s
    python benchmarks/bench_export.py --hidden 2048 --layers 8 --vocab 16384   # 769 MiB, ~90 s

The base is a random Chameleon written by ``build_tiny_chameleon`` at a larger hidden size (as
benchmarks/bench_training.py builds its medium model) and saved again in bfloat16, the dtype real
Anole / Chameleon checkpoints ship in; one concept (unipers slot layout: 1 + 8 + 4 + 4 rows) is saved
for it. Each arm runs in its own subprocess, which imports, loads the base, loads the concept and exports:

- **old**, the copying export, for comparison: load in float32 whatever the base's dtype,
  ``copy.deepcopy`` the model and tokenizer, ``resize_token_embeddings``, copy the rows in,
  ``save_pretrained`` with transformers' default shard size (one file here).
- **new**, ``unipers export``: the base's own dtype (``base_dtype``), ``export_merged`` writing the
  loaded model with merged tables swapped in (no copy of the model), 2 GB shards.

Reported per arm, over the process's memory after the imports and as multiples of the base's size on
disk: the loaded model's tensors; RSS after the load; the peak RSS (VmHWM) of the load and of the export
(the peak counter is reset after the load, where /proc/self/clear_refs allows it); the same for RssAnon,
sampled every millisecond (VmHWM also counts the safetensors pages the loader maps, which the kernel may
drop); and the bytes written. Check: the two exports hold the same values (the old one's float32 tensors cast to bf16
equal the new one's), and the new one is in bf16.

Prints a markdown table and writes JSON (default benchmarks/results/export.json, export_quick.json with
--quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1024**2
SIZES = {
    # Tables (embedding + head) are 17% of the parameters here (Anole-7B: 8%): they are what the new export adds.
    "medium": dict(hidden_size=1024, num_layers=8, num_heads=16, vocab_size=8192, num_image_tokens=2048),
    "quick": dict(hidden_size=512, num_layers=4, num_heads=8, vocab_size=8192, num_image_tokens=1024),
}


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def build(root: Path, size: dict) -> tuple[Path, Path]:
    """A bf16 random Chameleon at `root/base` and a concept file for it."""
    import torch
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.concepts.io import save_concepts
    from unipers.models.backbone import ARBackbone
    from unipers.models.tiny import build_tiny_chameleon

    fp32 = build_tiny_chameleon(root / "fp32", **size, seed=0)
    base = root / "base"
    ChameleonForConditionalGeneration.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(base)
    AutoProcessor.from_pretrained(fp32).save_pretrained(base)
    for p in fp32.iterdir():
        p.unlink()
    fp32.rmdir()
    bb = ARBackbone.from_pretrained(base, dtype="bfloat16")
    bb.add_concept("bo", "dog")
    concept = save_concepts(bb.bank, root / "bo.safetensors", base_fingerprint=bb.base_fingerprint)
    return base, concept


def old_export(backbone, out_dir: Path) -> None:
    """The copying export: a deep copy of the whole model, resized and written in one shard."""
    import copy

    import torch

    from unipers.concepts.bank import GROUPS
    from unipers.models.export import token_names

    bank, V = backbone.bank, backbone.vocab_size
    model = copy.deepcopy(backbone.model)
    tokenizer = copy.deepcopy(backbone.tokenizer)
    model.resize_token_embeddings(V + bank.num_tokens, mean_resizing=False)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    suppress = []
    with torch.no_grad():
        for name, info in bank.info.items():
            rows = bank.rows[name]
            for group in GROUPS:
                start, end = info.span(group)
                if start == end:
                    continue
                embed[start:end] = rows.embed[group].to(embed.dtype)
                if group in rows.head:
                    head[start:end] = rows.head[group].to(head.dtype)
                else:
                    head[start:end] = 0
                    suppress += list(range(start, end))
            tokenizer.add_tokens(token_names(info), special_tokens=True)
    model.config.vocabulary_map = tokenizer.get_vocab()
    if suppress:
        model.generation_config.suppress_tokens = suppress
    processor = copy.copy(backbone.processor)
    processor.tokenizer = tokenizer
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


class AnonPeak:
    """The peak of RssAnon (memory only this process holds: tensors, copies), sampled every millisecond on a
    thread. VmHWM counts the safetensors pages the loader maps too, which the kernel can drop at will."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(0.001)

    def __enter__(self) -> "AnonPeak":
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker(arm: str, base: Path, concept: Path, out: Path) -> dict:
    from benchmarks._memory import hwm_bytes, reset_hwm, rss_bytes

    # Imported before the baseline, so that the peaks count the model and the export, not the libraries.
    import torch  # noqa: F401
    import transformers.models.chameleon.modeling_chameleon  # noqa: F401
    from transformers import AutoProcessor, ChameleonForConditionalGeneration  # noqa: F401

    from unipers.concepts.io import load_concepts
    from unipers.models.backbone import ARBackbone
    from unipers.models.export import base_dtype, export_merged

    reset_hwm()
    rss0, anon0 = rss_bytes(), AnonPeak.now()
    t0 = time.perf_counter()
    dtype = "float32" if arm == "old" else base_dtype(base)
    with AnonPeak() as anon_load:
        bb = ARBackbone.from_pretrained(base, dtype=dtype)
        load_concepts(bb.bank, concept, base_fingerprint=bb.base_fingerprint, vocabulary=bb.vocabulary)
    load_peak, loaded, anon_loaded = hwm_bytes() - rss0, rss_bytes() - rss0, AnonPeak.now() - anon0
    model_bytes = sum(t.numel() * t.element_size() for t in bb.model.state_dict().values())
    reset = reset_hwm()
    t1 = time.perf_counter()
    with AnonPeak() as anon_export:
        if arm == "old":
            old_export(bb, out)
        else:
            export_merged(bb, out)
    t2 = time.perf_counter()
    peak = hwm_bytes() - rss0
    return {"arm": arm, "dtype": dtype, "rss_baseline": rss0, "rss_loaded": loaded, "model_tensors": model_bytes,
            "peak_load": load_peak, "peak_export": peak, "export_above_loaded": peak - loaded,
            "anon_loaded": anon_loaded, "anon_peak_load": anon_load.peak - anon0,
            "anon_peak_export": anon_export.peak - anon0,
            "anon_export_above_loaded": anon_export.peak - anon0 - anon_loaded,
            "peak_reset_after_load": reset, "written": folder_bytes(out), "load_s": t1 - t0, "export_s": t2 - t1}


def compare(old: Path, new: Path) -> dict:
    """The two exports hold the same values: old (float32) cast to bf16 equals new."""
    import torch
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    a, b = tensors(old), tensors(new)
    same = a.keys() == b.keys() and all(torch.equal(a[k].to(b[k].dtype), b[k]) for k in a)
    dtypes = sorted({str(t.dtype) for t in b.values() if t.is_floating_point()})
    return {"same_values": same, "new_dtypes": dtypes, "old_dtypes": sorted({str(t.dtype) for t in a.values()
                                                                           if t.is_floating_point()})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", nargs=4, metavar=("ARM", "BASE", "CONCEPT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        arm, base, concept, out = args.worker
        print("RESULT " + json.dumps(worker(arm, Path(base), Path(concept), Path(out))))
        return
    size = dict(SIZES["quick" if args.quick else "medium"])
    for key, name in (("hidden", "hidden_size"), ("layers", "num_layers"), ("vocab", "vocab_size")):
        if getattr(args, key):
            size[name] = getattr(args, key)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        base, concept = build(root, size)
        base_bytes = folder_bytes(base)
        results = {}
        for arm in ("old", "new"):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            proc = subprocess.run([sys.executable, __file__, "--worker", arm, str(base), str(concept),
                                   str(root / arm)], capture_output=True, text=True, env=env, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{arm} worker failed:\n{proc.stderr[-3000:]}")
            results[arm] = json.loads(line[len("RESULT "):])
        check = compare(root / "old", root / "new")
    print(f"base: {size}, {base_bytes / MiB:.0f} MiB of bf16 safetensors; check: {check}\n")
    x = lambda v: f"{v / MiB:.0f} MiB ({v / base_bytes:.2f}x)"  # noqa: E731
    print("| arm | load dtype | model tensors | written | export s |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | {r['dtype']} | {x(r['model_tensors'])} | {x(r['written'])} | {r['export_s']:.1f} |")
    print("\n| arm | memory | after load | peak, load | peak, export | export above the loaded model |")
    print("|---|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | RSS (VmHWM) | {x(r['rss_loaded'])} | {x(r['peak_load'])} | {x(r['peak_export'])} "
              f"| {x(r['export_above_loaded'])} |")
        print(f"| {arm} | RssAnon | {x(r['anon_loaded'])} | {x(r['anon_peak_load'])} | {x(r['anon_peak_export'])} "
              f"| {x(r['anon_export_above_loaded'])} |")
    print("\nOver the process's memory after the imports, as multiples of the base's size on disk. VmHWM counts "
          "the mapped safetensors pages too; the export's VmHWM covers the load where the peak counter could "
          f"not be reset after it (reset: {results['new']['peak_reset_after_load']}).")
    out = args.out or REPO / "benchmarks" / "results" / ("export_quick.json" if args.quick else "export.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "base_bytes": base_bytes, "check": check, "results": results,
                               "machine": platform.processor() or platform.machine(),
                               "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {out}")
    if not check["same_values"] or check["new_dtypes"] != ["torch.bfloat16"]:
        sys.exit("check failed: the exports differ")


if __name__ == "__main__":
    main()
