"""The description probe (unipers/world/probes.py) and benchmarks/bench_world_descriptions.py: its scoring,
and a micro-size run of the benchmark end to end."""

import sys
from pathlib import Path

from unipers.world.probes import description_scores, parse_object

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the benchmark's own runs


def test_description_scores_count_each_attribute_by_whole_words():
    star = parse_object("purple striped star")
    texts = ["A purple striped star.", "A purple striped cross.", "A red checkered star.", "A starry purple thing."]
    got = description_scores(texts, [star] * 4)
    assert got == {"colour": 0.75, "pattern": 0.5, "shape": 0.5, "all": 0.25}


def test_micro_run_holds_the_objects_out_and_scores_every_row(tmp_path, monkeypatch):
    import bench_world_descriptions as bench

    from unipers.world import base
    from unipers.world.build import RECIPE

    micro = RECIPE.scaled(0, n_train=40)  # one step a stage
    held = [parse_object(w) for w in ("purple striped star", "green checkered triangle")]
    drawn = []
    real = base.world_example

    def spy(obj, rng, held_out=(), **kw):
        drawn.append(obj)
        assert set(held) <= set(held_out)  # negatives are drawn from outside the held-out set too
        return real(obj, rng, held_out, **kw)

    monkeypatch.setattr(base, "world_example", spy)
    run = bench.bench_seed(0, held, photos=3, work=tmp_path, quiet=True, recipe=micro)
    assert drawn and not set(drawn) & set(held)
    assert list(run["rows"]) == [str(o) for o in held] + ["seen objects (fresh photos)"]
    for row in run["rows"].values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("colour", "pattern", "shape", "all"))


def test_command_line_sets_the_pretraining_steps_and_writes_json(tmp_path, monkeypatch, capsys):
    import json

    import bench_world_descriptions as bench

    from unipers.world import build

    monkeypatch.setattr(build, "RECIPE", build.RECIPE.scaled(0, n_train=40))  # the benchmark builds by RECIPE
    out = tmp_path / "d.json"
    bench.main(["--seeds", "0", "--photos", "2", "--held-out", "purple striped star", "--pretrain-steps", "3",
                "--out", str(out), "--quiet"])
    result = json.loads(out.read_text())
    assert result["pretrain_steps"] == 3 and [r["pretrain_steps"] for r in result["runs"]] == [3]
    assert "| purple striped star |" in capsys.readouterr().out
