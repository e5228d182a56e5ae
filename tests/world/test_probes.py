"""The world probes' whole-answer scoring (unipers/world/probes.py), on the embedded tiny model."""

import torch


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
