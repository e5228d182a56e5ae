"""ARBackbone: padding-invariant, losses on the right positions, image tokens cached per image."""

import pytest
import torch
import torch.nn.functional as F

from unipers.concepts.prompts import PromptBuilder
from unipers.models.padding import pad_batch


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_sequences(make_backbone, side):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    builder = PromptBuilder.for_backbone(bb)
    seqs = [builder.encode("Is <bo> in the garden?"), builder.encode("hello")]
    ids, mask = pad_batch(seqs, bb.tokenizer.pad_token_id, side=side)
    hidden, _ = bb.hidden_states(ids, mask)
    for row, seq in enumerate(seqs):
        alone, _ = bb.hidden_states(torch.tensor([seq]))
        valid = mask[row].bool()
        assert torch.allclose(hidden[row][valid], alone[0], atol=1e-5)


def test_understanding_loss_is_nll_of_answer_tokens_only(make_backbone, qa_batch):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    ids, mask, labels = qa_batch(bb, [("Is <bo> here?", "Yes."), ("What is <bo> doing?", "<bo> is sleeping.")])
    loss = bb.understanding_loss(ids, mask, labels)
    logits = bb.full_logits(ids, mask)[:, :-1]
    target = labels[:, 1:]
    manual = F.cross_entropy(logits[target != -100], target[target != -100])
    assert torch.allclose(loss, manual, atol=1e-6)
    # Changing a question token changes the loss; changing a padded position does not.
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    assert torch.equal(bb.understanding_loss(ids2, mask, labels), loss)


def test_image_token_loss_uses_unmasked_image_logits(make_backbone):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    img = bb.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)[0]
    seq = PromptBuilder.for_backbone(bb).encode("<bo> <image>", images=[img], mode="gen")
    ids = torch.tensor([seq])
    labels = torch.full_like(ids, -100)
    is_img = torch.isin(ids, bb.image_token_ids)
    labels[is_img] = ids[is_img]
    loss = bb.image_token_loss(ids, None, labels)
    assert torch.isfinite(loss)  # the stock forward's logits would be -inf at every image token
    loss.backward()
    rows = bb.bank.rows["bo"].embed
    assert rows["gen"].grad is not None and rows["und"].grad is None
    # The understanding loss on the same labels is enormous: image tokens are masked there.
    assert bb.understanding_loss(ids, None, labels) > 1e3


def test_image_tokens_are_cached_per_image(make_backbone, monkeypatch):
    bb = make_backbone()
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    calls = []
    real = bb.encode_images
    monkeypatch.setattr(bb, "encode_images", lambda px: calls.append(len(px)) or real(px))
    first = bb.image_tokens(pixels, ["a", "b", "c"])
    again = bb.image_tokens(pixels[[2, 0]], ["c", "a"])
    assert calls == [3]
    assert torch.equal(again, first[[2, 0]])
    assert first.shape == (3, bb.image_seq_length) and bool(torch.isin(first, bb.image_token_ids).all())


def test_frozen_base_stays_in_eval_mode(make_backbone):
    bb = make_backbone()
    bb.train()
    assert not bb.model.training and bb.training


def test_missing_folder_and_no_config(tmp_path, make_backbone):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_backbone(path=tmp_path)


def test_generate_cached_equals_uncached_and_batch_equals_single(make_backbone):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    builder = PromptBuilder.for_backbone(bb)
    seqs = [builder.encode_question("Is <bo> in the garden?"), builder.encode_question("what is that")]
    ids, mask = pad_batch(seqs, bb.tokenizer.pad_token_id, side="left")
    cached = bb.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(cached, bb.generate(ids, mask, max_new_tokens=12, use_cache=False))
    for row, seq in enumerate(seqs):
        alone = bb.generate(torch.tensor([seq]), max_new_tokens=12)[0]
        assert torch.equal(alone, cached[row][: len(alone)])
    sample = lambda: bb.generate(ids, mask, max_new_tokens=6, temperature=1.0, top_p=0.9,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample(), sample())


def test_gradient_checkpointing_gives_the_same_gradients(backbone_dir, qa_batch):
    """Recomputing the frozen backbone's activations must not change what the concept rows learn."""
    from unipers.concepts.bank import SlotLayout
    from unipers.models.backbone import ARBackbone

    grads, calls = [], []
    for checkpointing in (False, True):
        bb = ARBackbone.from_pretrained(backbone_dir, layout=SlotLayout(2, 2, 2), gradient_checkpointing=checkpointing)
        bb.add_concept("bo", "dog")
        bb.train()
        count = [0]
        # A pre-hook: checkpoint recomputation stops early, before the layer's outputs, so post-hooks miss it.
        bb.model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        bb.understanding_loss(*qa_batch(bb, [("Is <bo> here?", "Yes, <bo> is here.")])).backward()
        grads.append({k: p.grad.clone() for k, p in bb.bank.named_parameters() if p.grad is not None})
        calls.append(count[0])
        assert not bb.model.model.layers[0].self_attn.training  # no dropout in the frozen base
    assert calls == [1, 2]  # checkpointing really recomputed the layer in the backward pass
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k
