"""UnifiedModel: one set of concept rows, two losses, each reaching exactly the slot groups it should."""

import pytest
import torch

from unipers.concepts.io import ConceptFileError
from unipers.config import load_config
from unipers.models.unified import UnifiedModel


@pytest.fixture
def model(tiny_dirs):
    cfg = load_config([], ["bank.num_shared=2", "bank.num_und=3", "bank.num_gen=4", "bank.head_rows=all"])
    m = UnifiedModel.from_config(cfg)  # "tiny" resolves to the session's tiny folders (UNIPERS_TINY_DIR)
    m.add_concept("bo", "dog")
    return m


def grads(model, name="bo"):
    rows = model.bank.rows[name]
    embed = {g: p.grad is not None and p.grad.abs().sum().item() > 0 for g, p in rows.embed.items()}
    head = {g: p.grad is not None for g, p in rows.head.items()}
    return embed, head


def test_diffusion_loss_reaches_generation_and_shared_slots_only(model):
    ids, mask = model.encode_batch(["A photo of <bo> on a beach.", "<bo> in the snow"], mode="gen")
    latents = torch.randn(2, model.decoder.latent_channels, model.decoder.latent_size, model.decoder.latent_size)
    model.diffusion_loss(ids, mask, latents, generator=torch.Generator().manual_seed(0)).backward()
    embed, head = grads(model)
    assert embed == {"identifier": True, "shared": True, "und": False, "gen": True}
    assert not any(head.values())  # no text logits on the generation path
    assert all(p.grad is None for p in model.connector.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())


def test_understanding_loss_reaches_understanding_and_shared_slots_only(model, qa_batch):
    model.understanding_loss(*qa_batch(model.backbone, [("Is <bo> here?", "Yes, <bo> is here.")])).backward()
    embed, head = grads(model)
    assert embed == {"identifier": True, "shared": True, "und": True, "gen": False}
    assert head["identifier"]


def test_optimizer_allow_list_is_the_bank(model):
    allowed = {id(p) for p in model.trainable_parameters()}
    assert allowed == {id(p) for p in model.bank.parameters()}
    hidden = model.backbone.hidden_size
    assert sum(p.numel() for p in model.trainable_parameters()) == 2 * (1 + 2 + 3 + 4) * hidden


def test_concepts_round_trip_through_the_model(model, tiny_dirs, tmp_path):
    path = model.save_concepts(tmp_path / "bo.safetensors")
    cfg = load_config([], ["bank.num_shared=2", "bank.num_und=3", "bank.num_gen=4"])
    other = UnifiedModel.from_config(cfg)
    other.load_concepts(path)
    ids, mask = model.encode_batch(["<bo> on a sofa"])
    assert torch.equal(other.backbone.hidden_states(ids, mask)[0], model.backbone.hidden_states(ids, mask)[0])


def test_connector_aligned_for_another_pair_is_refused(model, tmp_path):
    path = model.connector.save(tmp_path / "conn.safetensors",
                                {"backbone_fingerprint": "0" * 16, "decoder_fingerprint": model.decoder_fingerprint})
    with pytest.raises(ConceptFileError, match="0000000000000000.*" + model.backbone.base_fingerprint):
        model.check_connector(path)
