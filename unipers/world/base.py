"""Pre-training the tiny world's AR base on the world's recognition / attribute-question / caption data
(its image tokenizer is trained first: tokenizer.py).

The AR model's image-token embeddings start at the fitted codebook (``init_image_embeddings``) and stay
one trained linear map of it during pre-training (``CodebookEmbeddings``), so a never-seen combination of
seen attributes is read by the same map as the photos it was trained on. The pre-training texts use the
same templates and layout as personalization (``unipers.data.samples``, ``PromptBuilder``). Recognition,
the main task, is asked in two turns: the base describes the photo ("<image>\nWhat is in this photo?" ->
"A purple striped star."), then is asked about a made-up name bound to a description in a prefix sentence
("zib is a purple striped star. Is zib in this photo?"), so a concept's soft tokens later stand where the
description stood (``backbone.describe_first`` in configs/world.yaml).
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unipers.world.synth import ATTRIBUTES, WorldObject, all_objects, near_misses, with_article
from unipers.world.tokenizer import CodebookEmbeddings, Progress, standardized_codebook

# Made-up names bound to a description in a prefix sentence during pre-training, so the base learns to
# read "<name> is <description>." the way a concept's prefix is laid out (never the demo's own name).
NONCE_NAMES = ("zib", "mox", "tal", "rud", "fen", "kip", "lor", "vam", "sek", "dun", "pim", "gav")
ATTRIBUTE_QUESTIONS = {
    "colour": "What colour is {c}?",
    "pattern": "What pattern does {c} have?",
    "shape": "What shape is {c}?",
}
# Where a prefix-bound name lives and what it likes: the words a concept's facts are answered in.
PLACES = ("kitchen", "garden", "park", "beach", "library", "forest", "street", "room")
FACT_QUESTIONS = {"home": ("Where does {c} live?", "{c} lives in the {v}."),
                  "likes": ("What does {c} like?", "{c} likes the {v}.")}


def _description(obj: WorldObject, rng: random.Random, full: float = 0.75) -> str:
    if rng.random() < full:
        return obj.describe()
    keep = [a for a in ("colour", "pattern") if rng.random() < 0.5]
    return obj.describe(keep)


def _other(obj: WorldObject, rng: random.Random, held_out: Sequence[WorldObject] = ()) -> WorldObject:
    """A negative: a near-miss (two attributes shared) half the time, else any other object; never one of
    ``held_out`` (the base must not even hear the demo object's name)."""
    pool = near_misses(obj) if rng.random() < 0.5 else all_objects()
    return rng.choice([o for o in pool if o != obj and o not in held_out])


YES_NO_ATTRIBUTE = {
    "colour": "Is the object {v}?",
    "pattern": "Is the object {v}?",
    "shape": "Is the object a {v}?",
}


def object_names() -> dict[WorldObject, str]:
    """A made-up name for every object of the world ("kabo"), fixed for all time (seeded)."""
    rng = random.Random("world/object-names")
    taken = set(NONCE_NAMES) | {"bo"}
    names: dict[WorldObject, str] = {}
    for obj in all_objects():
        while True:
            name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
            if name not in taken:
                taken.add(name)
                names[obj] = name
                break
    return names


_NAMES = object_names()


RECOGNITION_SHARE = 0.7
DECISION_ONLY = 0.75  # share of recognition examples scored on their Yes / No alone (and the description)
# Recognition is asked in two turns ("describe, then decide"): configs/world.yaml sets this question as
# backbone.describe_first, so personalization, `unipers recognize` and `unipers eval` ask it the same way.
DESCRIBE_QUESTION = "What is in this photo?"
PARTIAL_DESCRIPTIONS = 0.5  # share of recognition examples naming one or two attributes only


class WorldText(NamedTuple):
    """One pre-training example: a question (with an <image> marker, or text only) and its answer; with a
    ``description``, the image goes in a first turn (DESCRIBE_QUESTION, answered by the description) and
    the question is asked as the second turn. ``decision_only``: only the answer's first token is scored."""

    question: str
    answer: str
    decision_only: bool = False
    description: Optional[str] = None


def describe_answer(obj: WorldObject) -> str:
    """The world's answer to DESCRIBE_QUESTION: "A purple striped star."."""
    return with_article(obj.describe()).capitalize() + "."


def recognition_example(obj: WorldObject, rng: random.Random, held_out: Sequence[WorldObject] = ()) -> WorldText:
    """"Is zib in this photo?" about a photo of ``obj``, asked after the photo was described, with zib
    described in a prefix sentence: the layout of a concept's described recognition (turn one "<image>\nWhat
    is in this photo?" -> "A purple striped star.", turn two "<bo> is <slots>. Is <bo> in this photo?"), the
    description standing where the concept's soft tokens will. Half are negatives: with zib fully described,
    half of those are near-misses (two of three attributes shared); with zib named by one or two attributes,
    one of those differs."""
    from unipers.data import samples as S

    positive = rng.random() < 0.5
    name = rng.choice(NONCE_NAMES)
    if rng.random() < PARTIAL_DESCRIPTIONS:
        # zib named by one or two attributes ("zib is a striped object."): a negative differs in one of those,
        # so the decision has to compare that attribute. Full descriptions alone taught a 4-layer base to
        # compare one attribute only (which one changed from run to run); these teach each comparison.
        keep = rng.sample(list(ATTRIBUTES), 1 if rng.random() < 0.6 else 2)
        attrs = obj.attributes()
        if not positive:
            changed = rng.choice(keep)
            attrs[changed] = rng.choice([v for v in ATTRIBUTES[changed] if v != attrs[changed]])
        words = [attrs[k] for k in ("colour", "pattern") if k in keep] + [attrs["shape"] if "shape" in keep else "object"]
        description = with_article(" ".join(words))
    else:
        description = with_article((obj if positive else _other(obj, rng, held_out)).describe())
    question = f"{name} is {description}. " + rng.choice(S.RECOGNITION_QUESTIONS).format(c=name)
    answer = rng.choice(S.POSITIVE_ANSWERS if positive else S.NEGATIVE_ANSWERS).format(c=name)
    return WorldText(question, answer, rng.random() < DECISION_ONLY, describe_answer(obj))


def world_example(obj: WorldObject, rng: random.Random, held_out: Sequence[WorldObject] = (),
                  recognition_share: float = RECOGNITION_SHARE) -> WorldText:
    """One pre-training example about a photo of ``obj``.

    The main task is recognition (``recognition_example``), asked after the base has described the photo
    in words, so the decision compares zib's description with the base's own words for the image. The base
    reads shape / colour / pattern well (its descriptions: 0.93 / 0.98 / 0.99 of fresh photos) but, asked
    about the image directly, a 4-layer base learns in a few thousand steps to compare one attribute only.
    Three quarters are scored on the description and the Yes / No alone: the rest of a templated answer
    repeats the question, and its gradient would drown the decision's; the others teach the answer's
    wording, which a concept is later trained on.
    The other tasks teach names, attributes and captions, and how a fact is read off a prefix sentence."""
    from unipers.data import samples as S

    task = rng.random()
    if task < recognition_share:
        return recognition_example(obj, rng, held_out)
    task = (task - recognition_share) / (1.0 - recognition_share)
    key = rng.choice(list(ATTRIBUTE_QUESTIONS))
    value = obj.attributes()[key].capitalize() + "."
    if task < 0.24:  # text only: what a name stands for
        return WorldText(ATTRIBUTE_QUESTIONS[key].format(c=_NAMES[obj]), value)
    if task < 0.48:  # an attribute of the object in the photo
        return WorldText("<image>\n" + ATTRIBUTE_QUESTIONS[key].format(c="the object"), value)
    if task < 0.72:  # caption, naming the object
        return WorldText("<image>\n" + rng.choice(S.CAPTION_QUESTIONS),
                         f"A photo of {_NAMES[obj]}, {with_article(obj.describe())}.")
    if task < 0.86:  # yes/no on one attribute
        k = rng.choice(list(YES_NO_ATTRIBUTE))
        v = obj.attributes()[k] if rng.random() < 0.5 else rng.choice(ATTRIBUTES[k])
        return WorldText("<image>\n" + YES_NO_ATTRIBUTE[k].format(v=v), "Yes." if v == obj.attributes()[k] else "No.")
    # text only: a fact read off a prefix sentence, as a concept's facts are asked ("<bo> is <slots>. Where
    # does <bo> live?"): an attribute, or where it lives / what it likes, answered in a concept fact's words
    name = rng.choice(NONCE_NAMES)
    if rng.random() < 0.5:
        return WorldText(f"{name} is {with_article(obj.describe())}. " + ATTRIBUTE_QUESTIONS[key].format(c=name), value)
    places = {"home": rng.choice(PLACES), "likes": rng.choice(PLACES)}
    asked = rng.choice(list(FACT_QUESTIONS))
    question, answer = FACT_QUESTIONS[asked]
    prefix = f"{name} is {with_article(obj.describe())}, living in the {places['home']} and liking the {places['likes']}. "
    return WorldText(prefix + question.format(c=name), answer.format(c=name, v=places[asked]))


def encode_example(prompts, ex: WorldText, image: Optional[Tensor]):
    """Ids and labels of an example (plain mode); a described one in the two-turn layout of
    `PromptBuilder.encode_described_qa`, with its description labelled too (the base learns to describe)."""
    from unipers.concepts.prompts import IGNORE_INDEX, Encoded

    if ex.description is None:
        enc = prompts.encode_qa(ex.question, ex.answer, images=[image] if "<image>" in ex.question else [], mode="plain")
        first, second = Encoded([], []), enc
    else:
        first = prompts.encode_qa(f"<image>\n{DESCRIBE_QUESTION}", ex.description, images=[image], mode="plain")
        enc = prompts.encode_qa(ex.question, ex.answer, mode="plain")
        second = Encoded(enc.ids[1:], enc.labels[1:])  # one BOS for both turns
    labels = second.labels
    if ex.decision_only:  # the first answer token alone
        at = next(k for k, v in enumerate(labels) if v != IGNORE_INDEX)
        labels = [IGNORE_INDEX] * len(labels)
        labels[at] = second.ids[at]
    return first.ids + second.ids, first.labels + labels


def weighted_answer_loss(logits: Tensor, labels: Tensor, first_weight: float,
                         decision_weight: Optional[float] = None) -> Tensor:
    """Next-token cross-entropy on the answer tokens, the first token of every answer (every run of
    labelled tokens) counting ``first_weight`` times, and the first token of a second answer (a described
    recognition's Yes / No) ``decision_weight`` times (default: ``first_weight``).

    The first token carries the decision (Yes / No, the colour...); the rest of a templated answer mostly
    repeats the question, and would otherwise drown the decision's gradient. In a described example the
    description is labelled too, so the decision after it gets its own, larger weight: a base whose
    decision weighs no more than its description's first word learns to say No to everything."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    _, weights = _answer_weights(targets, first_weight, decision_weight)
    return (loss * weights).sum() / weights.sum()


def _answer_weights(targets: Tensor, first_weight: float, decision_weight: Optional[float]) -> tuple[Tensor, Tensor]:
    """(labelled mask, per-position weights) of shifted ``targets``: ``weighted_answer_loss``'s weighting."""
    mask = targets != -100
    before = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    first = mask & ~before
    weights = mask.float() + (first_weight - 1.0) * first.float()
    if decision_weight is not None:
        weights = weights + (decision_weight - first_weight) * (first & (first.cumsum(1) == 2)).float()
    return mask, weights


def selected_answer_loss(model, ids: Tensor, mask: Tensor, labels: Tensor, first_weight: float,
                         decision_weight: Optional[float] = None) -> Tensor:
    """``weighted_answer_loss`` of ``model(ids).logits`` with the LM head applied at labelled positions only
    (about a tenth of a world batch's positions: the head is most of a 4-layer base's step). Image tokens
    are never predicted, as in ``ChameleonForConditionalGeneration.forward``."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep, weights = _answer_weights(targets, first_weight, decision_weight)
    logits = model.lm_head(hidden[keep]).float()
    logits[:, model.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
    loss = F.cross_entropy(logits, targets[keep], reduction="none")
    return (loss * weights[keep]).sum() / weights.sum()


def pretrain_backbone(model, prompts, tokens: Tensor, objects: Sequence[WorldObject], *, steps: int = 800,
                      batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01, first_weight: float = 5.0,
                      decision_weight: float = 20.0,
                      held_out: Sequence[WorldObject] = (), seed: int = 0, progress: Progress | None = None,
                      example: Optional[Callable[[int, random.Random], WorldText]] = None) -> dict:
    """Train every weight of the HF Chameleon ``model`` except its VQ model on ``world_example`` texts
    (``example(i, rng)``: the example about photo i instead, as the facts world draws them).

    ``prompts``: a PromptBuilder over the model's tokenizer (plain mode: no concepts). ``tokens`` (N, T)
    image ids of photos of ``objects``. The image-token embeddings train as one map of the codebook
    (``CodebookEmbeddings``), written back into the table at the end."""
    from torch.nn.utils import parametrize

    from unipers.models.padding import pad_batch
    from unipers.training.schedule import warmup_cosine

    rng = random.Random(f"pretrain/{seed}")
    torch.manual_seed(seed)
    embeddings = model.get_input_embeddings()
    codes, code_ids = standardized_codebook(model)
    # the map starts by least squares from the codes to their current rows (init_image_embeddings' map)
    start = torch.linalg.lstsq(codes, embeddings.weight.detach()[code_ids].float()).solution
    parametrize.register_parametrization(embeddings, "weight", CodebookEmbeddings(codes, code_ids, start))
    params = [p for n, p in model.named_parameters() if ".vqmodel." not in f".{n}"]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, ramp=warmup, floor=0.1))
    pad = prompts.tokenizer.pad_token_id
    model.train()
    ema = None
    for step in range(steps):
        seqs, labs = [], []
        for _ in range(batch_size):
            i = rng.randrange(len(objects))
            ex = example(i, rng) if example else world_example(objects[i], rng, held_out)
            ids, labels = encode_example(prompts, ex, tokens[i])
            seqs.append(ids)
            labs.append(labels)
        ids, mask = pad_batch(seqs, pad)
        labels, _ = pad_batch(labs, pad, labels=True)
        loss = selected_answer_loss(model, ids, mask, labels, first_weight, decision_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if progress:
            progress(step, {"loss": ema})
    model.eval()
    parametrize.remove_parametrizations(embeddings, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"final_loss": ema, "steps": steps}
