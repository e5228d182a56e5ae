"""generate --think: the AR model rewrites the prompt with what it knows, and the decoder draws the rewrite.

The tiny base writes no useful rewrite, so `ask` is replaced by one that does: what is tested is that the
rewrite, and only it, reaches the decoder, that the sidecar keeps both prompts and regenerates the image
without thinking again, and that a rewrite which drops the concept is refused."""

import json

import pytest
import torch

from unipers.inference import InferenceSession
from unipers.inference.options import InputError
from unipers.data.samples import SUMMARY_QUESTION
from unipers.inference.session import THINK_QUESTION

GIVEN = "<bo> in the place where it lives"
RECALLED = "<bo> lives in the kitchen."
REWRITE = "<bo> sitting in the kitchen"


@pytest.fixture
def knowing(monkeypatch):
    """`ask` answers the recall question with RECALLED and the think question with REWRITE (and remembers
    what it was asked)."""
    asked = []

    def ask(self, question, *a, **k):
        asked.append(question)
        return " " + (RECALLED if question == SUMMARY_QUESTION.format(c="<bo>") else REWRITE) + " "

    monkeypatch.setattr(InferenceSession, "ask", ask)
    return asked


def test_the_decoder_draws_the_rewrite(session, knowing):
    thought = session.generate([GIVEN], seed=3, num_images=2, steps=2, think=True)
    direct = session.generate([REWRITE], seed=3, num_images=2, steps=2)
    assert torch.equal(thought.tensors, direct.tensors)
    # what the model recalls stands before the rewrite question
    assert knowing == [SUMMARY_QUESTION.format(c="<bo>"), RECALLED + " " + THINK_QUESTION.format(concepts="<bo>",
                                                                                                 prompt=GIVEN)]
    knowing.clear()
    assert session.think(GIVEN, recall=False) == REWRITE
    assert knowing == [THINK_QUESTION.format(concepts="<bo>", prompt=GIVEN)]
    assert [(s.prompt, s.thought_from) for s in thought.settings] == [(REWRITE, GIVEN)] * 2
    assert all(s.thought_from is None for s in direct.settings)


def test_a_rewrite_that_drops_the_concept_is_refused(session, monkeypatch):
    monkeypatch.setattr(InferenceSession, "ask", lambda self, q, *a, **k: "a kitchen")
    with pytest.raises(InputError, match="drops <bo>"):
        session.generate([GIVEN], steps=2, think=True)
    with pytest.raises(InputError, match="names no loaded concept"):
        session.think("a photo of a dog")


def test_the_sidecar_keeps_both_prompts_and_redraws_without_thinking(concept_files, knowing, unipers_cli, tmp_path):
    code, out, err = unipers_cli("generate", "--concept", concept_files["bo"], GIVEN, "--think", "--steps", "2",
                                 "--out", tmp_path / "a")
    assert code == 0, err
    assert f"think: {GIVEN!r} -> {REWRITE!r}" in err
    png = out.splitlines()[0]
    side = json.loads(open(png[:-4] + ".json").read())
    assert (side["prompt"], side["thought_from"]) == (REWRITE, GIVEN)
    assert "place_where_it_lives" in png  # named as the user wrote it

    knowing.clear()
    code, out2, err = unipers_cli("generate", "--from-sidecar", png[:-4] + ".json", "--out", tmp_path / "b")
    assert code == 0, err
    assert not knowing  # the sidecar holds the rewrite: no second thought
    from PIL import Image

    assert Image.open(png).tobytes() == Image.open(out2.splitlines()[0]).tobytes()
