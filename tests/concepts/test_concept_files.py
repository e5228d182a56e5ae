"""Concept files: reload to identical logits, refuse another base, merged HF export equals the splice."""

import json
import time

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


# ---- files that do not match their own metadata -----------------------------------------------------------
def rewrite(src, dst, tensors=None, metadata=None):
    """A copy of the concept file `src` at `dst`, with `tensors(dict)` / `metadata(dict)` applied to its
    contents (each edits the dict in place)."""
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        contents, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if tensors:
        tensors(contents)
    if metadata:
        metadata(meta)
    save_file(contents, str(dst), metadata=meta)
    return dst


def edit_layout(**changes):
    def edit(meta):
        entries = json.loads(meta["concepts"])
        entries[0]["layout"].update(changes)
        meta["concepts"] = json.dumps(entries)
    return edit


def edit_entry(key, value):
    def edit(meta):
        entries = json.loads(meta["concepts"])
        entries[0][key] = value
        meta["concepts"] = json.dumps(entries)
    return edit


def with_nan(key, value=float("nan")):
    def edit(t):
        t[key] = t[key].clone()
        t[key][1, 3] = value
    return edit


H = 64  # the tiny backbone's hidden size; bo's layout in the good file is (shared 2, und 3, gen 4)
CORRUPT = {  # id -> (tensor edit, metadata edit, what the message must say after the file's path)
    "missing-tensor": (lambda t: t.pop("bo/embed/und"), None, "tensor 'bo/embed/und' is missing"),
    "extra-tensor": (lambda t: t.update({"bo/embed/extra": torch.zeros(2, H)}), None,
                     "unexpected tensor 'bo/embed/extra'"),
    "broadcastable-row": (lambda t: t.update({"bo/embed/und": torch.zeros(1, H)}), None,
                          "tensor 'bo/embed/und' has shape [1, 64], but the metadata implies [3, 64]"),
    "int-dtype": (lambda t: t.update({"bo/embed/gen": torch.ones(4, H, dtype=torch.int64)}), None,
                  "tensor 'bo/embed/gen' has dtype int64, not a floating dtype"),
    "other-float-dtype": (lambda t: t.update({"bo/head/identifier": t["bo/head/identifier"].half()}), None,
                          "tensor 'bo/head/identifier' has dtype float16, but the file was saved as float32"),
    "huge-layout": (None, edit_layout(num_und=10**9), "layout num_und is 1000000000, outside the allowed 0..1024"),
    "float-layout": (None, edit_layout(num_gen=1e9), "layout num_gen must be a whole number, got 1000000000.0"),
    "bool-layout": (None, edit_layout(num_gen=True), "layout num_gen must be a whole number, got True"),
    "layout-beside-the-rows": (None, edit_layout(num_shared=1000),
                               "tensor 'bo/embed/shared' has shape [2, 64], but the metadata implies [1000, 64]"),
    "layout-key-missing": (None, lambda m: m.update(concepts=m["concepts"].replace('"num_und": 3, ', "")),
                           "layout lacks the key 'num_und'"),
    "huge-hidden-size": (None, lambda m: m.update(hidden_size="1000000000"),
                         "metadata 'hidden_size' is 1000000000, outside the allowed 1..65536"),
    "hidden-size-not-a-number": (None, lambda m: m.update(hidden_size="sixty-four"),
                                 "metadata 'hidden_size' must be a whole number, got 'sixty-four'"),
    "no-hidden-size": (None, lambda m: m.pop("hidden_size"), "metadata 'hidden_size' is missing"),
    "no-concepts": (None, lambda m: m.pop("concepts"), "metadata 'concepts' is missing"),
    "no-base-fingerprint": (None, lambda m: m.pop("base_fingerprint"), "metadata 'base_fingerprint' is missing"),
    "concepts-not-json": (None, lambda m: m.update(concepts="[{'name': 'bo'"), "metadata 'concepts' is not valid JSON"),
    "concepts-not-a-list": (None, lambda m: m.update(concepts='{"name": "bo"}'),
                            "metadata 'concepts' must be a JSON list"),
    "entry-lacks-layout": (None, lambda m: m.update(concepts=json.dumps([{"name": "bo", "class_word": "dog",
                                                                          "head_groups": []}])),
                           "metadata 'concepts' entry 0 lacks the key 'layout'"),
    "bad-head-group": (None, edit_entry("head_groups", ["identifier", "tail"]), "head_groups must be a list"),
    "bad-name": (None, edit_entry("name", "../bo"), "metadata 'concepts' entry 0: concept name '../bo'"),
    "bad-dtype-metadata": (None, lambda m: m.update(dtype="int8"), "metadata 'dtype' is 'int8', not one of"),
    "nan-row": (with_nan("bo/embed/shared"), None, "tensor 'bo/embed/shared' holds 1 non-finite value(s)"),
    "inf-row": (with_nan("bo/embed/gen", float("inf")), None, "tensor 'bo/embed/gen' holds 1 non-finite value(s)"),
}


@pytest.fixture
def good_file(make_backbone, tmp_path):
    return save(trained(make_backbone(), names=("bo",)), tmp_path / "good.safetensors")


def corrupt(case, good, folder):
    if case == "truncated":
        bad = folder / "truncated.safetensors"
        bad.write_bytes(good.read_bytes()[:-7])
        return bad, "not a readable safetensors file"
    tensors, metadata, message = CORRUPT[case]
    return rewrite(good, folder / f"{case}.safetensors", tensors, metadata), message


@pytest.mark.parametrize("case", [*CORRUPT, "truncated"])
def test_a_file_that_breaks_its_own_metadata_is_refused_naming_file_key_and_problem(
        case, good_file, make_backbone, tmp_path, tree_digest):
    bad, message = corrupt(case, good_file, tmp_path)
    before = tree_digest(bad)
    bb = make_backbone()
    start = time.perf_counter()
    with pytest.raises(ConceptFileError) as err:
        load(bb, bad)
    took = time.perf_counter() - start
    text = str(err.value)
    assert text.startswith(f"{bad}: ") and message in text and "\n" not in text, text
    assert took < 0.5  # header arithmetic: nothing the size of the claimed layout is ever allocated
    assert len(bb.bank) == 0 and bb.bank.num_tokens == 0
    assert tree_digest(bad) == before
    if "row" not in case and case != "truncated":  # the header alone shows the problem
        with pytest.raises(ConceptFileError):
            read_metadata(bad)


def test_a_huge_layout_fails_before_any_allocation(good_file, make_backbone, tmp_path, monkeypatch):
    bad = rewrite(good_file, tmp_path / "huge.safetensors", metadata=edit_layout(num_shared=10**9, num_und=10**9))
    assert bad.stat().st_size < 20_000
    bb = make_backbone()

    def no_allocation(*args, **kwargs):
        raise AssertionError("rows were allocated for a file that fails its header check")

    monkeypatch.setattr(torch, "zeros", no_allocation)  # ConceptRows would allocate through torch.zeros
    start = time.perf_counter()
    with pytest.raises(ConceptFileError, match="outside the allowed 0..1024"):
        load(bb, bad)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("case", ["missing-tensor", "int-dtype", "huge-layout", "nan-row", "truncated"])
def test_the_cli_refuses_a_bad_concept_file_with_one_line_and_exit_code_2(
        case, concept_files, tmp_path, unipers_cli, one_line_error, tree_digest):
    bad, message = corrupt(case, concept_files["bo"], tmp_path)
    before = tree_digest(bad)
    code, out, err = unipers_cli("ask", "--concept", bad, "What is <bo>?")
    assert code == 2 and out == ""
    one_line_error(err, bad, message)
    assert tree_digest(bad) == before


def test_an_older_file_without_a_dtype_loads_in_any_float_dtype(good_file, make_backbone, tmp_path):
    old = rewrite(good_file, tmp_path / "old.safetensors", lambda t: t.update({k: v.bfloat16() for k, v in t.items()}),
                  lambda m: m.pop("dtype"))
    bb = make_backbone()
    assert load(bb, old) == ["bo"]
    assert all(p.dtype == torch.float32 for p in bb.bank.parameters())  # the bank keeps its own dtype


def test_saving_non_finite_rows_is_refused_naming_the_concept(make_backbone, tmp_path):
    bb = trained(make_backbone())
    with torch.no_grad():
        bb.bank.rows["mam"].embed["und"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not saved: concept 'mam' has 1 non-finite value\(s\).*group 'und'"):
        save(bb, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    save(bb, tmp_path / "c.safetensors", names=["bo"])  # the finite concept alone still saves


def test_the_bank_refuses_rows_that_would_only_broadcast(make_backbone):
    from unipers.concepts.bank import SlotLayout

    bank = make_backbone().bank
    with pytest.raises(ValueError, match=r"concept 'bo': rows for und have shape \[1, 64\], expected \[3, 64\]"):
        bank.add("bo", embed_init={"und": torch.zeros(1, 64)})
    assert len(bank) == 0
    with pytest.raises(ValueError, match="SlotLayout.num_und must be a whole number from 0 to 1024"):
        SlotLayout(num_und=10**9)


def test_huge_but_finite_rows_still_load(good_file, make_backbone, tmp_path):
    """The finite check sums each tensor first; a sum that overflows must not refuse finite rows."""
    big = rewrite(good_file, tmp_path / "big.safetensors", lambda t: t["bo/embed/shared"].fill_(3e38))
    half = rewrite(good_file, tmp_path / "half.safetensors",
                   lambda t: t.update({k: v.half().fill_(6e4) for k, v in t.items()}), lambda m: m.update(dtype="float16"))
    for path in (big, half):
        bb = make_backbone()
        assert load(bb, path) == ["bo"]
