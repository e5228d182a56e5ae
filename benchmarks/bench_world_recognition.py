"""How well the tiny world's AR base recognizes, before any concept is trained.

    python benchmarks/bench_world_recognition.py [--root checkpoints/world] [--photos 120]

On fresh photos of the base's training objects (never the demo object), asks "Is zib in this photo?" with
zib described two ways, and scores Yes/No from the answer-token logits (as ``unipers recognize`` does):

    concept layout  "zib is a purple striped star. <image>\\nIs zib in this photo?"   (how the base is trained,
                    and how a concept's prompt reads: "<bo> is <slots>. <image>\\nIs <bo> in this photo?")
    after image     "<image>\\nIs the purple striped star in this photo?"              (the naive layout)

Negatives are near-misses (two of three attributes shared) and others. Then two diagnostics of the
concept layout: near-misses rejected by which attribute they change, and the base's answers to "What
shape / colour / pattern is the object?" about the photos (the value whose whole answer is likeliest).
Prints markdown tables and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def load_base(path):
    """(model in eval mode, processor, plain-mode PromptBuilder) of a built world's backbone folder."""
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.concepts.bank import ConceptBank
    from unipers.concepts.prompts import PromptBuilder

    model = ChameleonForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    prompts = PromptBuilder(proc.tokenizer, ConceptBank(model.config.vocab_size, model.config.hidden_size),
                            boi_id=proc.image_start_token_id, eoi_id=proc.image_end_token_id)
    return model, proc, prompts


@torch.no_grad()
def answer_logits(model, prompts, questions, tokens) -> torch.Tensor:
    """(N, V) logits of the first answer token of each (question, image tokens), plain layout."""
    from unipers.models.unified import pad_batch

    seqs = [prompts.encode_question(q, images=[t], mode="plain") for q, t in zip(questions, tokens)]
    ids, mask = pad_batch(seqs, prompts.tokenizer.pad_token_id)
    return model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(seqs)), mask.sum(1) - 1]


def score(model, prompts, questions, tokens, yes_id: int, no_id: int) -> torch.Tensor:
    """True where the model's answer to each (question, image tokens) is Yes."""
    last = answer_logits(model, prompts, questions, tokens)
    return last[:, yes_id] > last[:, no_id]


@torch.no_grad()
def answer_logprob(model, prompts, questions, answers, tokens) -> torch.Tensor:
    """(N,) summed log-probability of each whole answer after its (question, image tokens), plain layout."""
    from unipers.models.unified import pad_batch

    encs = [prompts.encode_qa(q, a, images=[t], mode="plain") for q, a, t in zip(questions, answers, tokens)]
    ids, mask = pad_batch([e.ids for e in encs], prompts.tokenizer.pad_token_id)
    labels, _ = pad_batch([e.labels for e in encs], prompts.tokenizer.pad_token_id, labels=True)
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (picked * (targets != -100)).sum(1)


def attribute_answers(model, prompts, tokens, shown) -> dict:
    """Share of photos whose asked attribute the base names right, per attribute: the value whose whole
    answer ("Circle.") is likeliest. Not the first token alone: with the world's BPE "Circle" and "Cross"
    may share their first piece."""
    from unipers.world.base import ATTRIBUTE_QUESTIONS
    from unipers.world.synth import ATTRIBUTES

    out = {}
    for key, question in ATTRIBUTE_QUESTIONS.items():
        values = ATTRIBUTES[key]
        asked = ["<image>\n" + question.format(c="the object")] * len(tokens)
        scores = torch.stack([answer_logprob(model, prompts, asked, [v.capitalize() + "."] * len(tokens), tokens)
                              for v in values], 1)
        truth = torch.tensor([values.index(o.attributes()[key]) for o in shown])
        out[key] = (scores.argmax(1) == truth).float().mean().item()
    return out


def main(argv=None) -> int:
    from unipers.world import base
    from unipers.world.build import demo_object, world_root
    from unipers.world.synth import all_objects, near_misses, render_many, with_article

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="a built world (default checkpoints/world or $UNIPERS_WORLD_DIR)")
    p.add_argument("--photos", type=int, default=120)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    path = world_root(args.root) / "backbone"
    model, proc, prompts = load_base(path)
    yes_id = proc.tokenizer("Yes", add_special_tokens=False).input_ids[0]
    no_id = proc.tokenizer("No", add_special_tokens=False).input_ids[0]

    rng = random.Random("bench/world-recognition")
    objects = [o for o in all_objects() if o != demo_object()]
    shown = [rng.choice(objects) for _ in range(args.photos)]
    tokens = base.image_tokens(model, base.to_pixels(render_many(shown, "bench/world-recognition"), proc.image_processor))
    asked = {
        "pos": shown,
        "near-miss neg": [rng.choice([m for m in near_misses(o) if m != demo_object()]) for o in shown],
        "other neg": [rng.choice([m for m in objects if m.shared(o) < 2]) for o in shown],
    }
    layouts = {
        "concept layout": lambda o: f"zib is {with_article(o.describe())}. <image>\nIs zib in this photo?",
        "after image": lambda o: f"<image>\nIs the {o.describe()} in this photo?",
    }
    rows = {}
    t0 = time.perf_counter()
    for layout, make in layouts.items():
        accs = {}
        for kind, targets in asked.items():
            said_yes = score(model, prompts, [make(o) for o in targets], tokens, yes_id, no_id)
            accs[kind] = (said_yes if kind == "pos" else ~said_yes).float().mean().item()
        accs["weighted"] = (accs["pos"] + (accs["near-miss neg"] + accs["other neg"]) / 2) / 2
        rows[layout] = accs
    concept = layouts["concept layout"]
    by_attribute = {}
    for attr in ("shape", "colour", "pattern"):
        changed = [rng.choice([m for m in near_misses(o) if getattr(m, attr) != getattr(o, attr) and m != demo_object()])
                   for o in shown]
        said_yes = score(model, prompts, [concept(o) for o in changed], tokens, yes_id, no_id)
        by_attribute[attr] = (~said_yes).float().mean().item()
    answers = attribute_answers(model, prompts, tokens, shown)
    cols = ["pos", "near-miss neg", "other neg", "weighted"]
    print(f"base recognition on {args.photos} fresh photos ({path}, {time.perf_counter() - t0:.1f} s)\n")
    print("| layout | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for layout, accs in rows.items():
        print(f"| {layout} | " + " | ".join(f"{accs[c]:.2f}" for c in cols) + " |")
    print("\n| concept layout: near-misses rejected, by the attribute they change | shape | colour | pattern |"
          "\n|---|---|---|---|\n| | " + " | ".join(f"{by_attribute[a]:.2f}" for a in by_attribute) + " |")
    print("\n| \"What shape / colour / pattern is the object?\" answered right | shape | colour | pattern |"
          "\n|---|---|---|---|\n| | " + " | ".join(f"{answers[a]:.2f}" for a in ("shape", "colour", "pattern")) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "world_recognition.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "backbone": str(path), "photos": args.photos,
                               "results": rows, "near_miss_rejected_by_changed_attribute": by_attribute,
                               "attribute_answers": answers, "torch": torch.__version__}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
