"""Training pieces of the world's base, at tiny size: the tokenizer's k-means and pixel convention."""

import torch

from unipers.world.base import world_example
from unipers.world.tokenizer import kmeans, to_pixels
from unipers.world.synth import WorldObject, render_many, sample_objects


def test_kmeans_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    found = kmeans(x, 4, seed=0)
    dist = torch.cdist(centres, found).min(1).values
    assert dist.max() < 0.1


def test_pixels_match_the_chameleon_processor(backbone_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(backbone_dir)
    images = render_many(sample_objects(3, 0), 0)
    ours = to_pixels(images, processor.image_processor)
    theirs = processor.image_processor([Image.fromarray(i) for i in images], return_tensors="pt").pixel_values
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_tokenizer_training_gives_codes_that_depend_on_the_image(backbone_dir):
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.world.tokenizer import image_tokens, label_tensor, train_image_tokenizer

    model = ChameleonForConditionalGeneration.from_pretrained(backbone_dir)
    processor = AutoProcessor.from_pretrained(backbone_dir)
    objects = sample_objects(64, 1)
    pixels = to_pixels(render_many(objects, 1), processor.image_processor)
    stats = train_image_tokenizer(model, pixels, label_tensor(objects), steps=3, batch_size=8)
    tokens = image_tokens(model, pixels)
    assert stats["tokens_per_image"] == tokens.shape[1] == processor.image_seq_length
    assert tokens.unique().numel() > 16  # the k-means codebook is used, not a handful of codes
    vq = model.model.vqmodel
    assert not any(p.requires_grad for p in [*vq.encoder.parameters(), *vq.quant_conv.parameters()])


def test_pretraining_texts_answer_truthfully():
    import random

    from unipers.world.base import NONCE_NAMES, object_names
    from unipers.world.synth import with_article

    obj = WorldObject("star", "purple", "striped")
    names = object_names()
    assert len(set(names.values())) == len(names)  # one name per object
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        q, a, decision_only, description = world_example(obj, rng)
        recognition = description is not None
        assert recognition or not decision_only  # only recognition is ever scored on its first token alone
        seen.add(("decision only" if decision_only else "whole answer") if recognition else None)
        if q.endswith("What colour is the object?"):
            assert a == "Purple."
            seen.add("colour")
        elif recognition:
            # turn one describes the photo truly; turn two: "<name> is <description>. <question about name>"
            assert description == "A purple striped star." and "<image>" not in q
            name, rest = q.split(" is ", 1)
            assert name in NONCE_NAMES and name in rest.split(". ", 1)[1]
            described = rest.split(". ", 1)[0]
            words = described.split()[1:]  # after the article: "purple striped star", "dotted object"
            partial = words[-1] == "object"
            if not partial:
                assert described == with_article(" ".join(words))
            truth = all(w in obj.attributes().values() for w in words if w != "object")
            assert a.startswith("Yes" if truth else "No")
            seen.add(f"recognition {'yes' if truth else 'no'}{' partial' if partial else ''}")
        elif ", living in the " in q:  # a fact read off the prefix, in a concept fact's words
            name, rest = q.split(" is ", 1)
            home, likes = rest.split(", living in the ", 1)[1].split(". ", 1)[0].split(" and liking the ")
            assert a == (f"{name} lives in the {home}." if "Where does" in q else f"{name} likes the {likes}.")
            seen.add("fact")
        elif q.startswith("<image>\nIs the object"):
            word = q.rstrip("?").split()[-1]
            assert a == ("Yes." if word in obj.attributes().values() else "No.")
            seen.add("yes/no")
    seen.discard(None)
    assert seen == {"colour", "recognition yes", "recognition no", "recognition yes partial", "recognition no partial",
                    "yes/no", "decision only", "whole answer", "fact"}


def test_world_vocabulary_gives_each_answer_its_own_first_token():
    """The answer's first token is weighted as its decision: "Circle." and "Cross." must not both start
    with "C", and a fact's place words must be single tokens as the base reads and writes them."""
    from unipers.models.tiny import _tiny_tokenizer
    from unipers.world.base import PLACES
    from unipers.world.build import RECIPE, world_corpus
    from unipers.world.synth import ATTRIBUTES

    tok = _tiny_tokenizer(RECIPE.backbone["num_image_tokens"], RECIPE.backbone["vocab_size"], world_corpus())
    for values in ATTRIBUTES.values():
        first = [tok(v.capitalize() + ".", add_special_tokens=False).input_ids[0] for v in values]
        assert [tok.decode([f]) for f in first] == [v.capitalize() for v in values]
        assert all(len(tok(" " + v, add_special_tokens=False).input_ids) == 1 for v in values)
    assert all(len(tok(" " + p, add_special_tokens=False).input_ids) == 1 for p in PLACES)
    assert tok.decode(tok("Yes.", add_special_tokens=False).input_ids[:1]) == "Yes"


def test_described_examples_have_the_layout_personalization_and_recognize_use(backbone_dir):
    """The base learns recognition in exactly the ids `PromptBuilder.encode_described_qa` gives a concept
    (describe question from configs/world.yaml), plus labels on its own description; the decision (first
    token of the second answer) is weighted on its own."""
    from unipers.concepts.prompts import IGNORE_INDEX
    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel
    from unipers.world.base import DESCRIBE_QUESTION, WorldText, encode_example, weighted_answer_loss

    cfg = load_config(["world"], [f"backbone.path={backbone_dir}", "decoder.path=tiny", "connector.path=null"])
    assert cfg.backbone.describe_first == DESCRIBE_QUESTION
    model = UnifiedModel.from_config(cfg)
    p, tok = model.prompts, model.backbone.tokenizer
    image = torch.arange(4) + p.boi_id + 1
    ex = WorldText("zib is a red plain circle. Is zib in this photo?", "Yes, zib is in this photo.", False,
                   "A red plain circle.")
    ids, labels = encode_example(p, ex, image)
    description = tok("A red plain circle.", add_special_tokens=False).input_ids
    want = p.encode_described_qa(ex.question, ex.answer, image=image, description=description, mode="plain")
    assert ids == want.ids
    n1 = len(p.describe_prompt(image))
    assert labels[:n1] == [IGNORE_INDEX] * n1 and labels[n1:] == description + [tok.eos_token_id] + want.labels[n1 + len(description) + 1:]
    ids_d, labels_d = encode_example(p, ex._replace(decision_only=True), image)
    decision = n1 + len(description) + 1 + next(k for k, v in enumerate(want.labels[n1 + len(description) + 1:]) if v != IGNORE_INDEX)
    assert ids_d == ids and tok.decode([labels_d[decision]]) == "Yes"
    assert [k for k, v in enumerate(labels_d) if v != IGNORE_INDEX] == list(range(n1, n1 + len(description) + 1)) + [decision]

    # the loss weights the first token of each answer: moving only the decision's logit moves the loss 5x
    # as much as moving a token inside the description
    labels_t = torch.tensor([labels])
    logits = torch.zeros(1, len(ids), max(ids) + 1)
    def bumped(pos, decision_weight=None):
        x = logits.clone()
        x[0, pos - 1, ids[pos]] += 1.0
        loss = lambda z: weighted_answer_loss(z, labels_t, 5.0, decision_weight)  # noqa: E731
        return (loss(logits) - loss(x)).item()

    assert abs(bumped(decision) / bumped(n1 + 1) - 5.0) < 1e-3
    assert abs(bumped(n1) / bumped(n1 + 1) - 5.0) < 1e-3  # the description's first token too
    # pre-training's decision weight applies to the decision alone, not to the description's first token
    assert abs(bumped(decision, 20.0) / bumped(n1 + 1, 20.0) - 20.0) < 1e-3
    assert abs(bumped(n1, 20.0) / bumped(n1 + 1, 20.0) - 5.0) < 1e-3


def _pretraining_batch(model, processor, objects, n=6, seed=0):
    import random

    from unipers.concepts.bank import ConceptBank
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.padding import pad_batch
    from unipers.world.base import encode_example
    from unipers.world.tokenizer import image_tokens

    prompts = PromptBuilder(processor.tokenizer, ConceptBank(model.config.vocab_size, model.config.hidden_size),
                            boi_id=processor.image_start_token_id, eoi_id=processor.image_end_token_id)
    tokens = image_tokens(model, to_pixels(render_many(objects, seed), processor.image_processor))
    rng = random.Random(seed)
    seqs, labs = zip(*[encode_example(prompts, world_example(o, rng), t) for o, t in zip(objects[:n], tokens)])
    ids, mask = pad_batch(list(seqs), processor.tokenizer.pad_token_id)
    labels, _ = pad_batch(list(labs), processor.tokenizer.pad_token_id, labels=True)
    return prompts, tokens, ids, mask, labels


def test_selected_head_loss_is_the_full_logits_loss(backbone_dir):
    """Pre-training's LM head at labelled positions only gives the loss of the full forward's logits (whose
    image-token columns transformers masks), and the same gradients, up to float rounding."""
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.world.base import selected_answer_loss, weighted_answer_loss

    model = ChameleonForConditionalGeneration.from_pretrained(backbone_dir)
    processor = AutoProcessor.from_pretrained(backbone_dir)
    _, _, ids, mask, labels = _pretraining_batch(model, processor, sample_objects(6, 2))
    grads = []
    for loss_fn in (lambda: weighted_answer_loss(model(input_ids=ids, attention_mask=mask).logits, labels, 5.0, 20.0),
                    lambda: selected_answer_loss(model, ids, mask, labels, 5.0, 20.0)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, g_full), (sel, g_sel) = grads
    assert torch.allclose(full, sel, rtol=1e-5)
    assert g_full.keys() == g_sel.keys() and len(g_full) > 10
    for name in g_full:
        assert torch.allclose(g_full[name], g_sel[name], rtol=1e-4, atol=1e-7), name


def test_pretraining_keeps_image_embeddings_a_map_of_the_codebook_and_saves_a_stock_model(backbone_dir, tmp_path):
    """After pre-training every image-token row is the same trained linear map of its code's vector,
    text rows train freely, the VQ model is untouched, and the saved model reloads with identical rows."""
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    from unipers.world.base import pretrain_backbone
    from unipers.world.tokenizer import init_image_embeddings, standardized_codebook

    model = ChameleonForConditionalGeneration.from_pretrained(backbone_dir)
    processor = AutoProcessor.from_pretrained(backbone_dir)
    objects = sample_objects(8, 3)
    prompts, tokens, *_ = _pretraining_batch(model, processor, objects, seed=3)
    init_image_embeddings(model)
    codes, ids = standardized_codebook(model)
    before = model.get_input_embeddings().weight.detach().clone()
    vq_before = {n: p.detach().clone() for n, p in model.model.vqmodel.named_parameters()}
    pretrain_backbone(model, prompts, tokens, objects, steps=4, batch_size=4, lr=1e-2, seed=0)
    after = model.get_input_embeddings().weight.detach()
    assert not any("parametrizations" in name for name, _ in model.named_parameters())  # written back
    assert not (after[ids] == before[ids]).all()  # the map trained
    projection = torch.linalg.lstsq(codes, after[ids]).solution
    assert torch.allclose(codes @ projection, after[ids], atol=1e-4)  # ...and the rows are still one map of the codes
    text = torch.ones(len(after), dtype=torch.bool)
    text[ids] = False
    assert not torch.equal(after[text], before[text])
    assert all(torch.equal(p, vq_before[n]) for n, p in model.model.vqmodel.named_parameters())
    model.save_pretrained(tmp_path)
    reloaded = ChameleonForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_input_embeddings().weight, after)
