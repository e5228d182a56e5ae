"""Bootstrap intervals and the paired test on synthetic data with known answers; intervals and separation
on hand-made blocks; `unipers eval --compare` on hand-made eval outputs (no model runs here)."""

import json

import numpy as np
import pytest

from unipers.eval import stats
from unipers.eval.compare import pair
from unipers.eval.uncertainty import (DOES_NOT_SEPARATE, SEPARATES, TOO_FEW, add_intervals, add_separation,
                                      bootstrap_settings, read_samples, record, unique_ids, verdict,
                                      write_samples)


def test_the_interval_covers_the_true_mean_at_about_the_nominal_rate():
    data = np.random.default_rng(1234)
    hits = 0
    for rep in range(200):
        x = data.random(80) < 0.3  # Bernoulli(0.3)
        low, high = stats.bootstrap_ci(x, resamples=1000, seed=rep)
        hits += low <= 0.3 <= high
    assert 0.9 <= hits / 200 <= 0.99


def test_the_interval_is_a_function_of_the_values_the_seed_and_the_key():
    x = np.random.default_rng(0).normal(size=30)  # continuous: two seeds' quantiles differ
    assert stats.bootstrap_ci(x, 1000, seed=3) == stats.bootstrap_ci(x, 1000, seed=3)
    assert stats.bootstrap_ci(x, 1000, seed=3) != stats.bootstrap_ci(x, 1000, seed=4)
    assert stats.bootstrap_ci(x, 1000, seed=3, key="a") != stats.bootstrap_ci(x, 1000, seed=3, key="b")
    assert stats.bootstrap_ci(x, 0) is None  # 0 resamples: no interval


def test_constant_samples_give_a_point_and_more_samples_a_narrower_interval():
    low, high = stats.bootstrap_ci([0.25] * 12, 1000, seed=0)
    assert low == high == pytest.approx(0.25)
    data = np.random.default_rng(0)
    widths = []
    for n in (25, 100, 400):
        low, high = stats.bootstrap_ci(data.random(n) < 0.5, 1000, seed=0)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0


def test_the_weighted_recognition_resamples_positives_and_negatives_apart():
    # All positives right, all negatives wrong: every stratified resample is exactly 0.5; resampling the
    # pooled samples would move the weighted accuracy with the share of positives drawn.
    assert stats.stratified_ci([[[1.0] * 3, [0.0] * 9]], 1000, seed=0) == (0.5, 0.5)
    pooled = stats.bootstrap_ci([1.0] * 3 + [0.0] * 9, 1000, seed=0)
    assert pooled[0] < pooled[1]
    assert stats.point([[[1.0, 1.0], [0.0, 1.0]], [[0.0]]]) == pytest.approx(((1 + 0.5) / 2 + 0) / 2)


def test_the_paired_test_finds_a_clear_shift_and_none_between_identical_runs():
    data = np.random.default_rng(7)
    a = data.normal(0.5, 0.2, 60)
    shifted = stats.paired_test(a, a + 0.1 + data.normal(0, 0.05, 60), 1000, seed=0)
    assert shifted["p_value"] < 0.01 and shifted["ci_low"] > 0 and shifted["diff"] == pytest.approx(0.1, abs=0.03)
    same = stats.paired_test(a, a, 1000, seed=0)
    assert same["p_value"] > 0.05 and same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0
    # Under no shift, p < 0.05 about 5% of the time (the test is calibrated, not just quiet).
    rejected = sum(stats.paired_test(a, a + data.normal(0, 0.05, 60), 500, seed=i)["p_value"] < 0.05
                   for i in range(200))
    assert 0.01 <= rejected / 200 <= 0.1
    correct_a, correct_b = data.random(200) < 0.5, data.random(200) < 0.9  # accuracies 0.5 vs 0.9
    assert stats.paired_test(correct_a, correct_b, 1000, seed=0)["p_value"] < 0.01
    assert stats.paired_test(a, a + 0.1, 0)["p_value"] is None


def test_resample_counts_outside_the_range_are_config_errors():
    from unipers.config import ConfigError, load_config

    settings = load_config([]).eval
    assert bootstrap_settings(settings) == (1000, 0)
    assert bootstrap_settings(load_config([], ["eval.seed=5"]).eval, 0) == (0, 5)
    for bad in (-1, 10**7, True):
        with pytest.raises(ConfigError, match="--bootstrap"):
            bootstrap_settings(settings, bad)


def blocks_and_samples():
    """A concept-file block and a baseline block over concepts bo and mam, with their per-sample values."""
    rng = np.random.default_rng(0)
    ours, base = {}, {}
    for concept in ("bo", "mam"):
        ids = [f"{concept}{i}" for i in range(40)]
        record(ours.setdefault(concept, {}), "caption/recall", ids, rng.random(40) < 0.9)
        record(base.setdefault(concept, {}), "caption/recall", ids, rng.random(40) < 0.1)
        record(ours[concept], "clip_i", ids, rng.normal(0.6, 0.05, 40))
        record(base[concept], "clip_i", ids, rng.normal(0.6, 0.05, 40))
        record(ours[concept], "qa/unparsed", ids, rng.random(40) < 0.5)
        record(base[concept], "qa/unparsed", ids, rng.random(40) < 0.5)
    blocks = [{"method": "personal", "checkpoint": "concepts", "concepts": {"bo": {}, "mam": {}}},
              {"method": "none", "checkpoint": "base", "concepts": {"bo": {}, "mam": {}}}]
    return blocks, [ours, base]


def test_intervals_and_separation_of_blocks(tmp_path):
    blocks, samples = blocks_and_samples()
    add_intervals(blocks, samples, 1000, seed=0)
    ci = blocks[0]["ci"]
    bo = ci["concepts"]["bo"]["caption/recall"]
    assert bo["n"] == 40 and bo["ci_low"] <= np.mean(samples[0]["bo"]["caption/recall"]["values"]) <= bo["ci_high"]
    assert ci["mean"]["clip_i"]["n"] == 80
    sep = (add_separation(blocks), blocks[1]["separation"])[1]
    assert sep["against"] == "concepts"
    assert sep["mean"]["caption/recall"] == SEPARATES and sep["mean"]["clip_i"] == DOES_NOT_SEPARATE
    assert "qa/unparsed" not in sep["mean"]  # a diagnostic, not judged
    assert ci["concepts"]["mam"]["clip_i"]["n_min"] == ci["mean"]["clip_i"]["n_min"] == 40
    apart = {"ci_low": 0.8, "ci_high": 0.9, "n_min": 40}
    assert verdict(apart, {"ci_low": 0.1, "ci_high": 0.2, "n_min": 40}) == SEPARATES
    assert verdict(apart, {"ci_low": 0.1, "ci_high": 0.2, "n_min": 4}) == TOO_FEW  # 4 samples judge nothing
    assert verdict(apart, {"ci_low": 0.1, "ci_high": 0.8, "n_min": 40}) == DOES_NOT_SEPARATE  # touching
    again, _ = blocks_and_samples()
    add_intervals(again, samples, 1000, seed=0)
    assert again[0]["ci"] == ci  # deterministic for a seed

    write_samples(tmp_path / "samples.jsonl", blocks, samples)
    back = read_samples(tmp_path / "samples.jsonl")
    assert back[("none", "base")]["mam"]["clip_i"] == samples[1]["mam"]["clip_i"]
    (tmp_path / "bad.jsonl").write_text('{"method": "personal"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_samples(tmp_path / "bad.jsonl")


def test_sample_ids_and_pairs():
    assert unique_ids(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]
    a = {"ids": ["x", "y", "z"], "values": [1, 0, 1], "strata": ["pos", "pos", "neg"]}
    b = {"ids": ["z", "y", "w"], "values": [0, 1, 1], "strata": ["neg", "pos", "neg"]}
    assert pair(a, b) == [([0], [1]), ([1], [0])]  # y (pos), z (neg); x and w have no partner
    assert pair(a, {**b, "strata": ["neg", "neg", "neg"]}) is None  # no positive in both: no weighted pair
    assert pair(a, None) is None


def fake_eval_output(folder, shift, ids=range(50), seed=0):
    """An eval output folder as `unipers eval` writes it (marker, metrics.json, samples.jsonl), one concept."""
    from unipers.io import mark_output

    rng = np.random.default_rng(seed)
    folder.mkdir()
    mark_output(folder, "eval")
    values = np.clip(rng.normal(0.5, 0.1, 100)[: len(ids)] + shift, 0, 1).tolist()
    samples = {"bo": {}}
    record(samples["bo"], "clip_i", [f"p/{i}" for i in ids], values)
    block = {"method": "personal", "checkpoint": "concepts", "concepts": {"bo": {"clip_i": float(np.mean(values))}},
             "mean": {"clip_i": float(np.mean(values))}}
    (folder / "metrics.json").write_text(json.dumps({"results": [block]}))
    write_samples(folder / "samples.jsonl", [block], [samples])
    return folder


def test_compare_pairs_two_outputs_and_writes_its_report(tmp_path, unipers_cli):
    a = fake_eval_output(tmp_path / "a", 0.0)
    b = fake_eval_output(tmp_path / "b", 0.2)
    code, out, err = unipers_cli("eval", "--compare", a, b, "--out", tmp_path / "ab")
    assert code == 0, err
    result = json.loads((tmp_path / "ab" / "compare.json").read_text())
    rows = {(r["concept"], r["metric"]): r for r in result["rows"]}
    for key in (("bo", "clip_i"), ("mean", "clip_i")):
        assert rows[key]["pairs"] == 50 and rows[key]["p_value"] < 0.01 and rows[key]["ci_low"] > 0, key
    assert result["settings"]["resamples"] == 1000 and result["settings"]["seed"] == 0
    assert "## concept file" in (tmp_path / "ab" / "compare.md").read_text() and "paired B - A" in out
    code, _, err = unipers_cli("eval", "--compare", a, a, "--bootstrap", "200", "--set", "eval.seed=3")
    assert code == 0, err  # no --out: printed only
    code, _, err = unipers_cli("eval", "--compare", a, b, "--out", tmp_path / "ab")
    assert code == 2 and "--overwrite" in err
    assert unipers_cli("eval", "--compare", a, b, "--out", tmp_path / "ab", "--overwrite")[0] == 0


def test_compare_refuses_what_is_not_an_eval_output(tmp_path, unipers_cli, tree_digest, one_line_error):
    a = fake_eval_output(tmp_path / "a", 0.0)
    apart = fake_eval_output(tmp_path / "apart", 0.0, ids=range(50, 90))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "metrics.json").write_text('{"results": []}')  # looks like one, but unipers did not write it
    compared = fake_eval_output(tmp_path / "ab", 0.0)
    compared.joinpath(".unipers-output").write_text('{"kind": "eval-compare"}')
    before = tree_digest(tmp_path)
    for args, named in (((a, photos), photos), ((photos, a), photos), ((a, compared), compared),
                        ((a, tmp_path / "missing"), tmp_path / "missing"), ((a, apart), apart)):
        code, _, err = unipers_cli("eval", "--compare", *args, "--out", tmp_path / "new")
        assert code == 2, (args, err)
        one_line_error(err, str(named))
    code, _, err = unipers_cli("eval", "--compare", a, a, "--bootstrap", "-1")
    assert code == 2 and "--bootstrap" in err
    assert tree_digest(tmp_path) == before
