"""Copy detection: a generated image that reproduces a train photo is flagged by every measure, counted in
copy/share, and left out of the generation metrics recomputed without copies."""

import numpy as np
import pytest
import torch
from PIL import Image

from unipers.config import load_config
from unipers.eval import copies as C
from unipers.eval.prompts import PERSONAL
from unipers.eval.generation import GenerationScorer
from unipers.eval.runner import Evaluator
from unipers.eval.targets import load_targets


def test_pixel_similarity_sees_the_same_picture_through_size_brightness_and_contrast():
    rng = np.random.default_rng(0)

    def picture():  # smooth, as photos are: random 8 x 6 blocks, bilinearly enlarged
        return Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).resize((90, 120), Image.BILINEAR)

    photo, other = picture(), picture()
    thumbs = C.thumbnails([photo, other])
    square = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[:, 15:105, :]  # the centre square
    big = torch.nn.functional.interpolate(square[None].float(), size=(256, 256), mode="nearest")[0]
    dimmer = (big * 0.6 + 40).round().to(torch.uint8)
    sims = C.max_pixel_similarity(dimmer[None], thumbs)
    assert sims[0] > 0.95
    assert (C.thumbnails(dimmer[None]) @ thumbs[1]).item() < 0.2  # an unrelated picture is far


def test_flag_copies_judges_only_measures_with_a_threshold():
    sims = {"clip": [0.97, 0.5, 0.2], "pixel": [0.1, 0.99, 0.3], "dino": [0.99, 0.99, 0.99]}
    assert C.flag_copies(sims, {"clip": 0.95, "pixel": 0.95}) == [True, True, False]
    assert C.flag_copies(sims, {}) == [False, False, False]
    assert C.without([1.0, 2.0, 3.0], ["a", "b", "c"], [True, False, False]) == ([2.0, 3.0], ["b", "c"])


def test_a_generated_train_photo_is_a_copy_and_leaves_the_metrics(session, prepared_concepts, clip_dir, dino_dir,
                                                                   monkeypatch):
    from unipers.eval.models import ClipEmbedder, DinoEmbedder, open_photos

    # The tiny random CLIP and DINO embed every picture alike: only the pixel measure can tell noise apart.
    settings = load_config([], ["eval.images_per_prompt=2", "eval.prompts=['a photo of {concept}']",
                                "eval.copy_thresholds={clip: 1.5, dino: 1.5}"]).eval  # above 1: off
    ev = Evaluator(session, settings, clip=ClipEmbedder.load(str(clip_dir), "cpu"),
                   dino=DinoEmbedder.load(str(dino_dir), "cpu"))
    target = load_targets(prepared_concepts, ["bo"])["bo"]
    photo = torch.from_numpy(np.array(open_photos(target.references[:1])[0])).permute(2, 0, 1).float() / 255
    noise = torch.rand(photo.shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(GenerationScorer, "draw", lambda self, prompt, method, ref: torch.stack([photo, noise]))
    metrics, counts, samples = ev.score(target, PERSONAL)

    assert samples["copy/share"]["values"] == [1.0, 0.0] and metrics["copy/share"] == 0.5 and counts["copy/n"] == 1
    for measure in ("clip", "dino", "pixel"):
        assert samples[f"copy/{measure}_max"]["values"][0] == pytest.approx(1.0, abs=1e-4), measure
    for metric in ("clip_i", "dino", "clip_t"):
        kept = samples[f"{metric}/no_copies"]
        assert kept["ids"] == samples[metric]["ids"][1:] and kept["values"] == samples[metric]["values"][1:]
        assert metrics[f"{metric}/no_copies"] == pytest.approx(samples[metric]["values"][1])

    with pytest.raises(Exception, match="copy_thresholds"):
        load_config([], ["eval.copy_thresholds={clip: -2.0}"])
    with pytest.raises(Exception, match="copy_thresholds"):
        load_config([], ["eval.copy_thresholds={ssim: 0.5}"])
