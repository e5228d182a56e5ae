"""The facts world (unipers.world.facts): places you can see, the rewrites its base learns, and
`benchmarks/bench_think.py` end to end on a small base."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unipers.inference.session import THINK_QUESTION
from unipers.world.base import PLACES
from unipers.world.facts import (PLACE_TINTS, REWRITES, check_places, facts_caption, photo_places, place_of,
                                 rewrite_example)
from unipers.world.think import MEASURED
from unipers.world.synth import WorldObject, all_objects, render, render_many, sample_objects

REPO = Path(__file__).resolve().parents[2]


def test_every_place_has_a_tint_far_from_the_others():
    check_places()
    tints = np.array([PLACE_TINTS[p] for p in PLACES], float)
    gaps = np.sqrt(((tints[:, None] - tints[None]) ** 2).sum(-1)) + np.eye(len(PLACES)) * 1e9
    assert gaps.min() > 60  # a background jitters by at most 10 per channel (17 in RGB)


def test_the_judge_reads_the_place_of_every_photo():
    objects = sample_objects(320, "facts-test")
    places = photo_places(len(objects), "facts-test")
    assert set(places) == set(PLACES)
    photos = render_many(objects, "facts-test", tints=[PLACE_TINTS[p] for p in places])
    assert place_of(photos) == places
    # generated pictures come as (N, 3, H, W) floats in [0, 1]
    assert place_of(torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255) == places
    with pytest.raises(ValueError, match="shape"):
        place_of(photos[0])


def test_a_tint_changes_the_background_only():
    obj = WorldObject("star", "purple", "striped")
    grey = np.asarray(render(obj, random.Random(3))).astype(int)
    assert np.array_equal(grey, np.asarray(render(obj, random.Random(3), tint=None)))
    tinted = np.asarray(render(obj, random.Random(3), tint=PLACE_TINTS["kitchen"])).astype(int)
    object_pixels = (np.abs(tinted - grey).sum(-1) == 0)
    # the object (same place, size and colour draws) is where the two agree; the background differs
    assert 0.05 < object_pixels.mean() < 0.6
    assert place_of(tinted[None].astype(np.uint8)) == ["kitchen"]


def test_rewrites_ask_what_think_asks_and_answer_from_the_prefix():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        ex = rewrite_example(rng.choice(all_objects()), rng)
        prefix, question = ex.question.split(". Rewrite", 1)
        name = prefix.split()[0]
        if "living in the " in prefix:  # one sentence: "zib is ..., living in the X and liking the Y"
            home = prefix.split("living in the ")[1].split(" and")[0]
            likes = prefix.split("liking the ")[1]
        else:  # statements, as a concept's recall writes them: "zib lives in the X. zib likes the Y."
            home = prefix.split(f"{name} lives in the ")[1].split(".")[0]
            likes = prefix.split(f"{name} likes the ")[1].split(".")[0]
            assert prefix.count(f"{name} is ") == 2  # the description and the colour
        prompt = question.split(": ", 1)[1]
        assert "Rewrite" + question == THINK_QUESTION.format(concepts=name, prompt=prompt)
        fills = [dict(c=name, home=home, likes=likes, other=o) for o in PLACES]
        matches = {(p, a.format(**f)) for p, a in REWRITES for f in fills if p.format(**f) == prompt}
        assert ex.answer in {a for _, a in matches}, (prompt, ex.answer)
        seen |= {p for p, _ in matches}
        if "where it lives" in prompt or "at home" in prompt:
            assert ex.answer.endswith(f"in the {home}.")
        elif "it likes" in prompt:
            assert ex.answer.endswith(f"in the {likes}.")
        else:  # nothing to add: unchanged
            assert ex.answer == prompt
        assert name in ex.answer and not ex.decision_only
    assert seen == {t[0] for t in REWRITES}
    # what the benchmark measures is what the base was taught to rewrite
    assert {m[1].replace("<{c}>", "{c}") for m in MEASURED} <= {t[0] for t in REWRITES}
    assert all(words in prompt for _, prompt, words in MEASURED)


def test_captions_name_the_photo_place_most_times():
    objects = sample_objects(400, "captions")
    places = photo_places(len(objects), "captions")
    caption, rng = facts_caption(places), random.Random(0)
    texts = [caption(i, o, rng) for i, o in enumerate(objects)]
    named = [t.endswith(f" in the {p}.") for t, p in zip(texts, places)]
    assert 0.7 < np.mean(named) < 0.9
    assert all(t.startswith("A photo of ") and t.endswith(".") for t in texts)


@pytest.mark.slow
def test_bench_think_end_to_end_on_a_small_base(tmp_path, monkeypatch):
    """bench_think.py on a facts world at 2% of its steps: every condition drawn and judged, the
    result file readable by --summary. Its numbers mean nothing at this size."""
    out, js = tmp_path / "think", tmp_path / "think.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_think.py"), "--steps", "20", "--world-share", "0.02",
           "--images", "4", "--out", str(out), "--json", str(js)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(js.read_text())
    assert saved["command"].startswith("python benchmarks/bench_think.py") and len(saved["runs"]) == 1
    r = saved["runs"][0]
    assert [row["place"] for row in r["rows"]] == ["kitchen", "garden"]
    for row in r["rows"]:
        conds = row["conditions"]
        assert {"as written", "place named"} <= set(conds)
        assert (row["rewrite"] is None) == (row["refused"] is not None) == ("--think" not in conds)
        for c in conds.values():
            assert c["place"]["n"] == 4 and sum(c["places"].values()) == 4
            assert c["place"]["ci_low"] <= c["place"]["value"] <= c["place"]["ci_high"]
        assert (out / "seed0" / "images" / f"grid_{row['fact']}_as_written.png").is_file()
    assert json.loads((out / "seed0" / "think.json").read_text())["rows"] == r["rows"]
    summary = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_think.py"), "--summary", str(js)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0 and "| kitchen |" in summary.stdout
