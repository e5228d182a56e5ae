"""The concept library on files (`unipers concepts`): merge, remove and rename copy rows bit for bit, keep
each concept's provenance, refuse what they must without touching a file, and removal leaves no trace of the
removed concept in the new file."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from unipers.concepts.bank import HEAD_GROUPS, ConceptBank, SlotLayout
from unipers.concepts.io import ConceptFileError, load_concepts, read_metadata, save_concepts
from unipers.concepts.library import describe, list_folder, merge, remove, rename, slot_norms

BASE, DECODER, HIDDEN = "0123456789abcdef", "fedcba9876543210", 16


def concept_file(path, concepts, *, hidden=HIDDEN, base=BASE, dtype=torch.float32, seed=0, **extra):
    """A concept file of `concepts` ({name: (class word, SlotLayout, head_rows)}) with random rows; file-level
    metadata as a trained model writes it, plus `extra`. Returns (path, bank)."""
    bank = ConceptBank(100, hidden)
    g = torch.Generator().manual_seed(seed)
    for name, (word, layout, head) in concepts.items():
        bank.add(name, class_word=word, layout=layout, head_groups=HEAD_GROUPS[head])
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    bank.to(dtype)
    meta = {"decoder_fingerprint": DECODER, "connector_fingerprint": "c0ffee0000000000", "describe_first": "", **extra}
    meta = {k: str(v) for k, v in meta.items() if v is not None}  # None: the key is absent
    return save_concepts(bank, path, base_fingerprint=base, extra=meta), bank


BO = {"bo": ("dog", SlotLayout(2, 1, 1), "identifier")}
MAM = {"mam": ("cat", SlotLayout(3, 0, 2), "all")}


def rows_of(bank, name):
    rows = bank.rows[name]
    return {f"{kind}/{g}": p.detach() for kind, table in (("embed", rows.embed), ("head", rows.head))
            for g, p in table.items()}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_keeps_rows_bit_for_bit_and_records_each_source(tmp_path):
    a, bank_a = concept_file(tmp_path / "a.safetensors", BO, step=40, config="seed: 1\nrun_dir: runs/bo\n")
    b, bank_b = concept_file(tmp_path / "b.safetensors", MAM, seed=1, step=60, metric="val/recognition",
                             value=repr(0.875))
    out = merge([a, b], tmp_path / "ab.safetensors")
    fresh = ConceptBank(100, HIDDEN)
    assert load_concepts(fresh, out, base_fingerprint=BASE) == ["bo", "mam"]
    for name, bank in (("bo", bank_a), ("mam", bank_b)):
        assert rows_of(fresh, name).keys() == rows_of(bank, name).keys()
        for key, value in rows_of(bank, name).items():
            assert torch.equal(rows_of(fresh, name)[key], value), (name, key)
        mine, theirs = fresh.info[name], bank.info[name]
        assert (mine.class_word, mine.layout, mine.head_groups) == (theirs.class_word, theirs.layout,
                                                                    theirs.head_groups)
    meta = read_metadata(out)
    assert meta["decoder_fingerprint"] == DECODER and meta["hidden_size"] == str(HIDDEN)
    assert "step" not in meta and "config" not in meta  # they belong to one source each: in its records
    bo, mam = meta["provenance"]["bo"], meta["provenance"]["mam"]
    assert bo["source"] == "a.safetensors" and bo["sha256"] == sha(a) and bo["step"] == 40
    assert bo["config"] == "seed: 1\nrun_dir: runs/bo\n" and bo["date"].endswith("Z")
    assert mam["source"] == "b.safetensors" and mam["sha256"] == sha(b)
    assert (mam["step"], mam["metric"], mam["value"]) == (60, "val/recognition", 0.875)
    # Merged again, a concept keeps the record of the file it was trained in, not of the merged file.
    c, _ = concept_file(tmp_path / "c.safetensors", {"tom": ("cat", SlotLayout(1, 1, 1), "none")}, seed=2)
    again = read_metadata(merge([out, c], tmp_path / "abc.safetensors"))["provenance"]
    assert again["bo"] == bo and again["mam"] == mam and again["tom"]["source"] == "c.safetensors"


def test_merge_copies_16_bit_rows_without_a_cast(tmp_path):
    a, _ = concept_file(tmp_path / "a.safetensors", BO, dtype=torch.bfloat16)
    b, _ = concept_file(tmp_path / "b.safetensors", MAM, dtype=torch.bfloat16, seed=1)
    merged = load_file(merge([a, b], tmp_path / "ab.safetensors"))
    for source in (a, b):
        for key, t in load_file(source).items():
            assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], t)
    assert read_metadata(tmp_path / "ab.safetensors")["dtype"] == "bfloat16"


def test_a_fingerprint_recorded_by_one_input_only_is_kept(tmp_path):
    a, _ = concept_file(tmp_path / "a.safetensors", BO)
    b, _ = concept_file(tmp_path / "b.safetensors", MAM, decoder_fingerprint=None)  # saved from a bare bank
    assert "decoder_fingerprint" not in read_metadata(b)
    assert read_metadata(merge([b, a], tmp_path / "ab.safetensors"))["decoder_fingerprint"] == DECODER


@pytest.mark.parametrize("case", ["base", "hidden", "decoder", "clash", "out_is_input", "foreign_out", "exists"])
def test_merge_refusals_name_the_problem_and_change_no_file(case, tmp_path, unipers_cli, tree_digest,
                                                             one_line_error):
    a, _ = concept_file(tmp_path / "a.safetensors", BO)
    other = {"base": {"base": "1111111111111111"}, "hidden": {"hidden": 12},
             "decoder": {"decoder_fingerprint": "2222222222222222"}}.get(case, {})
    b, _ = concept_file(tmp_path / "b.safetensors", BO if case == "clash" else MAM, seed=1, **other)
    out = tmp_path / "ab.safetensors"
    if case == "out_is_input":
        out = b
    elif case == "foreign_out":
        out = tmp_path / "notes.safetensors"
        out.write_text("my notes, not a concept file\n")
    elif case == "exists":
        merge([a, b], out)
    before = tree_digest(tmp_path)
    flags = ["--overwrite"] if case == "foreign_out" else []
    code, _, err = unipers_cli("concepts", "merge", a, b, "--out", out, *flags)
    assert code == 2
    expect = {"base": [a, b, "base_fingerprint"], "hidden": [a, b, "hidden_size"],
              "decoder": [a, b, "decoder_fingerprint"], "clash": [a, b, "'bo'", "unipers concepts rename"],
              "out_is_input": [b, "is one of the inputs"], "foreign_out": [out, "not a unipers concept file"],
              "exists": [out, "already exists"]}[case]
    one_line_error(err, *map(str, expect))
    assert tree_digest(tmp_path) == before


def test_overwrite_replaces_a_concept_file_unipers_wrote(tmp_path, unipers_cli):
    a, _ = concept_file(tmp_path / "a.safetensors", BO)
    b, _ = concept_file(tmp_path / "b.safetensors", MAM, seed=1)
    out = remove(merge([a, b], tmp_path / "ab.safetensors"), ["mam"], tmp_path / "x.safetensors")
    code, _, err = unipers_cli("concepts", "merge", a, b, "--out", out, "--overwrite")
    assert code == 0, err
    assert [c["name"] for c in read_metadata(out)["concepts"]] == ["bo", "mam"]


def test_remove_leaves_no_byte_of_the_removed_concept(tmp_path, unipers_cli):
    both = {"biscuit": ("dog", SlotLayout(2, 1, 1), "all"), **MAM}
    # A training run's file: its config names the removed concept's data folder, its file name the concept.
    src, bank = concept_file(tmp_path / "biscuit_and_mam.safetensors", both, step=80,
                             config="data:\n  concepts: [data/Biscuits, data/mam]\nseed: 3\n")
    before = src.read_bytes()
    out = tmp_path / "mam_only.safetensors"
    code, stdout, err = unipers_cli("concepts", "remove", src, "--concept", "biscuit", "--out", out)
    assert code == 0, err
    assert "still holds" in stdout
    data = out.read_bytes()
    assert b"biscuit" not in data.lower()
    for key, t in rows_of(bank, "biscuit").items():
        for row in t:
            assert row.numpy().tobytes() not in data, key
    stored = load_file(out)
    assert set(stored) == {f"mam/{k}" for k in rows_of(bank, "mam")}
    for key, value in rows_of(bank, "mam").items():
        assert torch.equal(stored[f"mam/{key}"], value)
    record = read_metadata(out)["provenance"]["mam"]
    assert record["withheld"] == ["config", "source"] and record["step"] == 80 and record["sha256"] == sha(src)
    assert src.read_bytes() == before  # removal writes a new file; the input still holds the concept


def test_remove_refuses_an_unknown_concept_and_removing_them_all(tmp_path, unipers_cli, tree_digest, one_line_error):
    src, _ = concept_file(tmp_path / "bo.safetensors", BO)
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli("concepts", "remove", src, "--concept", "zz", "--out", tmp_path / "o.safetensors")
    assert code == 2
    one_line_error(err, str(src), "'zz'")
    code, _, err = unipers_cli("concepts", "remove", src, "--concept", "bo", "--out", tmp_path / "o.safetensors")
    assert code == 2
    one_line_error(err, str(src), "no concept")
    assert tree_digest(tmp_path) == before


def test_rename_keeps_rows_and_records_the_history(tmp_path, unipers_cli, tree_digest, one_line_error):
    src, bank = concept_file(tmp_path / "pets.safetensors", {**BO, **MAM}, step=7)
    code, _, err = unipers_cli("concepts", "rename", src, "--concept", "bo", "--to", "rex",
                               "--out", tmp_path / "rex.safetensors")
    assert code == 0, err
    out = rename(tmp_path / "rex.safetensors", "rex", "rox", tmp_path / "rox.safetensors")
    meta = read_metadata(out)
    assert [c["name"] for c in meta["concepts"]] == ["rox", "mam"]
    assert meta["provenance"]["rox"]["renamed"] == [{"from": "bo", "to": "rex"}, {"from": "rex", "to": "rox"}]
    assert meta["provenance"]["rox"]["source"] == "pets.safetensors" and "renamed" not in meta["provenance"]["mam"]
    stored = load_file(out)
    for key, value in rows_of(bank, "bo").items():
        assert torch.equal(stored[f"rox/{key}"], value)
    for key, value in rows_of(bank, "mam").items():
        assert torch.equal(stored[f"mam/{key}"], value)
    before = tree_digest(tmp_path)
    for new, named in (("mam", "'mam'"), ("bad name", "'bad name'"), ("image", "reserved")):
        code, _, err = unipers_cli("concepts", "rename", src, "--concept", "bo", "--to", new,
                                   "--out", tmp_path / "x.safetensors")
        assert code == 2
        one_line_error(err, named)
    assert tree_digest(tmp_path) == before


def test_list_shows_concept_files_skips_others_and_reports_broken_ones(tmp_path, unipers_cli, one_line_error):
    a, _ = concept_file(tmp_path / "a.safetensors", BO, step=12)
    b, _ = concept_file(tmp_path / "b.safetensors", MAM, seed=1)
    merge([a, b], tmp_path / "sub" / "ab.safetensors")
    b.unlink()
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "weights.safetensors"), metadata={"format": "pt"})
    broken, _ = concept_file(tmp_path / "broken.safetensors", MAM, seed=2)
    broken.write_bytes(broken.read_bytes()[:-10])  # cut short: the header still says it is a concept file
    rows = list_folder(tmp_path)
    assert [r["path"] for r in rows] == [str(tmp_path / n) for n in ("a.safetensors", "broken.safetensors",
                                                                      "sub/ab.safetensors")]
    assert "error" in rows[1] and "error" not in rows[0] and "error" not in rows[2]
    assert [c["name"] for c in rows[2]["concepts"]] == ["bo", "mam"]
    code, out, err = unipers_cli("concepts", "list", tmp_path)
    assert code == 2
    one_line_error(err, "broken.safetensors")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["path", "name", "class", "word"]
    assert lines[1].split()[:6] == ["a.safetensors", "bo", "dog", "1+2/1/1", BASE[:8], DECODER[:8]]
    assert lines[1].split()[6] == "12"
    assert lines[2].startswith("broken.safetensors") and "error:" in lines[2]
    assert [line.split()[1] for line in lines[3:]] == ["bo", "mam"] and lines[4].split()[3] == "1+3/0/2"
    assert "weights" not in out
    code, out, _ = unipers_cli("concepts", "list", tmp_path, "--json")
    assert code == 2 and len(json.loads(out)) == 3
    broken.unlink()
    code, out, err = unipers_cli("concepts", "list", tmp_path)
    assert code == 0, err


def test_inspect_shows_norms_provenance_and_config(tmp_path, unipers_cli):
    config = "seed: 5\npersonalize:\n  lr_schedule: cosine\n"
    src, bank = concept_file(tmp_path / "bo.safetensors", BO, step=3, config=config)
    norms = slot_norms(src)["bo"]
    assert list(norms) == ["embed/identifier", "embed/shared", "embed/und", "embed/gen", "head/identifier"]
    row = bank.rows["bo"].embed["shared"][1].detach()
    assert norms["embed/shared"][1] == pytest.approx(float(torch.linalg.vector_norm(row)), rel=1e-6)
    code, out, err = unipers_cli("concepts", "inspect", src, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["config"] == config and info["step"] == 3 and info["base_fingerprint"] == BASE
    assert info["concepts"][0]["norms"] == norms and info["concepts"][0]["provenance"]["sha256"] == sha(src)
    code, out, err = unipers_cli("concepts", "inspect", src)
    assert code == 0, err
    assert "  lr_schedule: cosine" in out and "1+2/1/1" in out and DECODER in out
    assert f"{norms['embed/shared'][1]:.4g}" in out
    assert describe(src)["concepts"][0]["date"] == info["date"]  # no record: the file's time


def test_a_malformed_provenance_is_refused_naming_the_key(tmp_path):
    bad = {"list": json.dumps(["bo"]), "stranger": json.dumps({"zz": {}}), "scalar": json.dumps({"bo": 3})}
    for label, value in bad.items():
        path, _ = concept_file(tmp_path / f"{label}.safetensors", BO, provenance=value)
        with pytest.raises(ConceptFileError, match=f"{label}.safetensors: metadata 'provenance'"):
            read_metadata(path)
    path, _ = concept_file(tmp_path / "ok.safetensors", {**BO, **MAM}, provenance=json.dumps({"bo": {"step": 1}}))
    assert read_metadata(path)["provenance"] == {"bo": {"step": 1}}
