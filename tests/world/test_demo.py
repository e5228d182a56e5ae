"""`unipers demo` end to end on the tiny world: the claims that hold on every measured base draw.

A world base trained from scratch comes out differently on every CPU (float rounding differs between
instruction sets), so the base this test builds is one draw among many. It asserts floors set below the
lowest value measured over the demo's spread (world seeds x demo seeds x kernel sets, benchmarks/README.md,
``python benchmarks/bench_demo_spread.py``), and prints this run's exact numbers and CPU, which it does not
assert. Builds the world base in its cache ($UNIPERS_HOME/world) on first use (about 25 minutes on 2 cores;
cached after), then runs the demo once for every test here.
"""

import json

import pytest

pytestmark = pytest.mark.slow

# Each floor sits below the lowest value of the 20 runs measured (in brackets: 5 world seeds x 2 demo seeds
# x this CPU's kernels and AVX2-only kernels), so that a base drawn on another CPU passes too.
RECOGNITION_BEFORE_AT_MOST = 0.75  # the untrained concept does not already recognize <bo> [max 0.69]
RECOGNITION_RISE = 0.15  # held-out weighted recognition, after minus before [min 0.23]
RECOGNITION_AFTER = 0.75  # [min 0.81]
NEAR_MISSES_REJECTED = 0.35  # near-misses share two of <bo>'s three attributes [min 0.43]
FACTS_RIGHT_BEFORE_AT_MOST = 1  # a lucky word ("Purple.") counts as right [max 1]
ATTRIBUTE_GAIN = 0.15  # <bo>'s images: the larger rise of colour or pattern match, after minus before [min 0.21]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from unipers.world.demo import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out, settings=DemoSettings(quiet=True))


def _numbers(report) -> str:
    from unipers.world.demo import N_GEN

    before, after, word = (report["results"][k] for k in ("before", "after", "class_word"))
    lines = [
        f"[demo] {report['world_version']} world seed {report['world_seed']} on {report['cpu']['model']} "
        f"(torch kernels {report['cpu']['torch_capability']}, {report['cpu']['threads']} thread(s))",
        f"[demo] held-out weighted recognition: {before['eval']['recognition/weighted']:.3f} -> "
        f"{after['eval']['recognition/weighted']:.3f} (after: pos {after['recognition']['pos']:.2f}, "
        f"neg {after['recognition']['neg']:.2f}, near-miss neg {after['recognition']['near_miss_neg']:.2f})",
        f"[demo] attribute match over {N_GEN} images: <bo> {after['generation']['mean']:.3f} (untrained "
        f"{before['generation']['mean']:.3f}) vs class word {word['mean']:.3f}; shape {after['generation']['shape']:.2f}",
    ]
    lines += [f"[demo] {method} {metric}: {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}] {v['verdict'] or ''}"
              for method, row in report["results"]["baselines"].items() for metric, v in row.items()]
    lines += [f"[demo] {fb['question']!r}: {fb['answer']!r} -> {fa['answer']!r}"
              for fb, fa in zip(before["facts"], after["facts"])]
    return "\n".join(lines + [f"[demo] seconds: {report['seconds']}"])


def test_demo_writes_the_whole_loop(demo, capsys):
    out, report = demo
    with capsys.disabled():
        print("\n" + _numbers(report))
    for name in ("bo.safetensors", "bo_before.safetensors", "answers.json", "report.md", "report.json",
                 "config.yaml", "images/grid_after.png", "images/grid_before.png", "images/grid_class_word.png",
                 "images/after_00.png", "eval/after/metrics.json", "eval/before/metrics.json",
                 "data/bo/manifest.jsonl", "run/concepts/last.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"]["after"]["generation"]["n_images"] >= 48
    assert saved["cpu"]["threads"] == 1 and saved["world_seed"] == 0
    # the report quotes `unipers eval`'s own metrics file, and answers.json has a P(yes) per held-out photo
    for tag in ("before", "after"):
        metrics = json.loads((out / "eval" / tag / "metrics.json").read_text())
        assert saved["results"][tag]["eval"]["recognition/weighted"] == metrics["mean"]["recognition/weighted"]
    probs = json.loads((out / "answers.json").read_text())["after"]["recognition_probs"]
    assert len(probs) == saved["photos"]["test"] + saved["photos"]["test_negatives"]
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert "held-out recognition" in (out / "report.md").read_text()
    # the trained concept file differs from its untrained start, and both load on the world's base
    assert (out / "bo.safetensors").read_bytes() != (out / "bo_before.safetensors").read_bytes()


def test_held_out_recognition_rises_and_rejects_near_misses(demo):
    """Held-out weighted recognition (`unipers eval`, 24 photos of <bo>, 24 negatives of which 14 are
    near-misses) rises from the untrained concept's, and near-misses are rejected more often than not: the
    concept compares more than one attribute."""
    _, report = demo
    before = report["results"]["before"]["eval"]["recognition/weighted"]
    after = report["results"]["after"]["eval"]["recognition/weighted"]
    assert before <= RECOGNITION_BEFORE_AT_MOST, "the untrained concept should not already recognize it"
    assert after - before >= RECOGNITION_RISE
    assert after >= RECOGNITION_AFTER
    assert report["results"]["after"]["recognition"]["near_miss_neg"] >= NEAR_MISSES_REJECTED


def test_the_report_sets_the_concept_beside_every_baseline(demo):
    """eval/after scores the trained file beside all five baselines; the report quotes each one's weighted
    recognition and near-miss rejection, with its 95% interval and verdict, from eval/after/metrics.json.
    The "no concept token" baseline is the untrained start: the rows of bo_before.safetensors, the same
    score. Near-misses are a named set of the prepared folder, so eval's share equals the demo's own."""
    from unipers.eval.prompts import BASELINES, PERSONAL
    from unipers.world.demo import NEAR_MISSES, RECOGNITION

    out, report = demo
    rows = report["results"]["baselines"]
    assert list(rows) == [PERSONAL, *BASELINES]
    metrics = json.loads((out / "eval" / "after" / "metrics.json").read_text())
    for block in metrics["results"]:
        for metric in (RECOGNITION, NEAR_MISSES):
            row, ci = rows[block["method"]][metric], block["ci"]["mean"][metric]
            assert row["value"] == block["mean"][metric] and ci["ci_low"] <= row["value"] <= ci["ci_high"]
            assert (row["ci_low"], row["ci_high"]) == (ci["ci_low"], ci["ci_high"])
            if block["method"] != PERSONAL:
                assert row["verdict"] == block["separation"]["mean"][metric]
    assert rows["token"][RECOGNITION]["value"] == report["results"]["before"]["eval"][RECOGNITION]
    assert rows[PERSONAL][NEAR_MISSES]["value"] == report["results"]["after"]["recognition"]["near_miss_neg"]
    assert "Held-out recognition against the baselines" in (out / "report.md").read_text()


def test_fact_answers_are_learned(demo):
    from unipers.world.demo import FACTS

    _, report = demo
    before, after = report["results"]["before"]["facts"], report["results"]["after"]["facts"]
    assert len(before) == len(after) == len(FACTS)
    assert all(f["right"] for f in after), after
    assert sum(f["right"] for f in before) <= FACTS_RIGHT_BEFORE_AT_MOST, before


def test_generated_images_take_the_concepts_colour_or_pattern(demo):
    """After training, images for "A photo of <bo>." match <bo>'s colour or its pattern far more often
    than before. Not asserted: beating the class word alone ("A photo of a star."), which one draw of the 20
    misses (-0.01), nor its shape, which the tiny decoder does not draw yet (0.08-0.31)."""
    _, report = demo
    before, after = report["results"]["before"]["generation"], report["results"]["after"]["generation"]
    assert after["n_images"] == before["n_images"] >= 48
    assert max(after[k] - before[k] for k in ("colour", "pattern")) >= ATTRIBUTE_GAIN
