"""Many concepts on one base: per-token answer latency and memory with 1, 10, 100 and 1,000 concepts loaded,
for a prompt that names one of them. Side by side:

- **unipers**: the splice (`ConceptBank`): embeddings for the concepts a prompt names, head columns for the
  concepts the batch names, nothing for the others.
- **resized vocabulary**: what adding tokens to the model's vocabulary costs (``resize_token_embeddings``,
  as Yo'LLaVA and textual inversion do): every loaded concept's head rows in the output layer of every
  token, one matmul over ``V + 17 N`` rows.

    python benchmarks/bench_many_concepts.py                     # 1, 10, 100, 1000 concepts; 64 tokens, 7 rounds
    python benchmarks/bench_many_concepts.py --counts 1,1000 --tokens 32 --rounds 3 --quick

The embedded tiny backbone (hidden 64, 4 layers): the smallest model makes the per-concept overhead most
visible, since a token's own compute is a few milliseconds. Concepts are synthetic (random rows, the default
layout: 17 tokens, 18 rows of which one is a head row). Greedy decoding with the KV cache, one torch thread;
every round times every count and arm in alternating order; the median per-token time over rounds.
Memory: the concept rows' bytes (the only memory that grows with the count). Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARMS = ("unipers", "resized vocabulary")


def resized_logits(bb):
    """`bb.logits` as a model with a resized vocabulary computes them: every concept token a column."""
    import torch

    from unipers.concepts.bank import GROUPS

    rows = []
    for name, info in bb.bank.info.items():
        head = bb.bank.rows[name].head
        for g in GROUPS:
            n = info.layout.count(g)
            if n:
                rows.append(head[g].detach() if g in head else torch.zeros(n, bb.bank.hidden_size))
    weight = torch.cat(rows)

    def logits(hidden, presence, text_only=True):
        base = bb.model.lm_head(hidden)
        if text_only:
            base = base.index_fill(-1, bb.image_token_ids, torch.finfo(base.dtype).min)
        return torch.cat([base, hidden @ weight.T], -1)

    def to_ids(columns, presence):  # the columns are the ids here
        return columns

    return logits, to_ids


def per_token(bb, ids, tokens: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        out = bb.generate(ids, max_new_tokens=tokens, use_cache=True)
    return (time.perf_counter() - start) / out.shape[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,10,100,1000")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="counts 1,100; 16 tokens; 2 rounds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "many_concepts.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.counts, args.tokens, args.rounds = "1,100", 16, 2

    import torch

    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.backbone import ARBackbone
    from unipers.models.tiny import ensure_tiny
    from unipers.runtime import cpu_description

    torch.set_num_threads(1)
    counts = [int(c) for c in args.counts.split(",")]
    setups = {}
    for count in counts:
        bb = ARBackbone.from_pretrained(ensure_tiny()[0])
        # The concept the prompt names comes last: the id lookups and splices must find it among all the others.
        names = [f"c{i:04d}" for i in range(count)]
        gen = torch.Generator().manual_seed(0)
        for name in names:
            bb.bank.add(name, class_word=None, embed_init={g: torch.randn(bb.bank.layout.count(g), bb.bank.hidden_size,
                                                                        generator=gen) * 0.02
                                                           for g in ("identifier", "shared", "und", "gen")},
                        head_init={"identifier": torch.randn(1, bb.bank.hidden_size, generator=gen) * 0.02})
        ids = torch.tensor([PromptBuilder.for_backbone(bb).encode(f"What is <{names[-1]}> doing today?", mode="und")])
        setups[count] = (bb, ids, {"unipers": (bb.logits, bb.to_ids), "resized vocabulary": resized_logits(bb)})
        per_token(bb, ids, 4)  # warm-up
    # Every round times every count and arm, in an order that alternates: drift on a shared machine then
    # spreads over all of them instead of landing on one.
    times = {(count, arm): [] for count in counts for arm in ARMS}
    for r in range(args.rounds):
        for count in (counts if r % 2 == 0 else counts[::-1]):
            bb, ids, arms = setups[count]
            for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
                bb.logits, bb.to_ids = arms[arm]
                times[count, arm].append(per_token(bb, ids, args.tokens))
            bb.logits, bb.to_ids = arms["unipers"]
    results = []
    for count in counts:
        bb = setups[count][0]
        rows_bytes = sum(p.numel() * p.element_size() for p in bb.bank.parameters())
        row = {"concepts": count, "rows_bytes": rows_bytes,
               **{arm: statistics.median(times[count, arm]) for arm in ARMS},
               "all": {arm: times[count, arm] for arm in ARMS}}
        results.append(row)
        print(f"{count:>5} concepts: unipers {row['unipers'] * 1e3:.3f} ms/token, resized vocabulary "
              f"{row['resized vocabulary'] * 1e3:.3f} ms/token, rows {rows_bytes / 2**20:.2f} MiB", flush=True)

    one = results[0]
    print("\n| concepts loaded | unipers ms/token | vs 1 | resized vocabulary ms/token | vs 1 | concept rows |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['concepts']:,} | {row['unipers'] * 1e3:.3f} | {row['unipers'] / one['unipers']:.2f}x | "
              f"{row['resized vocabulary'] * 1e3:.3f} | {row['resized vocabulary'] / one['resized vocabulary']:.2f}x | "
              f"{row['rows_bytes'] / 2**20:.2f} MiB |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_description(), "torch": torch.__version__, "tokens": args.tokens,
                               "rounds": args.rounds, "results": results}, indent=2) + "\n")
    print(f"\n{cpu_description()}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
