"""The benchmark on the tiny models: negatives, the logit decision, option likelihood, and `unipers eval`
end to end (report files that agree with metrics.json, baselines, --no-generation, --compare, --run; the
per-sample values, intervals and separation flags of those runs)."""

import hashlib
import json
import re
import shutil

import pytest
import torch

from unipers.config import load_config
from unipers.data.manifest import Sample
from unipers.eval import runner
from unipers.eval.prompts import PERSONAL
from unipers.eval.runner import Evaluator
from unipers.eval.scoring import Prompter, answer_logprobs
from unipers.eval.stats import point
from unipers.eval.targets import load_targets
from unipers.eval.uncertainty import DOES_NOT_SEPARATE, SEPARATES, TOO_FEW, group_of, read_samples

FAST = ["eval.max_new_tokens=4", "eval.steps=2", "eval.images_per_prompt=1", "eval.batch_size=4",
        "eval.prompts=['a photo of {concept}','{concept} in the snow']"]


@pytest.fixture(scope="module")
def settings():
    return load_config([], FAST).eval


def test_negatives_are_other_concepts_held_out_photos(prepared_concepts):
    targets = load_targets(prepared_concepts)
    bo, mam = targets["bo"], targets["mam"]
    assert bo.split == "val" and len(bo.positives) == 1  # 4 questions about 1 val photo: asked once
    assert bo.negatives == mam.positives and mam.negatives == bo.positives
    assert load_targets(prepared_concepts, ["bo"])["bo"].negatives == []  # only evaluated concepts count
    with pytest.raises(ValueError, match="no prepared folder for concept.*rex"):
        load_targets(prepared_concepts, ["rex"])


def always_yes(session):
    """A stand-in for first_token_logits whose answer is always "yes"."""
    def logits_fn(session_, seqs, batch_size=8):
        logits = torch.zeros(len(seqs), 10_000)
        logits[:, session.backbone.yes_no_ids[0]] = 5.0
        return logits

    return logits_fn


def test_an_always_yes_model_scores_one_zero_and_a_half(session, settings, prepared_concepts, monkeypatch):
    ev = Evaluator(session, settings)
    monkeypatch.setattr(runner, "first_token_logits", always_yes(session))
    metrics, counts = ev.evaluate(load_targets(prepared_concepts)["bo"], PERSONAL)
    assert (metrics["recognition/pos"], metrics["recognition/neg"], metrics["recognition/weighted"]) == (1.0, 0.0, 0.5)
    assert counts["recognition/n_pos"] == 1 and counts["recognition/n_neg"] == 1
    assert 0.0 <= metrics["caption/recall"] <= 1.0 and "clip_i" not in metrics  # no CLIP: no generation metrics


def test_named_sets_of_images_are_scored_apart(session, settings, prepared_concepts, monkeypatch):
    """Always "yes": a named set of positives scores 1, of negatives 0, of both 0.5 (weighted); other
    evaluated concepts' photos are a set of their own."""
    from unipers.eval.targets import content_key

    monkeypatch.setattr(runner, "first_token_logits", always_yes(session))
    target = load_targets(prepared_concepts)["bo"]
    pos, neg = content_key(target.positives[0]), content_key(target.negatives[0])
    assert target.subsets == {"other_concepts": {neg}}
    target.subsets.update({"shifted": {pos}, "mixed": {pos, neg}, "unseen": {"0" * 40}})
    metrics, _, samples = Evaluator(session, settings).score(target, PERSONAL)
    got = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("recognition/subset/")}
    assert got == {"other_concepts": 0.0, "shifted": 1.0, "mixed": 0.5}  # a set with no image is left out
    assert samples["recognition/subset/mixed"]["strata"] == ["pos", "neg"]


def test_named_sets_come_from_the_manifest_and_the_retrieval(prepared_concepts, tmp_path):
    import dataclasses

    from unipers.data.manifest import read_prepared, write_manifest
    from unipers.eval.targets import content_key, read_target

    folder = tmp_path / "bo"
    shutil.copytree(prepared_concepts[0], folder)
    concept, samples = read_prepared(folder)
    val = next(s for s in samples if s.task == "recognition" and s.split == "val" and s.label)
    extra = [dataclasses.replace(val, label=False, image=img, subset=None) for img in concept["train"][:3]]
    extra[0] = dataclasses.replace(extra[0], subset="shifted background")
    extra[1] = dataclasses.replace(extra[1], concepts=["bo", "mam"])
    concept["negative_details"] = [{"image": concept["train"][2], "kind": "hard", "similarity": 0.9}]
    (folder / "concept.json").write_text(json.dumps(concept))
    write_manifest(folder / "manifest.jsonl", [*samples, *extra])
    sets = read_target(folder).subsets
    keys = [content_key(folder / img) for img in concept["train"][:3]]
    assert sets == {"shifted_background": {keys[0]}, "with_others": {keys[1]}, "hard_negatives": {keys[2]}}


def test_option_likelihood_picks_the_option_the_model_makes_most_likely(session, settings, prepared_concepts):
    target = load_targets(prepared_concepts, ["bo"])["bo"]
    options = {"A": "a red collar", "B": "blue", "C": "<bo> wears a long green scarf"}
    p = Prompter(session, target, PERSONAL)
    prompt = p.question("What does <bo> wear?")
    batched = answer_logprobs(session, [prompt] * 3, [p.answer(t) for t in options.values()], batch_size=3)
    independent = {}
    for letter, text in options.items():  # one unpadded sequence at a time, from the full logits
        answer = p.answer(text)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(session.backbone.full_logits(ids).float(), -1)[0]
        independent[letter] = [float(logp[len(prompt) + j - 1, tok]) for j, tok in enumerate(answer)]
    for got, (letter, want) in zip(batched, independent.items()):
        assert got == pytest.approx(want, abs=1e-4), letter
    best_sum = max(independent, key=lambda k: sum(independent[k]))
    best_mean = max(independent, key=lambda k: sum(independent[k]) / len(independent[k]))
    ev = Evaluator(session, settings)
    for gold in options:
        sample = Sample("qa", "bo", "test", question="What does <bo> wear?", answer=gold, options=options)
        metrics, _ = {}, {}
        ev._choices("qa", [sample], p, metrics, {})
        assert metrics["qa/sum"] == float(gold == best_sum) and metrics["qa/mean"] == float(gold == best_mean)


def test_each_baseline_writes_the_concept_its_own_way():
    from unipers.eval.prompts import BASELINES, context, generation_prompt, rewrite, style

    q, facts = "Is <bo> in this photo?", ["<bo> has a red collar."]
    written = {m: (context("bo", m, "dog", facts)[0] + rewrite(q, "bo", style(m), "dog"),
                   generation_prompt("{concept} on the beach", "bo", style(m), "dog")) for m in BASELINES}
    assert written == {
        "none": ("Is bo in this photo?", "bo on the beach"),
        "class": ("Is the dog in this photo?", "a dog on the beach"),
        "text": ("bo is a dog. bo has a red collar.\nIs bo in this photo?", "bo on the beach"),
        "image": ("<image>\nThis is bo.\nIs bo in this photo?", "bo on the beach"),
        "token": (q, "<bo> on the beach"),
    }


def with_choice_questions(prepared_concepts, root):
    """Copies of the prepared folders; bo's gets a held-out vqa and a text qa multiple-choice question."""
    folders = [shutil.copytree(f, root / f.name) for f in prepared_concepts]
    extra = [Sample("vqa", "bo", "test", image="images/val_000.png", question="What colour is <bo>?", answer="A",
                    options={"A": "orange", "B": "blue"}),
             Sample("qa", "bo", "test", question="What does <bo> wear?", answer="A",
                    options={"A": "a red collar", "B": "a green hat", "C": "nothing"})]
    with open(folders[0] / "manifest.jsonl", "a") as f:
        f.writelines(s.to_json() + "\n" for s in extra)
    return folders


def markdown_numbers(report: str) -> dict:
    """(method, checkpoint, concept, column) -> the number printed in report.md's first table."""
    lines = [line for line in report.split("\n\n")[1].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for col, cell in zip(header[3:], cells[3:]):
            out[(*cells[:3], col)] = None if cell == "–" else float(cell)
    return out


def test_unipers_eval_end_to_end(prepared_concepts, concept_files, clip_dir, dino_dir, tmp_path, capsys):
    from unipers.cli import main
    from unipers.eval.prompts import METHOD_TITLES
    from unipers.eval.report import title

    data = with_choice_questions(prepared_concepts, tmp_path / "data")
    files = [str(concept_files["bo"]), str(concept_files["mam"])]
    base = ["eval", "--concept", *files, "--data", *map(str, data)] + [a for s in FAST for a in ("--set", s)]
    models = ["--set", f"eval.clip_path={clip_dir}", "--set", f"eval.dino_path={dino_dir}"]
    out = tmp_path / "full"
    assert main(base + models + ["--out", str(out)]) == 0  # every baseline by default

    result = json.loads((out / "metrics.json").read_text())
    bo, mam = result["concepts"]["bo"], result["concepts"]["mam"]
    for key in ("recognition/weighted", "recognition_text/weighted", "recognition_text/unparsed", "caption/recall",
                "clip_i", "clip_t", "dino", "vqa/sum", "vqa/mean", "vqa/generation", "qa/sum", "qa/generation"):
        assert bo[key] is not None and 0.0 - 1 <= bo[key] <= 1.0, key
    assert "vqa/sum" not in mam and result["mean"]["clip_i"] == pytest.approx((bo["clip_i"] + mam["clip_i"]) / 2)
    assert [b["method"] for b in result["results"]] == ["personal", "none", "class", "text", "image", "token"]
    assert [b["checkpoint"] for b in result["results"]] == ["concepts", "base", "base", "base", "base", "concepts"]
    assert all(set(b["separation"]["concepts"]) == {"bo", "mam"} for b in result["results"][1:])
    assert result["settings"]["steps"] == 2 and result["settings"]["templates"] == ["a photo of {concept}",
                                                                                      "{concept} in the snow"]
    assert result["results"][0]["counts"]["bo"]["generation/n_images"] == 2
    for path in files:
        record = result["concept_files"][path]
        assert record["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    for name in ("bo", "mam", "bo_base-none", "bo_base-class", "mam_base-image", "bo_base-token"):
        assert (out / "grids" / f"{name}.png").is_file(), name

    printed = markdown_numbers((out / "report.md").read_text())
    checked = 0
    for block in result["results"]:
        for concept, values in [*block["concepts"].items(), ("mean", block["mean"])]:
            for key, value in values.items():
                cell = printed.get((METHOD_TITLES[block["method"]], block["checkpoint"], concept, title(key)))
                assert cell == (None if value is None else round(value, 4)), (block["method"], concept, key)
                checked += 1
    assert checked > 100
    check_intervals(out, result)

    # Without a CLIP path the run stops before any work, naming the key to set ...
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(base + ["--out", str(tmp_path / "none")])
    assert "eval.clip_path" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # ... and --no-generation still gives every understanding metric.
    quick = tmp_path / "quick"
    assert main(base + ["--out", str(quick), "--no-generation", "--bootstrap", "0", "--no-baselines"]) == 0
    quick_result = json.loads((quick / "metrics.json").read_text())
    understanding = quick_result["concepts"]["bo"]
    assert "clip_i" not in understanding
    assert {k: v for k, v in bo.items() if k in understanding} == understanding  # same seeds, same answers
    assert "ci" not in quick_result and "confidence intervals" not in (quick / "report.md").read_text()
    assert (out / "baselines.png").stat().st_size > 1000 and not (quick / "baselines.png").exists()
    assert (quick / "samples.jsonl").is_file()  # --bootstrap 0: no intervals, the samples all the same

    capsys.readouterr()
    assert main(["eval", "--compare", str(out), str(quick), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"concept file\s+bo\s+Rec\. weighted\s+\S+\s+\S+\s+\+0\.0000", table)
    assert re.search(r"concept file\s+mean\s+CLIP-I\s+\d\.\d{4}\s+–\s+–", table)
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {(r["method"], r["concept"], r["metric"]): r for r in compared["rows"]}
    for concept in ("bo", "mam", "mean"):  # the same answers: no difference, p = 1
        r = rows[(PERSONAL, concept, "recognition/weighted")]
        assert r["pairs"] == 2 * (2 if concept == "mean" else 1) and r["diff"] == 0 and r["p_value"] == 1.0, r
    assert rows[(PERSONAL, "bo", "qa/sum")]["pairs"] == 1 and rows[(PERSONAL, "bo", "clip_i")]["pairs"] == 0
    assert rows[("none", "bo", "caption/recall")]["pairs"] == 0  # baselines only in A: nothing to pair
    assert "| bo | Rec. weighted |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_the_token_baseline_is_the_concept_file_at_its_init(concept_files, prepared_concepts, tmp_path):
    """"No concept token" scores exactly what a file holding the class-word init rows scores as a concept
    file, and the trained rows are back, bit for bit, after it."""
    from unipers.inference import InferenceSession

    cfg = load_config([], ["eval.baselines=[token]", "eval.bootstrap=0", *FAST])
    session = InferenceSession.from_config(cfg)
    session.load(concept_files["bo"])
    trained = {k: v.clone() for k, v in session.model.bank.rows["bo"].state_dict().items()}
    session.unload()
    request = runner.EvalRequest(concept_files=[concept_files["bo"]], data=prepared_concepts, generation=False,
                                 out=tmp_path / "trained")
    result = runner.run_eval(cfg, request, session=session, log=lambda m: None)
    token = result["results"][-1]
    assert token["method"] == "token" and token["files"] == [str(concept_files["bo"])]
    assert token["concepts"]["bo"] != result["concepts"]["bo"]  # the trained rows answer differently

    session.model.add_concept("bo", "dog", init=cfg.bank.init, init_noise=cfg.bank.init_noise, seed=cfg.seed)
    init_file = session.model.save_concepts(tmp_path / "bo_init.safetensors")
    session.unload()
    plain = runner.run_eval(cfg, runner.EvalRequest(concept_files=[init_file], data=prepared_concepts,
                                                    generation=False, out=tmp_path / "init", baselines=False),
                            session=session, log=lambda m: None)
    assert plain["concepts"]["bo"] == token["concepts"]["bo"]

    session.load(concept_files["bo"])
    with session.concepts_untrained(init=cfg.bank.init, init_noise=cfg.bank.init_noise, seed=cfg.seed):  # no settings: the defaults
        moved = session.model.bank.rows["bo"].state_dict()
        assert any(not torch.equal(moved[k], trained[k]) for k in trained)
    after = session.model.bank.rows["bo"].state_dict()
    assert all(torch.equal(after[k], trained[k]) for k in trained)


def test_the_token_baseline_starts_where_the_files_training_did(concept_files, tmp_path):
    """A concept file that records its training config (every run's does) is reset to that run's init,
    whatever the eval config says; a file without one takes the eval config's."""
    from unipers.config import to_yaml
    from unipers.inference import InferenceSession

    trained_with = load_config([], ["seed=7", "bank.init_noise=0.5"])
    session = InferenceSession.from_config(load_config([]))
    session.load(concept_files["bo"])
    recorded = session.model.save_concepts(tmp_path / "bo_run.safetensors", extra={"config": to_yaml(trained_with)})
    eval_cfg = load_config([], ["seed=3"])
    settings = runner.init_settings([recorded, concept_files["mam"]], eval_cfg)
    assert settings == {"bo": {"init": "class_word", "init_noise": 0.5, "seed": 7},
                        "mam": {"init": "class_word", "init_noise": eval_cfg.bank.init_noise, "seed": 3}}
    expected = session.model.backbone.initial_rows("bo", "dog", init="class_word", init_noise=0.5, seed=7)
    with runner._baseline(session, "token", eval_cfg, [recorded]):
        rows = session.model.bank.rows["bo"]
        assert all(torch.equal(rows.embed[g], v) for g, v in expected[0].items())


def check_intervals(out, result):
    """Every metric of every block has its samples in samples.jsonl (their mean is the metric) and a
    bootstrap interval; baselines say where they separate, as report.md does."""
    from unipers.eval.prompts import METHOD_TITLES
    from unipers.eval.report import fmt_ci, title

    assert result["settings"]["bootstrap"] == 1000 and result["settings"]["bootstrap_seed"] == 0
    samples = read_samples(out / "samples.jsonl")
    report = (out / "report.md").read_text()
    for block in result["results"]:
        kept = samples.get((block["method"], block["checkpoint"]), {})
        for concept, values in block["concepts"].items():
            for key, value in values.items():
                if value is None:  # no samples (e.g. every generated image a copy): nothing to resample
                    assert key not in kept[concept] and key not in block["ci"]["concepts"][concept], key
                    continue
                entry = kept[concept][key]
                assert point([group_of(entry)]) == pytest.approx(value, abs=1e-6), (block["method"], concept, key)
                interval = block["ci"]["concepts"][concept][key]
                assert interval["ci_low"] <= interval["ci_high"] and interval["n"] == len(entry["values"])
                assert fmt_ci(interval) in report
        assert set(block["ci"]["mean"]) == {k for k, v in block["mean"].items() if v is not None}
    assert samples[(PERSONAL, "concepts")]["bo"]["recognition/weighted"]["strata"] == ["pos", "neg"]
    assert result["ci"] == result["results"][0]["ci"] and "## 95% confidence intervals" in report
    judged = 0
    for block in result["results"][1:]:
        sep = block["separation"]
        for concept, flags in [*sep["concepts"].items(), ("mean", sep["mean"])]:
            # 1 or 2 samples per stratum here: a bootstrap of so few is a point, and judges nothing
            assert set(flags.values()) == {TOO_FEW} and "caption/recall" in flags
            assert not any(k.endswith("/unparsed") for k in flags)
            method = METHOD_TITLES[block["method"]]
            for verdict, cell in zip((DOES_NOT_SEPARATE, TOO_FEW, SEPARATES), (3, 4, 5)):
                names = [title(k) for k, v in flags.items() if v == verdict]
                row = next(line for line in report.splitlines() if line.startswith(f"| {method} | {concept} | ")
                           and line.count("|") == 6)
                assert sorted(c for c in row.split("|")[cell].strip().split(", ") if c != "–") == sorted(names)
            judged += len(flags)
    assert judged > 20 and "## Separation from the baselines" in report


def test_eval_over_a_runs_step_files_plots_curves(concept_files, prepared_concepts, tmp_path):
    from unipers.cli import main
    from unipers.models.unified import UnifiedModel

    model = UnifiedModel.from_config(load_config([]))
    model.load_concepts(concept_files["bo"])
    concepts = tmp_path / "run" / "concepts"
    for name, step in (("step_000010", 10), ("step_000020", 20), ("last", 20)):
        model.save_concepts(concepts / f"{name}.safetensors", extra={"step": str(step)})
    out = tmp_path / "curve"
    argv = ["eval", "--run", str(tmp_path / "run"), "--data", *map(str, prepared_concepts), "--out", str(out),
            "--no-generation", "--no-baselines", *[a for s in FAST for a in ("--set", s)]]
    assert main(argv) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [(b["checkpoint"], b["step"]) for b in result["results"]] == [("step_000010", 10), ("step_000020", 20),
                                                                          ("last", 20)]
    assert (out / "curves.png").stat().st_size > 1000 and "Over training" in (out / "report.md").read_text()
    assert list(result["concepts"]) == ["bo"]  # mam has a folder but no concept file: not evaluated
    samples = read_samples(out / "samples.jsonl")  # every checkpoint keeps its samples and intervals
    assert {k for k, _ in samples} == {PERSONAL} and len(samples) == 3 and all("ci" in b for b in result["results"])
