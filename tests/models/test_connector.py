"""Connector: masks respected, padding-invariant, save/load exact; Conditioning batching helpers."""

import json
import time

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


# ---- connector and decoder-delta files that do not match their own metadata --------------------------------
def rewrite(src, dst, tensors=None, metadata=None):
    """A copy of the safetensors file `src` at `dst`, with `tensors(dict)` / `metadata(dict)` applied."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        contents, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if tensors:
        tensors(contents)
    if metadata:
        metadata(meta)
    save_file(contents, str(dst), metadata=meta)
    return dst


def edit_config(**changes):
    def edit(meta):
        config = json.loads(meta["unipers.connector"])
        config.update(changes)
        meta["unipers.connector"] = json.dumps({k: v for k, v in config.items() if v is not ...})
    return edit


def poke(key, value=float("nan")):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value
    return edit


BAD_CONNECTORS = {  # id -> (tensor edit, metadata edit, what the message must say after the file's path)
    "missing-tensor": (lambda t: t.pop("queries"), None, "tensor 'queries' is missing"),
    "extra-tensor": (lambda t: t.update(bogus=torch.zeros(3)), None, "unexpected tensor 'bogus'"),
    "broadcastable-row": (lambda t: t.update(queries=torch.zeros(1, OUT_DIM)), None,
                          "tensor 'queries' has shape [1, 32], but the metadata implies [5, 32]"),
    "int-dtype": (lambda t: t.update({"proj.1.bias": torch.ones(OUT_DIM, dtype=torch.int32)}), None,
                  "tensor 'proj.1.bias' has dtype int32, not a floating dtype"),
    "huge-width": (None, edit_config(in_dim=10**9), "'unipers.connector' in_dim is 1000000000, outside the allowed"),
    "huge-depth": (None, edit_config(num_layers=10**6), "'unipers.connector' num_layers is 1000000, outside"),
    "config-beside-the-weights": (None, edit_config(num_queries=4000),
                                  "tensor 'queries' has shape [5, 32], but the metadata implies [4000, 32]"),
    "float-width": (None, edit_config(out_dim=32.0), "'unipers.connector' out_dim must be a whole number, got 32.0"),
    "heads-do-not-divide": (None, edit_config(num_heads=5), "out_dim 32 is not divisible by num_heads 5"),
    "unknown-kind": (None, edit_config(kind="resampler"), "kind is 'resampler', not one of linear, mlp, queries"),
    "config-key-missing": (None, edit_config(num_heads=...), "'unipers.connector' lacks the key 'num_heads'"),
    "config-key-unknown": (None, edit_config(depth=3), "'unipers.connector' has the unexpected key 'depth'"),
    "config-not-json": (None, lambda m: m.update({"unipers.connector": "{kind: linear"}),
                        "metadata 'unipers.connector' is not valid JSON"),
    "no-format": (None, lambda m: m.pop("unipers.format"), "not a unipers connector file"),
    "nan-weight": (poke("proj.1.weight"), None, "tensor 'proj.1.weight' holds 1 non-finite value(s)"),
}


@pytest.fixture
def connector_file(tmp_path):
    return make("queries").save(tmp_path / "connector.safetensors", {"backbone_fingerprint": "abc"})


def bad_file(table, case, good, folder):
    if case == "truncated":
        bad = folder / "truncated.safetensors"
        bad.write_bytes(good.read_bytes()[:-5])
        return bad, "not a readable safetensors file"
    tensors, metadata, message = table[case]
    return rewrite(good, folder / f"{case}.safetensors", tensors, metadata), message


@pytest.mark.parametrize("case", [*BAD_CONNECTORS, "truncated"])
def test_a_connector_file_that_breaks_its_own_metadata_is_refused(case, connector_file, tmp_path, tree_digest):
    from unipers.concepts.io import ConceptFileError
    from unipers.models.connector import ConnectorFileError

    bad, message = bad_file(BAD_CONNECTORS, case, connector_file, tmp_path)
    before = tree_digest(bad)
    start = time.perf_counter()
    with pytest.raises(ConnectorFileError) as err:
        Connector.load(bad)
    assert time.perf_counter() - start < 0.5  # nothing of the claimed size is built
    text = str(err.value)
    assert text.startswith(f"{bad}: ") and message in text and "\n" not in text, text
    assert isinstance(err.value, ConceptFileError)  # the commands report it as they report a concept file
    if case != "nan-weight":  # the header alone shows the problem
        with pytest.raises(ConnectorFileError, match=message.replace("[", r"\[").replace("(", r"\(")):
            read_connector_metadata(bad)
    assert tree_digest(bad) == before


@pytest.mark.parametrize("case", ["missing-tensor", "huge-width", "truncated"])
def test_the_cli_refuses_a_bad_connector_with_one_line_and_exit_code_2(
        case, connector_file, tmp_path, tiny_dirs, unipers_cli, one_line_error, tree_digest):
    bad, message = bad_file(BAD_CONNECTORS, case, connector_file, tmp_path)
    before = tree_digest(bad)
    code, out, err = unipers_cli("ask", "--set", f"connector.path={bad}", "What is a dog?")
    assert code == 2 and out == ""
    one_line_error(err, bad, message)
    assert tree_digest(bad) == before


@pytest.fixture(scope="module")
def decoder_deltas(tiny_dirs, tmp_path_factory):
    """{"lora": path, "blocks": path}: decoder deltas as the align stage writes them, for the stock tiny
    decoder, with factors that change it (B starts at zero)."""
    from unipers.config import load_config
    from unipers.models.decoder_delta import decoder_delta_path
    from unipers.models.unified import UnifiedModel
    from unipers.training.align import AlignModule

    out = {}
    for mode in ("lora", "blocks"):
        model = UnifiedModel.from_config(load_config([]))
        module = AlignModule(model, lr=1e-3, weight_decay=0.0, warmup_steps=1, max_steps=2, seed=0,
                             train_decoder=mode, lora_rank=4)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.requires_grad and name.startswith("model.decoder."):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
        folder = tmp_path_factory.mktemp(mode)
        out[mode] = decoder_delta_path(module.save_connector(folder / "connector.safetensors"))
    return out


@pytest.fixture
def stock_decoder(decoder_dir):
    from unipers.models.decoder import DiffusionDecoder

    return DiffusionDecoder.from_pretrained(decoder_dir)


LORA = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
BLOCK = "unet.mid_block.attentions.0.proj_in.weight"
BAD_DELTAS = {  # id -> (kind, tensor edit, metadata edit, message)
    "lora-missing-factor": ("lora", lambda t: t.pop(f"{LORA}.lora_B"), None, f"tensor '{LORA}.lora_B' is missing"),
    "lora-extra-tensor": ("lora", lambda t: t.update({"unet.extra.lora_A": torch.zeros(4, 8)}), None,
                          "unexpected tensor 'unet.extra.lora_A'"),
    "lora-broadcastable-factor": ("lora", lambda t: t.update({f"{LORA}.lora_A": t[f"{LORA}.lora_A"][:1]}), None,
                                  f"tensor '{LORA}.lora_A' has shape [1, "),
    "lora-rank-beside-the-factors": ("lora", None, lambda m: m.update(lora_rank="8"),
                                     "but the metadata implies [8, "),
    "lora-huge-rank": ("lora", None, lambda m: m.update(lora_rank="1000000000"),
                       "metadata 'lora_rank' is 1000000000, outside the allowed 1..4096"),
    "lora-int-dtype": ("lora", lambda t: t.update({f"{LORA}.lora_A": t[f"{LORA}.lora_A"].long()}), None,
                       f"tensor '{LORA}.lora_A' has dtype int64, not a floating dtype"),
    "lora-scale-missing": ("lora", None, lambda m: m.pop(f"scale.{LORA}"), f"metadata 'scale.{LORA}' is missing"),
    "lora-scale-nan": ("lora", None, lambda m: m.update({f"scale.{LORA}": "nan"}),
                       f"metadata 'scale.{LORA}' must be a finite number"),
    "lora-nan-factor": ("lora", poke(f"{LORA}.lora_B"), None, f"tensor '{LORA}.lora_B' holds 1 non-finite value(s)"),
    "no-kind": ("lora", None, lambda m: m.pop("kind"), "metadata 'kind' is missing"),
    "unknown-kind": ("lora", None, lambda m: m.update(kind="full"),
                     "metadata 'kind' is 'full', not one of lora, blocks"),
    "no-format": ("lora", None, lambda m: m.pop("unipers.format"), "not a unipers decoder delta"),
    "blocks-unknown-parameter": ("blocks", lambda t: t.update({"unet.bogus.weight": torch.zeros(2)}), None,
                                 "unexpected tensor 'unet.bogus.weight': no parameter of the blocks mid_block"),
    "blocks-another-block": ("blocks", lambda t: t.update({"unet.conv_out.bias": torch.zeros(4)}), None,
                             "unexpected tensor 'unet.conv_out.bias': no parameter of the blocks mid_block"),
    "blocks-missing-parameter": ("blocks", lambda t: t.pop(BLOCK), None, f"tensor '{BLOCK}' is missing"),
    "blocks-no-list-unknown-parameter": ("blocks", lambda t: t.update({"unet.bogus.weight": torch.zeros(2)}),
                                         lambda m: m.pop("blocks"),
                                         "unexpected tensor 'unet.bogus.weight': the decoder has no such parameter"),
    "blocks-unknown-block": ("blocks", None, lambda m: m.update(blocks='["mid_block", "up_blocks.9"]'),
                             "metadata 'blocks' names 'up_blocks.9': the decoder's UNet has no such block"),
    "blocks-wrong-shape": ("blocks", lambda t: t.update({BLOCK: t[BLOCK][:1]}), None,
                           f"tensor '{BLOCK}' has shape [1, "),
    "blocks-int-dtype": ("blocks", lambda t: t.update({BLOCK: t[BLOCK].int()}), None,
                         f"tensor '{BLOCK}' has dtype int32, not a floating dtype"),
    "blocks-nan": ("blocks", poke(BLOCK, float("-inf")), None, f"tensor '{BLOCK}' holds 1 non-finite value(s)"),
}


@pytest.mark.parametrize("case", [*BAD_DELTAS, "truncated"])
def test_a_decoder_delta_that_breaks_its_metadata_is_refused_before_any_weight_changes(
        case, decoder_deltas, stock_decoder, tmp_path, tree_digest):
    from unipers.models.decoder_delta import DecoderDeltaError, apply_decoder_delta

    kind = BAD_DELTAS[case][0] if case in BAD_DELTAS else "lora"
    table = {k: v[1:] for k, v in BAD_DELTAS.items()}
    bad, message = bad_file(table, case, decoder_deltas[kind], tmp_path)
    before, weights = tree_digest(bad), {k: v.clone() for k, v in stock_decoder.state_dict().items()}
    start = time.perf_counter()
    with pytest.raises(DecoderDeltaError) as err:
        apply_decoder_delta(stock_decoder, bad)
    assert time.perf_counter() - start < 1.0  # the decoder's fingerprint is most of it
    text = str(err.value)
    assert text.startswith(f"{bad}: ") and message in text and "\n" not in text, text
    assert all(torch.equal(v, weights[k]) for k, v in stock_decoder.state_dict().items())
    assert tree_digest(bad) == before


@pytest.mark.parametrize("kind", ["lora", "blocks", "blocks-unlisted"])
def test_a_good_decoder_delta_still_applies(kind, decoder_deltas, stock_decoder, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unipers.models.decoder_delta import apply_decoder_delta

    path = decoder_deltas[kind.split("-")[0]]
    if kind == "blocks-unlisted":  # as written before deltas recorded their blocks: still applies
        with safe_open(str(path), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        meta.pop("blocks")
        path = tmp_path / "old.decoder.safetensors"
        save_file(tensors, str(path), metadata=meta)
    before = {k: v.clone() for k, v in stock_decoder.state_dict().items()}
    apply_decoder_delta(stock_decoder, path)
    changed = {k for k, v in stock_decoder.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("unet.") for k in changed)
