"""The composition benchmark's choice of concepts (unipers.world.compose): no training, no world build."""

import pytest

from unipers.concepts.names import validate_name
from unipers.world.base import NONCE_NAMES, object_names
from unipers.world.build import demo_object
from unipers.world.compose import NAMES, choose_objects, concept_facts, training_objects


@pytest.mark.parametrize("n", [2, 3, 4])
def test_choice_is_deterministic_from_the_seed(n):
    assert choose_objects(n, 0) == choose_objects(n, 0)
    assert choose_objects(n, 5) == choose_objects(n, 5)
    draws = {tuple(choose_objects(n, seed)) for seed in range(6)}
    assert len(draws) > 1  # the seed moves the choice
    assert choose_objects(n, 3)[:2] == choose_objects(4, 3)[:2]  # more concepts add, not redraw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objects_distinct_with_one_near_miss_pair(seed):
    objs = choose_objects(4, seed)
    assert len(set(objs)) == 4
    assert objs[0] == demo_object()  # <bo>: the demo's object
    assert objs[1].shared(objs[0]) == 2  # <mam>: its near-miss
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            if {a, b} != {objs[0], objs[1]}:
                assert a.shared(b) <= 1


def test_objects_are_outside_the_training_photos_of_their_base():
    objs = choose_objects(4, 0)
    assert not set(objs) & set(training_objects(objs))
    # ... while the demo world's base (only the demo object held out) saw every other object:
    # which is why the benchmark builds its own base by default.
    seen = set(training_objects([demo_object()]))
    assert demo_object() not in seen and all(o in seen for o in objs[1:])


def test_names_are_valid_distinct_and_unused_by_the_base():
    assert len(set(NAMES)) == len(NAMES) == 4
    taken = set(NONCE_NAMES) | set(object_names().values())
    for name in NAMES:
        assert validate_name(name) == name and name not in taken


def test_facts_name_each_concept_and_places_differ():
    objs = choose_objects(4, 0)
    facts = concept_facts(NAMES, objs, 0)
    assert facts["bo"][0][2] == "kitchen"  # the demo's own facts for <bo>
    places = [f[2] for name in NAMES for f in facts[name][:2]]
    assert len(set(places)) == len(places)
    for name, obj in zip(NAMES, objs):
        assert all(f"<{name}>" in q and f"<{name}>" in a for q, a, _ in facts[name])
        assert facts[name][2][2] == obj.colour


def test_two_to_four_concepts():
    with pytest.raises(ValueError):
        choose_objects(1, 0)
    with pytest.raises(ValueError):
        choose_objects(5, 0)
