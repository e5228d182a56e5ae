"""`unipers demo`'s flags reach the run's settings (the run itself is tests/world/test_demo.py, slow)."""

import argparse

from unipers.world import demo


def test_demo_flags_reach_the_settings(monkeypatch, tmp_path):
    seen = {}

    def fake_run(out, *, root=None, settings=None):
        seen.update(out=out, root=root, settings=settings)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "report.md").write_text("report\n")

    monkeypatch.setattr(demo, "run_demo", fake_run)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--root", "w", "--steps", "1200",
                              "--batch-size", "16", "--seed", "1", "--quiet"])
    assert demo.main(args) == 0
    s = seen["settings"]
    assert (s.steps, s.batch_size, s.seed, s.quiet, seen["root"]) == (1200, 16, 1, True, "w")
    # the defaults are the ones the README's demo table was measured with
    defaults = demo.DemoSettings()
    assert (defaults.steps, defaults.batch_size, defaults.lr) == (2400, 8, 0.03)
    parsed = parser.parse_args([])
    assert (parsed.steps, parsed.batch_size, parsed.seed) == (defaults.steps, defaults.batch_size, 0)
