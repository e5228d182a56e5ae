"""CLIP / DINO through the checkpoint's own preprocessing: identical images score 1, the key to set is named."""

import numpy as np
import pytest
import torch
from PIL import Image

from unipers.eval import metrics as M
from unipers.eval.models import ClipEmbedder, DinoEmbedder, MetricModelError, to_pil


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)  # not square: resize + crop both act
        Image.fromarray(pixels).save(root / f"p{i}.png")
        paths.append(root / f"p{i}.png")
    return paths


def as_generated(path) -> torch.Tensor:
    """A photo as the decoder returns images: (1, 3, H, W) floats in [0, 1]."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def test_to_pil_rounds_instead_of_truncating():
    x = torch.tensor([0.0, 0.5, 0.999, 1.2, -0.1]).view(1, 1, 5, 1).expand(1, 3, 5, 1)
    assert np.asarray(to_pil(x)[0])[:, 0, 0].tolist() == [0, 128, 255, 255, 0]


def test_identical_images_give_clip_i_and_dino_of_one(clip_dir, dino_dir, photos):
    from unipers.eval.models import open_photos

    clip, dino = ClipEmbedder.load(clip_dir), DinoEmbedder.load(dino_dir)
    for model in (clip, dino):
        generated = model.images(as_generated(photos[0]))  # the tensor path (to uint8, processor)
        reference = model.images(open_photos(photos[:1]))  # the photo path
        assert M.mean_pairwise_cosine(generated, reference) == pytest.approx(1.0, abs=1e-5)
        other = model.images(open_photos(photos[1:]))
        assert M.mean_pairwise_cosine(generated, other) < 0.999
    # The processor really normalizes with CLIP's statistics: a mid-grey image is not all zeros.
    px = clip._pixels(to_pil(torch.full((1, 3, 8, 8), 0.5)))
    assert px.shape[-2:] == (32, 32) and px.abs().max() > 0.01
    texts = clip.texts(["a photo of a dog", "a cat"])
    assert texts.shape == (2, 16) and torch.allclose(texts.norm(dim=-1), torch.ones(2))


def test_missing_metric_model_names_the_key(tmp_path):
    with pytest.raises(MetricModelError, match=r"CLIP-I needs a CLIP model: set eval\.clip_path=/path/to/clip"):
        ClipEmbedder.load(None)
    with pytest.raises(MetricModelError, match=r"eval\.dino_path=.*no config\.json"):
        DinoEmbedder.load(tmp_path)
