"""Concept files: reload to identical logits, refuse another base, merged HF export equals the splice."""

import json

import pytest
import torch
from safetensors import safe_open

from unipers.models.export import export_merged
from unipers.concepts.io import ConceptFileError, load_concepts, read_metadata, save_concepts
from unipers.concepts.names import ConceptNameError
from unipers.concepts.prompts import PromptBuilder


def trained(bb, names=("bo", "mam")):
    """Concepts whose rows moved away from their init (so a reload that re-inits would be caught)."""
    for name in names:
        bb.add_concept(name, "dog")
    with torch.no_grad():
        for p in bb.bank.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bb


def logits_for(bb, text):
    return bb.full_logits(torch.tensor([PromptBuilder.for_backbone(bb).encode(text)]))


def save(bb, path, **kw):
    return save_concepts(bb.bank, path, base_fingerprint=bb.base_fingerprint, **kw)


def load(bb, path, **kw):
    return load_concepts(bb.bank, path, base_fingerprint=bb.base_fingerprint, vocabulary=bb.vocabulary, **kw)


def test_save_load_gives_identical_logits(make_backbone, tmp_path):
    a = trained(make_backbone(head_rows="all"))
    path = save(a, tmp_path / "c.safetensors")
    b = make_backbone(head_rows="identifier")  # the file's own head groups win over the new bank's default
    assert load(b, path) == ["bo", "mam"]
    for text in ("Is <bo> with <mam>?", "<mam> sleeping", "plain text"):
        assert torch.equal(logits_for(a, text), logits_for(b, text))


def test_file_holds_only_concept_rows_and_metadata(make_backbone, tmp_path):
    bb = trained(make_backbone(num_shared=2, num_und=3, num_gen=4))
    path = save(bb, tmp_path / "c.safetensors", names=["bo"])
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        numel = sum(f.get_tensor(k).numel() for k in keys)
    assert keys == {"bo/embed/identifier", "bo/embed/shared", "bo/embed/und", "bo/embed/gen", "bo/head/identifier"}
    assert numel == (1 + 2 + 3 + 4 + 1) * bb.hidden_size
    meta = read_metadata(path)
    assert meta["base_fingerprint"] == bb.base_fingerprint
    assert meta["concepts"] == [{"name": "bo", "class_word": "dog", "head_groups": ["identifier"],
                                 "layout": {"num_shared": 2, "num_und": 3, "num_gen": 4}}]
    assert meta["unipers_version"]


def test_a_concept_gives_the_same_logits_alone_or_with_others(make_backbone, tmp_path):
    both = trained(make_backbone())
    path = save(both, tmp_path / "c.safetensors")
    alone = make_backbone()
    load(alone, path, names=["mam"])  # mam now sits at other ids than in `both`
    assert alone.bank.info["mam"].first_id != both.bank.info["mam"].first_id
    v = both.vocab_size
    la, lb = logits_for(alone, "Is <mam> here?"), logits_for(both, "Is <mam> here?")
    assert torch.equal(la[..., :v], lb[..., :v])
    ia, ib = alone.bank.info["mam"], both.bank.info["mam"]
    assert torch.equal(la[..., ia.first_id:ia.end_id], lb[..., ib.first_id:ib.end_id])


def test_loading_into_another_base_is_refused(make_backbone, other_backbone_dir, tmp_path):
    a = trained(make_backbone())
    path = save(a, tmp_path / "c.safetensors")
    other = make_backbone(path=other_backbone_dir)
    assert other.base_fingerprint != a.base_fingerprint
    with pytest.raises(ConceptFileError) as err:
        load(other, path)
    assert a.base_fingerprint in str(err.value) and other.base_fingerprint in str(err.value)
    assert len(other.bank) == 0


def test_name_clash_corrupt_and_foreign_files(make_backbone, tmp_path):
    a = trained(make_backbone())
    path = save(a, tmp_path / "c.safetensors")
    with pytest.raises(ConceptNameError, match="already loaded"):
        load(a, path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ConceptFileError, match="junk.safetensors"):
        load(a, junk)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConceptFileError, match="not a unipers concept file"):
        load(a, tmp_path / "other.safetensors")
    with pytest.raises(ConceptFileError, match="no concept 'zz'"):
        load(make_backbone(), path, names=["zz"])


def test_a_write_killed_midway_leaves_the_old_file(make_backbone, tmp_path, monkeypatch):
    bb = trained(make_backbone())
    path = save(bb, tmp_path / "c.safetensors")
    before = path.read_bytes()

    import safetensors.torch

    def dies(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save(bb, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


@pytest.mark.parametrize("head_rows", ["all", "identifier"])
def test_merged_export_matches_spliced_model(make_backbone, tmp_path, head_rows):
    from transformers import AutoProcessor, ChameleonForConditionalGeneration

    bb = trained(make_backbone(head_rows=head_rows))
    out = export_merged(bb, tmp_path / "merged")
    merged = ChameleonForConditionalGeneration.from_pretrained(out)
    text = "Is <bo> here with <mam>? <bo>"
    ids = torch.tensor([PromptBuilder.for_backbone(bb).encode(text)])
    ours, theirs = logits_for(bb, text), merged(input_ids=ids).logits
    low = torch.finfo(ours.dtype).min
    trained_cols = ours[0, 0] > low  # columns the splice computes (untrained slot heads are suppressed)
    assert torch.allclose(ours[..., trained_cols], theirs[..., trained_cols], atol=1e-5)
    suppressed = set(merged.generation_config.suppress_tokens or [])
    assert suppressed == set((~trained_cols).nonzero().flatten().tolist()) - set(bb.image_token_ids.tolist())
    # The exported tokenizer writes the concept tokens at the spliced ids.
    prompts = json.loads((out / "unipers_prompts.json").read_text())["concepts"]
    tok = AutoProcessor.from_pretrained(out).tokenizer
    und = tok(prompts["bo"]["understanding"], add_special_tokens=False).input_ids
    assert set(bb.bank.info["bo"].token_ids("und")) <= set(und)
