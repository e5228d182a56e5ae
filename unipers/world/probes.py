"""Probes of a world base that the benchmarks and their tests share: what a base says about photos of
objects, scored against the objects' attributes.

    model, processor, prompts = load_base(root / "backbone")
    answer_logprob(model, prompts, questions, answers, image_tokens)   # whole-answer log-probabilities
    description_scores(["A purple striped star."], [parse_object("purple striped star")])
"""

from __future__ import annotations

import torch

from unipers.world.synth import WorldObject


def parse_object(words: str) -> WorldObject:
    """"purple striped star" -> the WorldObject."""
    colour, pattern, shape = words.split()
    return WorldObject(shape, colour, pattern)


def description_scores(descriptions, objects) -> dict:
    """Share of descriptions naming each attribute of the true object, and all three."""
    hits = {"colour": 0, "pattern": 0, "shape": 0, "all": 0}
    for text, obj in zip(descriptions, objects):
        words = text.lower().replace(".", " ").split()
        ok = {k: v in words for k, v in obj.attributes().items()}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    return {k: v / max(1, len(objects)) for k, v in hits.items()}


def load_base(path):
    """(HF model in eval mode, processor, plain-mode PromptBuilder with the world's describe question) of a
    built world's backbone folder."""
    bb, prompts = load_backbone(path)
    return bb.model, bb.processor, prompts


def load_backbone(path):
    """(ARBackbone, its PromptBuilder with the world's describe question)."""
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.backbone import ARBackbone
    from unipers.world.base import DESCRIBE_QUESTION

    bb = ARBackbone.from_pretrained(path).eval()
    return bb, PromptBuilder.for_backbone(bb, describe_question=DESCRIBE_QUESTION)


@torch.no_grad()
def answer_logprob(model, prompts, questions, answers, tokens) -> torch.Tensor:
    """(N,) summed log-probability of each whole answer after its (question, image tokens), plain layout."""
    from unipers.models.padding import pad_batch

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
