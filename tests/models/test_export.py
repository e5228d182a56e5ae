"""`unipers export`: the base's own dtype by default, no second copy of the model, the backbone unchanged."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from unipers.models.export import base_dtype, export_merged


@pytest.fixture(scope="module")
def bf16_base(backbone_dir, tmp_path_factory):
    """The tiny base saved in bfloat16, as real Anole / Chameleon checkpoints are."""
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    out = tmp_path_factory.mktemp("bf16") / "backbone"
    model = ChameleonForConditionalGeneration.from_pretrained(backbone_dir, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(backbone_dir).save_pretrained(out)
    return out


def merged_tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_base_dtype_reads_the_config_then_the_weights(bf16_base, backbone_dir, tmp_path):
    assert base_dtype(bf16_base) == "bfloat16" and base_dtype(backbone_dir) == "float32"
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((bf16_base / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (bare / "config.json").write_text(json.dumps(config))
    (bare / "model.safetensors").symlink_to(bf16_base / "model.safetensors")
    assert base_dtype(bare) == "bfloat16"  # no dtype in config.json: the weights' own
    config["torch_dtype"] = "float16"  # the transformers 4 spelling
    (bare / "config.json").write_text(json.dumps(config))
    assert base_dtype(bare) == "float16"


def test_export_command_writes_the_bases_dtype_by_default(bf16_base, tiny_dirs, tmp_path):
    from unipers.config import load_config
    from unipers.models.unified import UnifiedModel

    model = UnifiedModel.from_config(load_config([]))
    model.add_concept("bo", "dog")
    concept = model.save_concepts(tmp_path / "bo.safetensors")
    out = subprocess.run([sys.executable, "-m", "unipers.cli", "export", "--backbone", str(bf16_base),
                          "--concept", str(concept), "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(bfloat16)" in out.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = merged_tensors(tmp_path / "m")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    V, rows = model.backbone.vocab_size, model.bank.rows["bo"]
    embed = tensors["model.embed_tokens.weight"]
    assert embed.shape[0] == V + model.bank.num_tokens
    assert torch.equal(embed[V:V + 1], rows.embed["identifier"].to(torch.bfloat16))


def test_export_copies_no_module_and_leaves_the_backbone_as_it_was(make_backbone, tmp_path, monkeypatch):
    bb = make_backbone(head_rows="all")
    bb.add_concept("bo", "dog")
    ids = torch.tensor([[1, 5, 9, bb.bank.info["bo"].first_id, 7]])
    before = bb.full_logits(ids)
    V, config_vocab, suppress = bb.vocab_size, bb.model.config.vocab_size, bb.model.generation_config.suppress_tokens
    real_deepcopy = copy.deepcopy

    def no_module_copies(obj, *args, **kw):
        assert not isinstance(obj, torch.nn.Module), "export copied the model"
        return real_deepcopy(obj, *args, **kw)

    monkeypatch.setattr(copy, "deepcopy", no_module_copies)
    out = export_merged(bb, tmp_path / "merged", max_shard_size="40KB")  # several shards and an index
    monkeypatch.undo()
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert bb.model.get_input_embeddings().weight.shape[0] == V and bb.model.lm_head.weight.shape[0] == V
    assert bb.model.config.vocab_size == config_vocab and bb.model.generation_config.suppress_tokens == suppress
    assert torch.equal(bb.full_logits(ids), before)
    from transformers import ChameleonForConditionalGeneration

    merged = ChameleonForConditionalGeneration.from_pretrained(out)
    assert torch.allclose(merged(input_ids=ids).logits, before, atol=1e-5)


def test_a_failed_save_still_gives_the_backbone_back(make_backbone, tmp_path, monkeypatch):
    bb = make_backbone()
    bb.add_concept("bo", "dog")
    embed, config = bb.model.get_input_embeddings().weight, bb.model.config

    def dies(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(bb.model), "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        export_merged(bb, tmp_path / "merged")
    assert bb.model.get_input_embeddings().weight is embed and bb.model.config is config
    assert not (tmp_path / "merged").exists()
