"""Concept rows: spliced ConceptBank (unipers) against resize + gradient mask (Yo'LLaVA / Yo'Chameleon).

    python benchmarks/bench_concept_rows.py                  # V=65536, H=4096, 1 layer, 2 x 128 tokens
    python benchmarks/bench_concept_rows.py --quick          # smoke test, small V/H, < 30 s
    python benchmarks/bench_concept_rows.py --repeats 3      # 3 fresh processes per method, ~11 min
    python benchmarks/bench_concept_rows.py --fused          # AdamW(fused=True) for both methods
    python benchmarks/bench_concept_rows.py --hidden 2048 --steps 8 --out /tmp/rows.json

Both methods train the 33 tokens of one concept (1 identifier + 16 shared + 8 und + 8 gen) on a frozen,
randomly initialised `ChameleonForConditionalGeneration` with a Chameleon-sized vocabulary:

- **spliced**: `unipers.models.backbone.ARBackbone` with a `ConceptBank(V, H, SlotLayout(16, 8, 8),
  head_rows="identifier")`; AdamW over `bank.parameters()` only; loss = `backbone.understanding_loss`.
- **naive**: `model.resize_token_embeddings(V + 33)`, `embed_tokens.weight` and `lm_head.weight` trainable,
  a gradient hook that zeroes the rows < V, AdamW over those two full tensors.

Both compute logits only at the 16 labelled positions (the stock HF forward would add a (B, L, V) logits
block on top of this), so the difference measured is only how the new rows are held. Both use AdamW with
weight_decay=0.01 (the `naive_wd0` row repeats naive with weight_decay=0): the check "base rows moved"
shows that decay moves every row of a parameter, gradient or not.

Each method runs in its own subprocess so memory peaks do not mix. Per method: RSS after building the
model; peak RSS during training (VmHWM after resetting it via /proc/self/clear_refs once the model is
built, so it is the training peak alone; ru_maxrss before the reset (the build peak) and at the end are in
the JSON too); optimizer-state bytes; trainable parameters; median and fastest step time (zero_grad +
forward + backward + optimizer step) over --steps steps after 2 warm-up steps, pooled over --repeats
processes. Prints a markdown table and writes JSON to --out (benchmarks/results/ is not versioned).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("spliced", "naive", "naive_wd0")
NUM_SHARED, NUM_UND, NUM_GEN = 16, 8, 8
NUM_CONCEPT_TOKENS = 1 + NUM_SHARED + NUM_UND + NUM_GEN  # 33
LOSS_TOKENS = 16
WARMUP = 2
GiB = 1024**3


from _memory import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402  (benchmarks/ is on sys.path)


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---- model and batch -------------------------------------------------------------------------------------
def intermediate_for(hidden: int) -> int:
    """LLaMA/Chameleon MLP width: 8H/3 rounded up to a multiple of 256 (4096 -> 11008, Chameleon-7B's)."""
    return -(-(8 * hidden // 3) // 256) * 256


def num_image_tokens(vocab: int) -> int:
    return min(8192, vocab // 4)


def vocabulary_map(vocab: int) -> dict[str, int]:
    """Synthetic Chameleon vocabulary: text tokens, `<image>` at id 5, image tokens IMGIMG<letters>Z at the top."""
    from unipers.models.tiny import image_token_name

    n_img = num_image_tokens(vocab)
    mapping = {f"<tok{i}>": i for i in range(vocab - n_img)}
    del mapping["<tok5>"]
    mapping["<image>"] = 5
    for k in range(n_img):
        mapping[image_token_name(k)] = vocab - n_img + k
    return mapping


def build_model(args):
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    config = ChameleonConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate_for(args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(1024, args.seq),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        vocabulary_map=vocabulary_map(args.vocab),
        vq_config=dict(embed_dim=32, num_embeddings=num_image_tokens(args.vocab), latent_channels=32,
                       resolution=32, base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1,
                       attn_resolutions=[]),
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = ChameleonForConditionalGeneration(config).eval()
    return model.requires_grad_(False)


def make_batch(args):
    """(ids, attention_mask, labels): random text ids, all 33 concept tokens after a short prefix, the
    identifier again among the last 16 tokens (so it is a target too); labels on the last 16 tokens."""
    import torch

    V, B, L = args.vocab, args.batch, args.seq
    if L < 8 + NUM_CONCEPT_TOKENS + LOSS_TOKENS:
        raise SystemExit(f"--seq must be at least {8 + NUM_CONCEPT_TOKENS + LOSS_TOKENS}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    text_hi = V - num_image_tokens(V)
    ids = torch.randint(16, text_hi, (B, L), generator=gen)
    ids[:, 8:8 + NUM_CONCEPT_TOKENS] = torch.arange(V, V + NUM_CONCEPT_TOKENS)
    ids[:, L - LOSS_TOKENS // 2] = V  # the identifier as an answer token
    labels = torch.full_like(ids, -100)
    labels[:, L - LOSS_TOKENS:] = ids[:, L - LOSS_TOKENS:]
    return ids, torch.ones_like(ids), labels


class _StubTokenizer:
    """What ARBackbone needs from a tokenizer when concepts are initialised at random: the vocabulary."""

    def __init__(self, vocab: dict[str, int]):
        self._vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def __call__(self, *a, **k):
        raise NotImplementedError("the benchmark initialises concepts with init='random'")


class _StubProcessor:
    def __init__(self, vocab: dict[str, int]):
        self.tokenizer = _StubTokenizer(vocab)
        self.image_start_token_id = 6
        self.image_end_token_id = 7
        self.image_seq_length = 64  # the tiny VQ: (32 / 2^2)^2


def digest(t) -> str:
    """Hash of a tensor's bytes, without copying it (a full copy would add to the memory being measured)."""
    import numpy as np

    return hashlib.blake2b(np.ascontiguousarray(t.detach().numpy()).view(np.uint8), digest_size=16).hexdigest()


# ---- one method, in its own process ----------------------------------------------------------------------
def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads or torch.get_num_threads())
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    model = build_model(args)
    V, method = args.vocab, args.method
    ids, mask, labels = make_batch(args)
    embed, head = model.get_input_embeddings(), model.lm_head

    if method == "spliced":
        from unipers.concepts.bank import ConceptBank, SlotLayout
        from unipers.models.backbone import ARBackbone

        bank = ConceptBank(V, args.hidden, SlotLayout(NUM_SHARED, NUM_UND, NUM_GEN), head_rows="identifier")
        backbone = ARBackbone(model, _StubProcessor(model.config.vocabulary_map), bank, "bench")
        backbone.add_concept("bo", init="random", seed=args.seed)
        model.config.vocab_size = V + bank.num_tokens
        params = list(bank.parameters())
        weight_decay = 0.01
        base_before = {"embed": digest(embed.weight), "lm_head": digest(head.weight)}
        concept_before = [p.detach().clone() for p in params]

        def loss_fn():
            return backbone.understanding_loss(ids, mask, labels)

        def base_after():
            return {"embed": digest(embed.weight), "lm_head": digest(head.weight)}

        def concept_moved():
            return any(not torch.equal(a, p) for a, p in zip(concept_before, params))
    else:
        from unipers.models.backbone import positions_from_mask

        model.resize_token_embeddings(V + NUM_CONCEPT_TOKENS, mean_resizing=False)
        embed, head = model.get_input_embeddings(), model.lm_head
        with torch.no_grad():  # same init as the spliced rows: table mean + per-dim std noise
            gen = torch.Generator().manual_seed(args.seed)
            for w in (embed.weight, head.weight):
                base = w[:V]
                w[V:] = base.mean(0) + torch.randn(NUM_CONCEPT_TOKENS, w.shape[1], generator=gen) * base.std(0)
        embed.weight.requires_grad_(True)
        head.weight.requires_grad_(True)
        keep = torch.zeros(V + NUM_CONCEPT_TOKENS, 1)
        keep[V:] = 1.0
        for w in (embed.weight, head.weight):
            w.register_hook(lambda g: g * keep)  # zero the gradient of every base row
        params = [embed.weight, head.weight]
        weight_decay = 0.0 if method == "naive_wd0" else 0.01
        image_ids = torch.tensor(model.model.vocabulary_mapping.image_tokens, dtype=torch.long)
        positions = positions_from_mask(mask)
        base_before = {"embed": digest(embed.weight[:V]), "lm_head": digest(head.weight[:V])}
        gen = torch.Generator().manual_seed(args.seed + 2)
        sample_rows = torch.randperm(V, generator=gen)[:1024]
        sample_before = {"embed": embed.weight[sample_rows].clone(), "lm_head": head.weight[sample_rows].clone()}
        concept_before = [embed.weight[V:].clone(), head.weight[V:].clone()]

        def loss_fn():
            hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            targets = labels[:, 1:]
            sel = targets != -100
            logits = head(hidden[:, :-1][sel])
            logits = logits.index_fill(-1, image_ids, torch.finfo(logits.dtype).min)  # as the stock forward
            return F.cross_entropy(logits.float(), targets[sel])

        def base_after():
            return {"embed": digest(embed.weight[:V]), "lm_head": digest(head.weight[:V])}

        def concept_moved():
            return not (torch.equal(concept_before[0], embed.weight[V:]) and torch.equal(concept_before[1], head.weight[V:]))

    # torch's default AdamW on CPU is the per-tensor loop (foreach is CUDA-only by default); --fused uses
    # the fused CPU kernel for both methods.
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=weight_decay, fused=True if args.fused else None)
    trainable = sum(p.numel() for p in params)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_ready = rss_bytes()
    maxrss_build = ru_maxrss_bytes()
    hwm_reset = reset_hwm()

    times, losses = [], []
    for step in range(WARMUP + args.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))

    peak_train = hwm_bytes()
    maxrss_end = ru_maxrss_bytes()
    opt_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    after = base_after()
    result = {
        "method": method,
        "weight_decay": weight_decay,
        "trainable_params": trainable,
        "optimizer_state_bytes": opt_bytes,
        "grad_bytes": grad_bytes,
        "rss_start_bytes": rss_start,
        "rss_after_build_bytes": rss_ready,
        "peak_rss_train_bytes": peak_train,
        "peak_rss_train_delta_bytes": peak_train - rss_ready,
        "ru_maxrss_build_bytes": maxrss_build,
        "ru_maxrss_end_bytes": maxrss_end,
        "peak_reset_ok": hwm_reset,
        "build_s": build_s,
        "step_times_s": times,
        "median_step_s": statistics.median(times[WARMUP:]),
        "losses": losses,
        "base_rows_moved": after != base_before,
        "base_moved_tensors": [k for k in after if after[k] != base_before[k]],
        "concept_rows_moved": concept_moved(),
    }
    if method != "spliced":
        rel = {}
        for k, w in (("embed", embed.weight), ("lm_head", head.weight)):
            old, new = sample_before[k], w.detach()[sample_rows]
            rel[k] = {"rows_changed_of_1024_sampled": int((old != new).any(1).sum()),
                      "max_rel_change": float(((new - old).abs() / old.abs().clamp(min=1e-12)).max())}
        result["base_rows_sample"] = rel
    return result


# ---- driver ----------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def aggregate(runs: list[dict]) -> dict:
    """One method's repeats: times pooled over all timed steps; memory figures as medians; checks must agree."""
    out = dict(runs[0])
    timed = [t for r in runs for t in r["step_times_s"][WARMUP:]]
    out["median_step_s"] = statistics.median(timed)
    out["min_step_s"] = min(timed)
    for key in ("rss_after_build_bytes", "peak_rss_train_bytes", "peak_rss_train_delta_bytes",
                "ru_maxrss_end_bytes", "build_s"):
        out[key] = statistics.median(r[key] for r in runs)
    for key in ("base_rows_moved", "concept_rows_moved"):
        values = {r[key] for r in runs}
        if len(values) != 1:
            raise SystemExit(f"{out['method']}: {key} differs between repeats: {values}")
    out["repeats"] = len(runs)
    out["runs"] = runs
    return out


def table(results: dict[str, dict], args) -> str:
    cols = [m for m in METHODS if m in results]
    head = ["", *cols]
    rows = [
        ("weight decay", lambda r: f"{r['weight_decay']:g}"),
        ("trainable params", lambda r: fmt_count(r["trainable_params"])),
        ("optimizer state", lambda r: fmt_bytes(r["optimizer_state_bytes"])),
        ("grads after step", lambda r: fmt_bytes(r["grad_bytes"])),
        ("RSS after build", lambda r: fmt_bytes(r["rss_after_build_bytes"])),
        ("peak RSS in training", lambda r: fmt_bytes(r["peak_rss_train_bytes"])),
        ("peak RSS delta (training)", lambda r: fmt_bytes(r["peak_rss_train_delta_bytes"])),
        ("median step", lambda r: f"{r['median_step_s']:.3g} s"),
        ("fastest step", lambda r: f"{r['min_step_s']:.3g} s"),
        ("base rows moved", lambda r: "yes" if r["base_rows_moved"] else "no"),
        ("concept rows moved", lambda r: "yes" if r["concept_rows_moved"] else "no"),
    ]
    ratio_keys = {"trainable params": "trainable_params", "optimizer state": "optimizer_state_bytes",
                  "peak RSS in training": "peak_rss_train_bytes",
                  "peak RSS delta (training)": "peak_rss_train_delta_bytes", "median step": "median_step_s",
                  "fastest step": "min_step_s"}
    with_ratio = "spliced" in results and "naive" in results
    if with_ratio:
        head.append("naive / spliced")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, f in rows:
        cells = [label, *(f(results[m]) for m in cols)]
        if with_ratio:
            key = ratio_keys.get(label)
            den = results["spliced"][key] if key else 0
            cells.append(f"{results['naive'][key] / den:,.1f}x" if key and den > 0 else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help=f"timed steps, after {WARMUP} warm-up steps")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh subprocesses per method, alternating order; step times are pooled")
    p.add_argument("--fused", action="store_true", help="AdamW(fused=True) for every method (default: torch's default)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: V=4096, H=256, 3 steps, 1 thread (contention-proof), out concept_rows_quick.json")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/concept_rows.json)")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.steps = 4096, 256, 3
        args.threads = args.threads or 1
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("concept_rows_quick.json" if args.quick else "concept_rows.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.method:  # worker: one method, result as JSON on the last stdout line
        print(json.dumps(worker(args)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s): {', '.join(sorted(unknown))}")
    print(f"V={args.vocab} H={args.hidden} layers={args.layers} batch={args.batch}x{args.seq} "
          f"steps={args.steps} (+{WARMUP} warm-up), AdamW {'fused' if args.fused else 'default'}, "
          "one subprocess per method", flush=True)
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--vocab", str(args.vocab),
                "--hidden", str(args.hidden), "--layers", str(args.layers), "--seq", str(args.seq),
                "--batch", str(args.batch), "--steps", str(args.steps), "--lr", str(args.lr),
                "--seed", str(args.seed), "--threads", str(args.threads), *(["--fused"] if args.fused else [])]
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        order = methods if rep % 2 == 0 else methods[::-1]  # alternate, so drifting load hits both sides
        for m in order:
            proc = subprocess.run([*base_cmd, "--method", m], capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{m}: worker failed with exit code {proc.returncode}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[m].append(r)
            print(f"  [{rep + 1}/{args.repeats}] {m}: build {r['build_s']:.1f} s, steps "
                  f"{' '.join(f'{t:.2f}' for t in r['step_times_s'])} s, "
                  f"peak RSS {fmt_bytes(r['peak_rss_train_bytes'])}", flush=True)
    results = {m: aggregate(rs) for m, rs in runs.items()}
    if not all(r["peak_reset_ok"] for rs in runs.values() for r in rs):
        print("warning: could not reset the peak-RSS counter; training peaks include the model build", flush=True)
    md = table(results, args)
    print()
    print(md)
    for m, r in results.items():
        if "base_rows_sample" in r:
            s = r["base_rows_sample"]
            print(f"\n{m}: of 1024 sampled base rows, {s['embed']['rows_changed_of_1024_sampled']} embed / "
                  f"{s['lm_head']['rows_changed_of_1024_sampled']} lm_head rows changed "
                  f"(max relative change {max(s['embed']['max_rel_change'], s['lm_head']['max_rel_change']):.2e})")
    import torch
    import transformers

    payload = {
        "benchmark": "concept_rows",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "seq", "batch", "steps", "repeats", "lr", "seed", "threads", "fused")}
        | {"intermediate": intermediate_for(args.hidden), "concept_tokens": NUM_CONCEPT_TOKENS,
           "loss_tokens": LOSS_TOKENS, "warmup": WARMUP, "dtype": "float32"},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpus": os.cpu_count(),
                        "torch_threads": args.threads or torch.get_num_threads(), "machine": platform.machine()},
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
