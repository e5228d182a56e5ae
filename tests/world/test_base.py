"""Training pieces of the world's base, at tiny size: the tokenizer's k-means and pixel convention."""

import torch

from unipers.world.base import kmeans, to_pixels, world_example
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

    from unipers.world.base import image_tokens, label_tensor, train_image_tokenizer

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

    from unipers.world.base import object_names

    obj = WorldObject("star", "purple", "striped")
    names = object_names()
    assert len(set(names.values())) == len(names)  # one name per object
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        q, a = world_example(obj, rng)
        if q.endswith("What colour is the object?"):
            assert a == "Purple."
            seen.add("colour")
        elif names[obj] in q and q.startswith("<image>") and "Is " in q:
            assert a.startswith("Yes")
            seen.add("own name")
        elif q.startswith("<image>\nIs the object"):
            word = q.rstrip("?").split()[-1]
            assert a == ("Yes." if word in obj.attributes().values() else "No.")
            seen.add("yes/no")
    assert seen == {"colour", "own name", "yes/no"}
