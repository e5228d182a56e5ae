"""ConceptBank: only the rows in a batch move, exact trainable counts, name checks, prompt layouts."""

import pytest
import torch

from unipers.concepts.bank import GROUPS
from unipers.concepts.names import ConceptNameError
from unipers.concepts.prompts import PromptBuilder, PromptError


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_only_rows_in_batch_change_with_weight_decay(make_backbone, qa_batch):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    bb.add_concept("mam", "cat")
    base0, bank0 = snapshot(bb.model), snapshot(bb.bank)
    opt = torch.optim.AdamW(bb.bank.parameters(), lr=1e-2, weight_decay=0.1)

    def step(items):
        opt.zero_grad(set_to_none=True)
        bb.understanding_loss(*qa_batch(bb, items)).backward()
        opt.step()

    step([("Is <bo> in this photo?", "Yes, <bo> is here."), ("What colour is <bo>?", "Brown.")])
    assert changed(bank0, bb.bank) == {
        "rows.bo.embed.identifier", "rows.bo.embed.shared", "rows.bo.embed.und", "rows.bo.head.identifier"
    }  # bo's gen slots are not in understanding prompts; mam is not in the batch
    bank1 = snapshot(bb.bank)
    # Adam has momentum for bo now, and weight decay is on: bo must still not move in a mam-only step.
    step([("Is <mam> sleeping?", "No.")])
    moved = changed(bank1, bb.bank)
    assert moved and all(k.startswith("rows.mam.") for k in moved)
    assert not changed(base0, bb.model)  # the base never moves
    assert all(not p.requires_grad for p in bb.model.parameters())


@pytest.mark.parametrize("head_rows, head_count", [("identifier", lambda s, u, g: 1),
                                                    ("all", lambda s, u, g: 1 + s + u + g),
                                                    ("none", lambda s, u, g: 0)])
def test_trainable_parameter_count_is_exact(make_backbone, head_rows, head_count):
    bb = make_backbone(num_shared=2, num_und=3, num_gen=4, head_rows=head_rows)
    bb.add_concept("bo", "dog")
    bb.add_concept("mam", "cat")
    hidden = bb.hidden_size
    rows = 1 + 2 + 3 + 4
    expected = 2 * (rows * hidden + head_count(2, 3, 4) * hidden)
    trainable = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    assert trainable == expected
    assert bb.bank.num_tokens == 2 * rows


def test_empty_bank_matches_plain_hf_model(make_backbone):
    bb = make_backbone()
    img = bb.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)[0]
    ids = torch.tensor([[bb.tokenizer.bos_token_id, 300, 301, *bb.image_segment(img), 302, 303]])
    ours = bb.full_logits(ids)
    stock = bb.model(input_ids=ids).logits
    assert torch.equal(ours, stock)
    # text_only=False leaves image-token logits as the raw head computes them.
    raw = bb.full_logits(ids, text_only=False)
    assert torch.equal(raw, bb.model.lm_head(bb.model.model(input_ids=ids).last_hidden_state))


@pytest.mark.parametrize("bad", ["", "<bo>", "bo bo", "a/b", "../x", "image", "reserved08706", "x" * 33, "bo\n", "é"])
def test_bad_names_are_refused(make_backbone, bad):
    bb = make_backbone()
    with pytest.raises(ConceptNameError):
        bb.add_concept(bad, "dog")


def test_duplicate_name_refused(make_backbone):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    with pytest.raises(ConceptNameError, match="already loaded"):
        bb.add_concept("bo", "dog")


def test_initialisation(make_backbone):
    bb = make_backbone()
    table = bb.model.get_input_embeddings().weight
    bb.add_concept("bo", "dog", init_noise=0.0)
    word = bb.tokenizer("dog", add_special_tokens=False).input_ids
    for p in bb.bank.rows["bo"].embed.values():
        assert torch.allclose(p, table[word].mean(0).expand_as(p))
    bb.add_concept("zz", None, init="random")
    rand = torch.cat(list(bb.bank.rows["zz"].embed.values()))
    assert 0.5 < rand.std().item() / table.std().item() < 2.0
    with pytest.raises(ValueError, match="init"):
        bb.add_concept("yy", "dog", init="zeros")


def test_concept_logits_only_where_mentioned(make_backbone):
    bb = make_backbone(head_rows="all")
    bb.add_concept("bo", "dog")
    bb.add_concept("mam", "cat")
    builder = PromptBuilder.for_backbone(bb)
    ids = torch.tensor([builder.encode("Is <bo> here?")])
    logits = bb.full_logits(ids)
    low = torch.finfo(logits.dtype).min
    bo, mam = bb.bank.info["bo"], bb.bank.info["mam"]
    assert (logits[..., bo.first_id:bo.end_id] > low).all()
    assert (logits[..., mam.first_id:mam.end_id] == low).all()


def test_prompt_layouts(make_backbone):
    bb = make_backbone(num_shared=2, num_und=3, num_gen=4)
    info = bb.add_concept("bo", "dog")
    builder = PromptBuilder.for_backbone(bb)
    und = builder.encode("Is <bo> here?", mode="und")
    gen = builder.encode("<bo> on a beach", mode="gen")
    soft = builder.encode("<bo> on a beach", mode="gen", gen_slots=1)
    plain = builder.encode("<bo> on a beach", mode="plain")
    ids = lambda g: set(info.token_ids(g))
    assert ids("shared") | ids("und") <= set(und) and not ids("gen") & set(und)
    assert ids("shared") | ids("gen") <= set(gen) and not ids("und") & set(gen)
    assert set(soft) & ids("gen") == {info.token_ids("gen")[0]}
    assert set(plain) & set(range(info.first_id, info.end_id)) == {info.first_id}
    with pytest.raises(PromptError, match=r"<mam>.*loaded: <bo>"):
        builder.encode("Is <mam> here?")
    with pytest.raises(PromptError, match="1 <image> placeholder"):
        builder.encode("<image> what is this?")
    with pytest.raises(PromptError, match="longer than the model's context"):
        builder.encode("dog " * 2000)
    assert GROUPS == ("identifier", "shared", "und", "gen")


def test_prompt_text_cache_gives_the_tokenizer_ids_and_cannot_be_corrupted(make_backbone):
    """Training re-encodes the same templated pieces every step; the builder tokenizes each once. A cached
    piece encodes as the tokenizer does, and changing a returned list changes nothing later."""
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    builder = PromptBuilder.for_backbone(bb)
    text = "Is <bo> in this photo? It is a red dog."
    first = builder.encode(text, mode="plain")
    first.append(-1)
    again = builder.encode(text, mode="plain")
    assert again == first[:-1]
    piece = " in this photo? It is a red dog."
    assert builder._text(piece) == bb.tokenizer(piece, add_special_tokens=False).input_ids
    builder._text(piece).clear()
    assert builder._text(piece) == bb.tokenizer(piece, add_special_tokens=False).input_ids
