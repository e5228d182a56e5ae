"""Probes of a world base that the benchmarks and their tests share: what a base says about photos of
objects, scored against the objects' attributes.

    model, processor, prompts = load_base(root / "backbone")
    answer_logprob(model, prompts, questions, answers, image_tokens)   # whole-answer log-probabilities
    description_scores(["A purple striped star."], [parse_object("purple striped star")])
    held_out_descriptions(seed, held_out, photos, work)   # build a base without `held_out`, then score it
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

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


def describer(path):
    """The saved backbone at ``path``, loaded once: a function from (N, H, W, 3) uint8 photos to its own
    description of each, as text."""
    from unipers.models.unified import describe_images
    from unipers.world.tokenizer import image_tokens, to_pixels

    bb, prompts = load_backbone(path)

    def describe(images) -> list[str]:
        with torch.no_grad():
            tokens = image_tokens(bb.model, to_pixels(images, bb.processor.image_processor))
        return [bb.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in describe_images(bb, prompts, list(tokens))]

    return describe


def held_out_descriptions(seed: int, held_out, photos: int, work: Path, quiet: bool = True, recipe=None) -> dict:
    """Build a backbone as ``unipers world build`` does (by `recipe`, default the world's) with `held_out`
    kept out of its photos, texts and negatives; then score its descriptions of `photos` fresh photos of each
    held-out object and of seen objects. One row per object, plus "seen objects (fresh photos)"."""
    from unipers.world import build
    from unipers.world.synth import render_many, sample_objects

    recipe = recipe or build.RECIPE
    objects = sample_objects(recipe.n_train, f"{seed}/train", exclude=held_out)
    images = render_many(objects, f"{seed}/train")
    t0 = time.perf_counter()
    info = build.build_backbone(work / f"seed{seed}", objects, images, seed=seed, quiet=quiet, held_out=held_out,
                                recipe=recipe)
    seconds = time.perf_counter() - t0
    rows = {}
    describe = describer(work / f"seed{seed}")
    seen = sample_objects(photos, f"descriptions/{seed}/seen", exclude=held_out)
    for name, objs in [(str(o), [o] * photos) for o in held_out] + [("seen objects (fresh photos)", seen)]:
        texts = describe(render_many(objs, f"descriptions/{seed}/{name}"))
        rows[name] = description_scores(texts, objs)
        wrong = Counter(t for t, o in zip(texts, objs) if description_scores([t], [o])["all"] < 1)
        rows[name]["commonest_wrong"] = wrong.most_common(2)
    return {"seed": seed, "build_seconds": round(seconds, 1), "pretrain_steps": info["pretrain"]["steps"],
            "pretrain_final_loss": info["pretrain"]["final_loss"], "rows": rows}
