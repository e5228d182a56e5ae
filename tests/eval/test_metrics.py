"""The metric functions on cases with known answers."""

import pytest
import torch

from unipers.eval import metrics as M


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), ("Yes, <bo> is in this photo.", True), ("yes.", True), ("YES", True), ("Sure, yes!", True),
    ("No", False), ("no.", False), ("No, this is not <bo>.", False), ("NO WAY", False),
    ("I don't know", None), ("not", None), ("I know it", None), ("the eyes are blue", None),
    ("a nose", None), ("nothing here", None), ("Yes and no", None), ("", None), ("Yesterday", None),
])
def test_parse_yes_no_whole_words_only(text, expected):
    assert M.parse_yes_no(text) is expected


def test_always_yes_scores_one_zero_and_half():
    labels = [True] * 3 + [False] * 5
    acc = M.recognition_accuracy([True] * 8, labels)
    assert (acc["pos"], acc["neg"], acc["weighted"]) == (1.0, 0.0, 0.5)
    assert (acc["n_pos"], acc["n_neg"], acc["unparsed"]) == (3, 5, 0)


def test_unparsed_answers_count_as_wrong_and_are_reported():
    acc = M.recognition_accuracy([True, None, False, None], [True, True, False, False])
    assert (acc["pos"], acc["neg"], acc["weighted"], acc["unparsed"], acc["unparsed_rate"]) == (0.5, 0.5, 0.5, 2, 0.5)
    assert M.recognition_accuracy([True], [True])["weighted"] is None  # one side alone is no weighted accuracy


def test_option_choices_sum_and_mean_differ_on_length():
    # A: two tokens, sum -2.0, mean -1.0; B: one token, -1.5: the sum prefers B, the mean A
    assert M.option_choices({"A": [-1.0, -1.0], "B": [-1.5]}) == ("B", "A")
    assert M.option_choices({"A": [-3.0], "B": [-0.1, -0.2]}) == ("B", "B")
    with pytest.raises(ValueError, match="no tokens"):
        M.option_choices({"A": []})


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(C) the red one", "C"), ("A) blue", "A"), ("The answer is C.", "C"),
    ("red collar", "B"), ("It has a red collar.", "B"), ("A dog on a sofa", None), ("I am not sure", None),
    ("blue collar or red collar", None),
])
def test_parse_option(text, expected):
    options = {"A": "blue collar", "B": "red collar", "C": "no collar"}
    assert M.parse_option(text, options) == expected


def test_caption_names_concept_by_token_or_word():
    assert M.names_concept("a dog on grass", "bo", [5, 900, 7], identifier_id=900)
    assert M.names_concept("<bo> on grass", "bo") and M.names_concept("Bo sleeps", "bo")
    assert not M.names_concept("a bonus dog", "bo", [5, 7], identifier_id=900)
    assert M.caption_recall([True, False, True, True]) == 0.75 and M.caption_recall([]) is None


def test_cosines_normalize_and_average_every_pair():
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0]])
    assert M.mean_pairwise_cosine(a, a[:1] * 7) == pytest.approx(0.5)  # (1 + 0) / 2 pairs
    assert M.mean_pairwise_cosine(b, b * 5) == pytest.approx(1.0)
    assert M.mean_paired_cosine(a, torch.tensor([[1.0, 0.0], [0.0, -4.0]])) == pytest.approx(0.0)
    assert M.mean_of([0.5, None, 1.0]) == 0.75 and M.mean_of([None]) is None
