"""Concepts trained apart compose: loading another concept changes nothing, bit for bit, for a prompt that
does not name it, whether it was loaded before (shifting the first concept's token ids) or after."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def composer(concept_files):
    from unipers.config import load_config
    from unipers.inference import InferenceSession

    return InferenceSession.from_config(load_config([]))


def outputs(s, photos) -> dict:
    """Everything a user gets about <bo>: answers (greedy and sampled), recognition, generated images."""
    return {
        "greedy": s.ask("What is <bo> doing?", max_new_tokens=12),
        "sampled": s.ask("Tell me about <bo>.", max_new_tokens=12, temperature=1.5, seed=3),
        "about_a_photo": s.ask("What is <bo> doing here?", [photos[0]], max_new_tokens=8, temperature=1.0, seed=1),
        "no_concept": s.ask("What is in this photo?", [photos[1]], max_new_tokens=8, temperature=1.0, seed=2),
        "recognize": s.recognize("bo", photos),
        "images": s.generate(["A photo of <bo> on a beach."], steps=3, seed=1, num_images=2).tensors,
    }


def assert_identical(got: dict, want: dict) -> None:
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, (key, got[key], value)


def test_loading_another_concept_changes_nothing_for_a_prompt_that_does_not_name_it(composer, concept_files,
                                                                                   prepared_concepts):
    photos = sorted((Path(prepared_concepts[0]) / "images").rglob("*.png"))[:4]
    s = composer
    s.unload()
    s.load(concept_files["bo"])
    alone = outputs(s, photos)
    first_id = s.model.bank.info["bo"].first_id

    s.load(concept_files["mam"])  # after <bo>: <bo>'s ids stay
    assert_identical(outputs(s, photos), alone)

    s.unload()
    s.load(concept_files["mam"])  # before <bo>: every <bo> id moves up by <mam>'s token count
    s.load(concept_files["bo"])
    assert s.model.bank.info["bo"].first_id != first_id
    assert_identical(outputs(s, photos), alone)
    s.unload()


def test_a_prompt_naming_both_has_both_concepts_live(composer, concept_files):
    from unipers.concepts.prompts import PromptBuilder

    s = composer
    s.unload()
    s.load(concept_files["bo"])
    s.load(concept_files["mam"])
    bb = s.backbone
    ids = torch.tensor([PromptBuilder.for_backbone(bb).encode("Are <bo> and <mam> friends?", mode="und")])
    with torch.no_grad():
        hidden, _ = bb.hidden_states(ids)
        presence = bb.bank.presence(ids)
        logits = bb.logits(hidden[:, -1], presence)
    # Both identifiers have a head row: both get a real logit column, and the column maps back to the id.
    bo, mam = (bb.bank.info[n].first_id for n in ("bo", "mam"))
    columns = bb.to_columns(torch.tensor([bo, mam]), presence)
    assert (logits[0, columns] > torch.finfo(logits.dtype).min).all()
    assert torch.equal(bb.to_ids(columns, presence), torch.tensor([bo, mam]))
    # Both concepts' input rows are spliced: changing either one's rows changes the prompt's hidden states.
    for name in ("bo", "mam"):
        row = bb.bank.rows[name].embed["identifier"]
        saved = row.detach().clone()
        with torch.no_grad():
            row.add_(1.0)
            moved, _ = bb.hidden_states(ids)
            row.copy_(saved)
        assert not torch.equal(moved, hidden), name
    s.unload()
