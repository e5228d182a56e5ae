"""Augmented views: seeded, the image's own size, crops and mirrors only (colour is identity)."""

import random

import numpy as np
import pytest
from PIL import Image

from unipers.data.augment import ViewSpec, augment_view, crop_box, split_view_key, view_key


def picture(w=48, h=40):
    rng = np.random.default_rng(0)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (200, 30, 30)
    arr[:, w // 2:] = (30, 30, 200)
    arr[5:12, 5:12] = rng.integers(0, 255, (7, 7, 3))
    return Image.fromarray(arr)


def test_a_view_is_fixed_by_its_seed_and_keeps_the_size():
    img, spec = picture(), ViewSpec(views=4)
    a, b = augment_view(img, spec, "images/train_000.png#1"), augment_view(img, spec, "images/train_000.png#1")
    assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    others = [np.asarray(augment_view(img, spec, f"images/train_000.png#{v}")) for v in range(2, 8)]
    assert not all(np.array_equal(np.asarray(a), o) for o in others)


def test_full_area_views_are_the_photo_or_its_mirror_and_colours_stay():
    img = picture()
    spec = ViewSpec(views=1, scale=(1.0, 1.0), ratio=(48 / 40, 48 / 40))
    seen = set()
    for v in range(12):
        out = np.asarray(augment_view(img, spec, f"k{v}")).astype(int)
        same, mirror = np.asarray(img).astype(int), np.asarray(img)[:, ::-1].astype(int)
        assert np.abs(out - same).max() <= 1 or np.abs(out - mirror).max() <= 1
        seen.add(bool(np.abs(out - same).max() <= 1))
    assert seen == {True, False}  # both kept and mirrored views occur
    no_flip = ViewSpec(views=1, scale=(1.0, 1.0), ratio=(48 / 40, 48 / 40), flip=False)
    assert all(np.abs(np.asarray(augment_view(img, no_flip, f"k{v}")).astype(int)
                   - np.asarray(img).astype(int)).max() <= 1 for v in range(6))


@pytest.mark.parametrize("w,h", [(32, 32), (640, 480), (33, 700)])
def test_crop_boxes_stay_inside_the_image_with_the_asked_area(w, h):
    spec = ViewSpec(views=1, scale=(0.5, 0.8))
    rng = random.Random(0)
    for _ in range(200):
        top, left, ch, cw = crop_box(w, h, spec, rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        if h > 2 * w:  # no crop of that area and aspect fits a 33 x 700 strip: the central square
            assert (top, left, ch, cw) == ((h - w) // 2, 0, w, w)
        else:  # area share within the asked range, up to rounding the sides to pixels
            assert 0.5 * 0.94 <= ch * cw / (w * h) <= 0.8 * 1.06
            assert 0.9 * 0.9 <= cw / ch <= 1.1 / 0.9


def test_view_keys_round_trip_and_name_the_distribution():
    spec = ViewSpec(views=8, scale=(0.625, 0.9), ratio=(0.8, 1.25), flip=False)  # exact, not rounded
    assert view_key("/d/bo/images/train_000.png", spec, 0) == "/d/bo/images/train_000.png"
    path, back, view = split_view_key(view_key("/d/bo/images/train_000.png", spec, 5))
    assert (path, back.scale, back.ratio, back.flip, view) == ("/d/bo/images/train_000.png", spec.scale, spec.ratio,
                                                                False, 5)
    assert split_view_key("/d/bo/images/x.png") == ("/d/bo/images/x.png", None, 0)
    assert view_key("x.png", spec, 1) != view_key("x.png", ViewSpec(views=8), 1)  # other views, other cache rows
    tiny = ViewSpec(views=1, scale=(1e-5, 1.0))
    assert split_view_key(view_key("x.png", tiny, 1))[1].scale == (1e-5, 1.0)


@pytest.mark.parametrize("kw,match", [({"views": -1}, "views"), ({"scale": (0.0, 1.0)}, "scale"),
                                      ({"scale": (0.9, 0.5)}, "scale"), ({"ratio": (0.0, 1.0)}, "ratio"),
                                      ({"scale": (0.5,)}, r"scale must be \[lo, hi\]")])
def test_bad_specs_are_refused(kw, match):
    from unipers.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ViewSpec(**kw)
