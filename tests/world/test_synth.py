"""The tiny world's generator: seeded, complete, and the near-misses really are near."""

import random

import numpy as np
import pytest

from unipers.world.synth import (ATTRIBUTES, COLOURS, WorldObject, all_objects, near_misses, render, render_many,
                                 sample_objects)


def test_the_world_is_every_combination_once():
    objects = all_objects()
    assert len(objects) == len(set(objects)) == 6 * 7 * 4


def test_same_seed_same_pixels_other_seed_other_pixels():
    objects = sample_objects(6, 3)
    a, b = render_many(objects, 3), render_many(objects, 3)
    assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_many(objects, 4))


def test_near_misses_share_exactly_two_attributes():
    obj = WorldObject("star", "purple", "striped")
    near = near_misses(obj)
    assert len(near) == 5 + 6 + 3  # one attribute changed at a time
    assert obj not in near and all(o.shared(obj) == 2 for o in near)


def test_sample_objects_never_draws_an_excluded_object():
    banned = WorldObject("star", "purple", "striped")
    drawn = sample_objects(3000, 0, exclude=[banned])
    assert banned not in drawn
    assert len(set(drawn)) == len(all_objects()) - 1  # everything else does appear


def test_unknown_attribute_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown colour 'mauve'.*purple"):
        WorldObject("star", "mauve", "plain")


def test_object_colour_dominates_and_patterns_add_a_second_colour():
    rng = random.Random(0)
    plain = np.asarray(render(WorldObject("square", "red", "plain"), rng)).reshape(-1, 3).astype(int)
    striped = np.asarray(render(WorldObject("square", "red", "striped"), random.Random(0))).reshape(-1, 3).astype(int)
    red = np.array(COLOURS["red"])
    near_red = lambda px: (np.abs(px - red).max(1) < 40).mean()  # noqa: E731
    assert near_red(plain) > 0.25  # the square covers a good part of the picture
    assert near_red(striped) < near_red(plain) * 0.8  # stripes replace some of the red


def test_describe_drops_attributes_but_keeps_the_shape():
    obj = WorldObject("cross", "white", "dotted")
    assert obj.describe() == "white dotted cross"
    assert obj.describe(keep=()) == "cross"
    assert set(ATTRIBUTES) == {"shape", "colour", "pattern"}
