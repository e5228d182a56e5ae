"""The world probes (unipers/world/probes.py) that the world benchmarks run: whole-answer scoring on the
embedded tiny model, description scoring, and a micro-size held-out build scored end to end."""

import torch

from unipers.world.probes import description_scores, held_out_descriptions, parse_object


def test_answer_logprob_is_the_whole_answer_scored_one_sequence_at_a_time(backbone_dir):
    from unipers.world.probes import answer_logprob, load_base

    model, _, prompts = load_base(backbone_dir)
    image = torch.tensor(model.model.vocabulary_mapping.image_tokens[:4])
    questions = ["<image>\nWhat shape is the object?", "<image>\nWhat colour is it?"]
    answers = ["Circle.", "A red striped square, in the corner."]  # different lengths: left padding differs
    got = answer_logprob(model, prompts, questions, answers, [image, image])
    for q, a, g in zip(questions, answers, got):
        enc = prompts.encode_qa(q, a, images=[image], mode="plain")
        ids, labels = torch.tensor([enc.ids]), torch.tensor(enc.labels)
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        scored = [logp[i - 1, labels[i]] for i in range(1, len(labels)) if labels[i] != -100]
        assert len(scored) >= len(prompts.tokenizer(a, add_special_tokens=False).input_ids)
        assert torch.allclose(g, torch.stack(scored).sum(), atol=1e-4)
    # a whole answer, not its first token: "Circle." and "Cross." differ after a shared first piece
    other = answer_logprob(model, prompts, questions[:1], ["Cross."], [image])
    assert not torch.allclose(other, got[:1])


def test_description_scores_count_each_attribute_by_whole_words():
    star = parse_object("purple striped star")
    texts = ["A purple striped star.", "A purple striped cross.", "A red checkered star.", "A starry purple thing."]
    got = description_scores(texts, [star] * 4)
    assert got == {"colour": 0.75, "pattern": 0.5, "shape": 0.5, "all": 0.25}


def test_micro_run_holds_the_objects_out_and_scores_every_row(tmp_path, monkeypatch):
    from unipers.world import base
    from unipers.world.build import RECIPE

    micro = RECIPE.scaled(0, n_train=40)  # one step a stage
    held = [parse_object(w) for w in ("purple striped star", "green checkered triangle")]
    drawn = []
    real = base.world_example

    def spy(obj, rng, held_out=(), **kw):
        drawn.append(obj)
        assert set(held) <= set(held_out)  # negatives are drawn from outside the held-out set too
        return real(obj, rng, held_out, **kw)

    monkeypatch.setattr(base, "world_example", spy)
    run = held_out_descriptions(0, held, photos=3, work=tmp_path, quiet=True, recipe=micro)
    assert drawn and not set(drawn) & set(held)
    assert list(run["rows"]) == [str(o) for o in held] + ["seen objects (fresh photos)"]
    for row in run["rows"].values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("colour", "pattern", "shape", "all"))
