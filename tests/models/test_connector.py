"""Connector: masks respected, padding-invariant, save/load exact; Conditioning batching helpers."""

import json

import pytest
import torch
from safetensors.torch import save_file

from unipers.models.connector import CONNECTOR_KINDS, Conditioning, Connector, read_connector_metadata

IN_DIM, OUT_DIM, POOLED_DIM = 24, 32, 16


def make(kind: str, pooled_dim: int | None = POOLED_DIM, **kwargs) -> Connector:
    torch.manual_seed(0)
    return Connector(kind, IN_DIM, OUT_DIM, pooled_dim=pooled_dim, num_queries=5, num_heads=4,
                     num_layers=2, **kwargs).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, IN_DIM, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[1, :2] = False  # left padding
    mask[2, 3] = False  # a hole
    return hidden, mask


def test_unknown_kind_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'resampler'.*linear, mlp, queries"):
        Connector("resampler", IN_DIM, OUT_DIM)


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
@pytest.mark.parametrize("pooled_dim", [POOLED_DIM, None])
def test_shapes_and_output_mask(kind, pooled_dim):
    hidden, mask = batch()
    out = make(kind, pooled_dim)(hidden, mask)
    length = 5 if kind == "queries" else 7
    assert out.embeds.shape == (3, length, OUT_DIM)
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, length)
    if kind == "queries":
        assert out.mask.all()
    else:
        assert torch.equal(out.mask, mask)
        assert (out.embeds[~mask] == 0).all()
    assert (out.pooled is None) if pooled_dim is None else (out.pooled.shape == (3, POOLED_DIM))


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_masked_positions_change_nothing(kind):
    connector = make(kind)
    hidden, mask = batch()
    changed = hidden.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), IN_DIM) * 1e4
    changed[0, 6] = float("nan")
    a, b = connector(hidden, mask), connector(changed, mask)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)
    # Non-vacuous: a kept position does change the output (not by a constant: LayerNorm removes that).
    changed[0, 0] += torch.randn(IN_DIM)
    c = connector(changed, mask)
    assert not torch.allclose(a.embeds[0], c.embeds[0]) and not torch.allclose(a.pooled[0], c.pooled[0])


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_padding_with_masked_positions_is_invariant(kind):
    connector = make(kind)
    hidden, mask = batch()
    padded_hidden = torch.cat([hidden, torch.randn(3, 4, IN_DIM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    a, b = connector(hidden, mask), connector(padded_hidden, padded_mask)
    torch.testing.assert_close(b.pooled, a.pooled, atol=1e-6, rtol=0)
    got = b.embeds if kind == "queries" else b.embeds[:, :7]
    torch.testing.assert_close(got, a.embeds, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_save_load_round_trip(tmp_path, kind):
    connector = make(kind, dropout=0.1)
    path = connector.save(tmp_path / "c" / "connector.safetensors",
                          {"backbone_fingerprint": "abc", "decoder_fingerprint": "def"})
    meta = read_connector_metadata(path)
    assert meta["backbone_fingerprint"] == "abc" and meta["decoder_fingerprint"] == "def"
    assert json.loads(meta["unipers.connector"])["kind"] == kind
    loaded = Connector.load(path).eval()
    assert loaded.config == connector.config
    hidden, mask = batch()
    a, b = connector(hidden, mask), loaded(hidden, mask)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)


def test_save_load_keeps_dtype(tmp_path):
    connector = make("mlp").to(torch.bfloat16)
    loaded = Connector.load(connector.save(tmp_path / "c.safetensors"))
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_save_rejects_bad_metadata_and_load_rejects_foreign_files(tmp_path):
    connector = make("linear")
    with pytest.raises(ValueError, match="reserved"):
        connector.save(tmp_path / "a.safetensors", {"unipers.connector": "{}"})
    with pytest.raises(TypeError, match="str"):
        connector.save(tmp_path / "a.safetensors", {"step": 3})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a unipers connector"):
        read_connector_metadata(tmp_path / "other.safetensors")


def test_gradients_reach_connector_and_hidden():
    connector = make("queries").train()
    hidden, mask = batch()
    hidden.requires_grad_(True)
    out = connector(hidden, mask)
    (out.embeds.square().mean() + out.pooled.square().mean()).backward()
    assert all(p.grad is not None for p in connector.parameters())
    assert hidden.grad[mask].abs().sum() > 0 and (hidden.grad[~mask] == 0).all()


def test_conditioning_helpers():
    a = Conditioning(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 5))
    b = Conditioning(torch.randn(1, 5, 4), torch.tensor([[1, 1, 0, 1, 0]]), torch.randn(1, 5))
    assert b.mask.dtype == torch.bool
    both = Conditioning.cat([a, b])
    assert both.embeds.shape == (3, 5, 4) and both.batch_size == len(both) == 3
    assert not both.mask[:2, 3:].any() and (both.embeds[:2, 3:] == 0).all()
    assert torch.equal(both[2].embeds, b.embeds) and torch.equal(both[-1].pooled, b.pooled)
    assert torch.equal(both[0:2].embeds[:, :3], a.embeds)
    assert b.expand(4).embeds.shape == (4, 5, 4)
    half = both.to(dtype=torch.float16)
    assert half.embeds.dtype == half.pooled.dtype == torch.float16 and half.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="pooled"):
        Conditioning.cat([a, Conditioning(b.embeds, b.mask, None)])
    with pytest.raises(ValueError, match="expand"):
        a.expand(4)
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        Conditioning(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
