"""How well the tiny world's AR base recognizes, before any concept is trained.

    python benchmarks/bench_world_recognition.py [--root DIR] [--photos 120]

On fresh photos of the base's training objects (never the demo object), asks "Is zib in this photo?" with
zib described in a prefix sentence, and scores Yes/No from the answer-token logits (as ``unipers
recognize`` does), in two layouts side by side:

    described       turn one "<image>\\nWhat is in this photo?" answered by the base itself (greedy), then
                    "zib is a purple striped star. Is zib in this photo?"  (the world's layout:
                    configs/world.yaml sets backbone.describe_first; a concept's prompt reads
                    "<bo> is <slots>. Is <bo> in this photo?" there)
    one turn        "zib is a purple striped star. <image>\\nIs zib in this photo?"  (no description first)

Negatives are near-misses (two of three attributes shared) and others. Then diagnostics of the described
layout: near-misses rejected by which attribute they change, how often the base's own description names
each attribute right, and its answers to "What shape / colour / pattern is the object?" (the value whose
whole answer is likeliest). Prints markdown tables and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unipers.world.probes import attribute_answers, load_backbone  # noqa: E402  (after the path above)

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def answer_logits(model, prompts, questions, tokens) -> torch.Tensor:
    """(N, V) logits of the first answer token of each (question, image tokens), plain layout."""
    from unipers.models.padding import pad_batch

    seqs = [prompts.encode_question(q, images=[t], mode="plain") for q, t in zip(questions, tokens)]
    ids, mask = pad_batch(seqs, prompts.tokenizer.pad_token_id)
    return model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(seqs)), mask.sum(1) - 1]


def score(model, prompts, questions, tokens, yes_no: tuple[int, int]) -> torch.Tensor:
    """True where the model's answer to each (question, image tokens) is Yes."""
    last = answer_logits(model, prompts, questions, tokens)
    return last[:, yes_no[0]] > last[:, yes_no[1]]


@torch.no_grad()
def says_yes(bb, seqs, batch_size: int = 64) -> torch.Tensor:
    """True where the answer's first token is likelier Yes than No after each prompt (ids, left-padded)."""
    from unipers.models.padding import pad_batch

    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i:i + batch_size], bb.tokenizer.pad_token_id, side="left")
        hidden, _ = bb.hidden_states(ids, mask)
        logits = bb.logits(hidden[:, -1], bb.bank.presence(ids))
        out.append(bb.says_yes(logits))
    return torch.cat(out)


def main(argv=None) -> int:
    from unipers.models.unified import describe_images
    from unipers.world import tokenizer
    from unipers.world.build import demo_object, world_root
    from unipers.world.synth import ATTRIBUTES, all_objects, near_misses, render_many, with_article

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="a built world (default the world cache, $UNIPERS_WORLD_DIR)")
    p.add_argument("--photos", type=int, default=120)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    path = world_root(args.root) / "backbone"
    bb, prompts = load_backbone(path)
    model, proc = bb.model, bb.processor

    rng = random.Random("bench/world-recognition")
    objects = [o for o in all_objects() if o != demo_object()]
    shown = [rng.choice(objects) for _ in range(args.photos)]
    tokens = tokenizer.image_tokens(model, tokenizer.to_pixels(render_many(shown, "bench/world-recognition"), proc.image_processor))
    t0 = time.perf_counter()
    descriptions = describe_images(bb, prompts, list(tokens))
    asked = {
        "pos": shown,
        "near-miss neg": [rng.choice([m for m in near_misses(o) if m != demo_object()]) for o in shown],
        "other neg": [rng.choice([m for m in objects if m.shared(o) < 2]) for o in shown],
    }

    def described(targets):
        return says_yes(bb, [prompts.encode_described_question(f"zib is {with_article(o.describe())}. Is zib in this photo?",
                                                               image=t, description=d, mode="plain")
                             for o, t, d in zip(targets, tokens, descriptions)])

    def one_turn(targets):
        return score(model, prompts, [f"zib is {with_article(o.describe())}. <image>\nIs zib in this photo?"
                                      for o in targets], tokens, bb.yes_no_ids)

    rows = {}
    for layout, decide in (("described", described), ("one turn", one_turn)):
        accs = {}
        for kind, targets in asked.items():
            said_yes = decide(targets)
            accs[kind] = (said_yes if kind == "pos" else ~said_yes).float().mean().item()
        accs["weighted"] = (accs["pos"] + (accs["near-miss neg"] + accs["other neg"]) / 2) / 2
        rows[layout] = accs
    by_attribute = {}
    for attr in ATTRIBUTES:
        changed = [rng.choice([m for m in near_misses(o) if getattr(m, attr) != getattr(o, attr) and m != demo_object()])
                   for o in shown]
        by_attribute[attr] = (~described(changed)).float().mean().item()
    texts = [proc.tokenizer.decode(d).lower().rstrip(".").split() for d in descriptions]
    named = {a: sum(o.attributes()[a] in words for o, words in zip(shown, texts)) / len(shown) for a in ATTRIBUTES}
    named["all three"] = sum(all(v in words for v in o.attributes().values()) for o, words in zip(shown, texts)) / len(shown)
    answers = attribute_answers(model, prompts, tokens, shown)
    cols = ["pos", "near-miss neg", "other neg", "weighted"]
    print(f"base recognition on {args.photos} fresh photos ({path}, {time.perf_counter() - t0:.1f} s)\n")
    print("| layout | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for layout, accs in rows.items():
        print(f"| {layout} | " + " | ".join(f"{accs[c]:.2f}" for c in cols) + " |")
    print("\n| described: near-misses rejected, by the attribute they change | shape | colour | pattern |"
          "\n|---|---|---|---|\n| | " + " | ".join(f"{by_attribute[a]:.2f}" for a in ATTRIBUTES) + " |")
    print("\n| the base's description names it right | shape | colour | pattern | all three |"
          "\n|---|---|---|---|---|\n| | " + " | ".join(f"{named[a]:.2f}" for a in named) + " |")
    print("\n| \"What shape / colour / pattern is the object?\" answered right | shape | colour | pattern |"
          "\n|---|---|---|---|\n| | " + " | ".join(f"{answers[a]:.2f}" for a in ATTRIBUTES) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "world_recognition.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "backbone": str(path), "photos": args.photos,
                               "results": rows, "near_miss_rejected_by_changed_attribute": by_attribute,
                               "description_names": named, "attribute_answers": answers,
                               "torch": torch.__version__}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
