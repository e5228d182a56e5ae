"""Fixtures for the data tests."""

import pytest

from synthetic import write_photos, write_pool


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP vision tower + processor saved like a real local checkpoint."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture
def photos_dir(tmp_path):
    write_photos(tmp_path / "photos", 6)
    return tmp_path / "photos"


@pytest.fixture
def pool_dir(tmp_path):
    return write_pool(tmp_path / "pool")
