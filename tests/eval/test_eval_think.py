"""eval.think (`unipers eval --think`): generation prompts that name a loaded concept are drawn as the AR
model rewrites them; CLIP-T still compares with the prompt as asked; refusals are drawn as written."""

import json

import torch

from unipers.config import load_config
from unipers.eval.generation import GenerationScorer
from unipers.eval.prompts import PERSONAL
from unipers.eval.runner import Evaluator
from unipers.eval.targets import load_targets
from unipers.inference.session import InferenceSession, InputError

TEMPLATES = "eval.prompts=['a photo of {concept}','{concept} in the snow']"


def _score(session, target, clip_dir, think: bool, method=PERSONAL):
    from unipers.eval.models import ClipEmbedder

    settings = load_config([], ["eval.images_per_prompt=2", TEMPLATES, f"eval.think={str(think).lower()}"]).eval
    ev = Evaluator(session, settings, clip=ClipEmbedder.load(str(clip_dir), "cpu"))
    return ev, ev.score(target, method)


def test_think_draws_the_rewrite_and_clip_t_keeps_the_asked_prompt(session, prepared_concepts, clip_dir, monkeypatch):
    target = load_targets(prepared_concepts, ["bo"])["bo"]
    drawn = []
    fixed = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))

    def draw(self, prompt, method, ref):
        drawn.append(prompt)
        return fixed

    monkeypatch.setattr(GenerationScorer, "draw", draw)
    monkeypatch.setattr(InferenceSession, "think", lambda self, prompt: prompt.replace("<bo>", "<bo> in the kitchen"))
    _, (plain, _, plain_samples) = _score(session, target, clip_dir, think=False)
    as_written = list(drawn)
    drawn.clear()
    ev, (metrics, counts, samples) = _score(session, target, clip_dir, think=True)

    assert drawn == [p.replace("<bo>", "<bo> in the kitchen") for p in as_written] and drawn != as_written
    assert counts["generation/think_rewritten"] == 2 and "generation/think_refused" not in counts
    assert [r["rewrite"] for r in ev.generation.rewrites] == drawn
    assert [r["prompt"] for r in ev.generation.rewrites] == as_written
    # the same pictures: every generation metric the same, CLIP-T too (it reads the prompt as asked)
    for metric in ("clip_i", "clip_t"):
        assert samples[metric] == plain_samples[metric] and metrics[metric] == plain[metric]


def test_a_refused_rewrite_is_drawn_as_written_and_counted(session, prepared_concepts, clip_dir, monkeypatch):
    target = load_targets(prepared_concepts, ["bo"])["bo"]
    drawn = []
    monkeypatch.setattr(GenerationScorer, "draw",
                        lambda self, prompt, method, ref: drawn.append(prompt) or torch.zeros(2, 3, 32, 32))

    def refuse(self, prompt):
        raise InputError(f"--think: the model rewrote {prompt!r} as 'a star', which drops <bo>")

    monkeypatch.setattr(InferenceSession, "think", refuse)
    ev, (_, counts, _) = _score(session, target, clip_dir, think=True)
    assert counts["generation/think_refused"] == 2 and "generation/think_rewritten" not in counts
    assert drawn == [r["prompt"] for r in ev.generation.rewrites] and all("drops <bo>" in r["refused"]
                                                                          for r in ev.generation.rewrites)
    # a method whose prompt names no loaded concept is drawn as written, and not counted
    drawn.clear()
    ev, (_, counts, _) = _score(session, target, clip_dir, think=True, method="class")
    assert drawn and not ev.generation.rewrites and not any(k.startswith("generation/think") for k in counts)


def test_unipers_eval_think_lists_the_rewrites(prepared_concepts, concept_files, clip_dir, dino_dir, tmp_path):
    from unipers.cli import main

    out = tmp_path / "think"
    args = ["eval", "--concept", str(concept_files["bo"]), "--data", str(prepared_concepts[0]), "--out", str(out),
            "--think", "--baselines", "--set", "eval.baselines=[class,token]", "--set", "eval.images_per_prompt=1",
            "--set", "eval.steps=2", "--set", TEMPLATES, "--set", f"eval.clip_path={clip_dir}", "--set", f"eval.dino_path={dino_dir}", "--bootstrap", "0"]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"]["think"] is True
    rewrites = result["think_rewrites"]
    # the concept file and the token baseline name <bo>; the class baseline does not
    assert sorted({r["method"] for r in rewrites}) == ["personal", "token"] and len(rewrites) == 4
    for block in result["results"]:
        counts = block["counts"]["bo"]
        n = counts.get("generation/think_rewritten", 0) + counts.get("generation/think_refused", 0)
        assert n == (2 if block["method"] in ("personal", "token") else 0), block["method"]
    for r in rewrites:
        assert ("rewrite" in r) != ("refused" in r)
        assert "<bo>" in r.get("rewrite", "<bo>")
    assert "## Prompts rewritten first (eval.think)" in (out / "report.md").read_text()
