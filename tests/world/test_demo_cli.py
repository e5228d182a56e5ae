"""`unipers demo`'s flags reach the run's settings (the run itself is tests/world/test_demo.py, slow)."""

import argparse

from unipers.world import demo


def test_demo_flags_reach_the_settings(monkeypatch, tmp_path):
    seen = {}

    def fake_run(out, *, root=None, settings=None, overwrite=False):
        seen.update(out=out, root=root, settings=settings, overwrite=overwrite)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "report.md").write_text("report\n")

    monkeypatch.setattr(demo, "run_demo", fake_run)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--root", "w", "--steps", "1200",
                              "--batch-size", "16", "--seed", "1", "--quiet"])
    assert demo.main(args) == 0
    s = seen["settings"]
    assert (s.steps, s.batch_size, s.seed, s.quiet, seen["root"], seen["overwrite"]) == (1200, 16, 1, True, "w", False)
    # the defaults are the ones the README's demo table was measured with
    defaults = demo.DemoSettings()
    assert (defaults.steps, defaults.batch_size, defaults.lr) == (2400, 8, 0.03)
    parsed = parser.parse_args([])
    assert (parsed.steps, parsed.batch_size, parsed.seed) == (defaults.steps, defaults.batch_size, 0)


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path, unipers_cli, tree_digest, one_line_error):
    """Refused before the world build: the user's folder stays byte-identical, with or without --overwrite."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    before = tree_digest(tmp_path)
    for flags in ([], ["--overwrite"]):
        code, _, err = unipers_cli("demo", "--out", mine, "--root", tmp_path / "world", *flags)
        assert code == 2
        one_line_error(err, str(mine))
    assert tree_digest(tmp_path) == before
