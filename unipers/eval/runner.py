"""The benchmark over concept files and prepared folders: one row per (method, concept), then means.

    from unipers.eval.runner import EvalRequest, run_eval
    result = run_eval(cfg, EvalRequest(concept_files=["bo.safetensors"], data=["data/bo", "data/mam"],
                                       out="eval/bo", baselines=True))   # metrics.json's content

Methods: ``personal`` (the concept files) and their baselines: ``none`` / ``class`` / ``text`` / ``image`` on
the untrained base, and ``token``, the concept files with their rows at the class-word init (prompts.py). Each method answers the same held-out questions (targets.py):

- recognition from the logits (P(Yes) > P(No) for the answer's first token) and from the generated
  answer parsed strictly (whole-word yes/no; both or neither is unparsed, counted wrong);
- multiple choice (vqa, qa) by option likelihood (sum and mean of the option text's token log-probs
  after the question) and by the generated answer's option letter or text;
- caption recall ("Describe this photo."): the caption names the concept;
- generation over the prompt templates: CLIP-I, CLIP-T (cosine), DINO; the images go to a grid.

Every mean keeps its per-sample values (uncertainty.py: OUT/samples.jsonl) and gets a percentile bootstrap
interval (block["ci"]); baseline blocks say where they do not separate from the concept files.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from unipers.concepts.recognition import recognition_layout
from unipers.eval import metrics as M
from unipers.eval.prompts import (BASELINES, CAPTION_QUESTION, GENERATION_TEMPLATES, IMAGE, ON_BASE, PERSONAL,
                                  RECOGNITION_QUESTION, check_templates, choice_question, style)
from unipers.eval.scoring import Prompter, answer_logprobs, first_token_logits, generate_answers
from unipers.eval.targets import EvalTarget, content_key, expand_data_dirs, load_targets
from unipers.eval.uncertainty import digest, record, unique_ids


@dataclass
class EvalRequest:
    concept_files: Sequence[str | Path] = ()
    data: Sequence[str | Path] = ()
    out: str | Path = "eval"
    baselines: bool = True
    """Score eval.baselines beside the concept files (the table's default; --no-baselines skips them)."""
    generation: bool = True
    run_dir: Optional[str | Path] = None
    device: Optional[str] = None
    overwrite: bool = False
    """Replace `out` when an earlier eval wrote it (never another folder, nor one holding an input)."""
    bootstrap: Optional[int] = None
    """Bootstrap resamples of each interval (0: none); None: eval.bootstrap if the schema has it, else 1000."""


class Evaluator:
    """Scores targets with one session; image tokens and reference embeddings are computed once."""

    def __init__(self, session, settings, *, clip=None, dino=None, judge=None, grids: Optional[Path] = None):
        from unipers.eval.generation import GenerationScorer

        self.session, self.s, self.judge = session, settings, judge
        self.templates = check_templates(settings.prompts) if settings.prompts else list(GENERATION_TEMPLATES)
        self.generation = (GenerationScorer(session, settings, self.templates, clip=clip, dino=dino, grids=grids)
                           if clip is not None else None)
        self._tokens: dict[str, Tensor] = {}
        self._descriptions: dict[str, list[int]] = {}

    def tokens(self, paths: Sequence[Path]) -> list[Tensor]:
        """VQ tokens per image, encoded once per content (prepared folders hold copies of shared photos)."""
        keys = [content_key(p) for p in paths]
        missing = list({k: p for k, p in zip(keys, paths) if k not in self._tokens}.items())
        for i in range(0, len(missing), self.s.batch_size):
            chunk = missing[i:i + self.s.batch_size]
            encoded = self.session.image_tokens([p for _, p in chunk])
            self._tokens.update((k, t.cpu()) for (k, _), t in zip(chunk, encoded))
        return [self._tokens[k] for k in keys]

    def descriptions(self, paths: Sequence[Path]) -> list[list[int]]:
        """The base's description of each image (describe, then decide), once per content: it does not
        depend on the concept or the method."""
        keys = [content_key(p) for p in paths]
        missing = list({k: t for k, t in zip(keys, self.tokens(paths)) if k not in self._descriptions}.items())
        described = self.session.model.describe([t for _, t in missing], batch_size=self.s.batch_size)
        self._descriptions.update((k, d) for (k, _), d in zip(missing, described))
        return [self._descriptions[k] for k in keys]

    def evaluate(self, target: EvalTarget, method: str, grid_name: Optional[str] = None) -> tuple[dict, dict]:
        """(metrics, counts) of one concept under one method."""
        return self.score(target, method, grid_name)[:2]

    def score(self, target: EvalTarget, method: str, grid_name: Optional[str] = None) -> tuple[dict, dict, dict]:
        """(metrics, counts, per-sample values: metric -> entry as in uncertainty.record) of one concept."""
        ref = self.tokens(target.references[:1])[0] if target.references else None
        if method == "image" and ref is None:
            return {}, {"skipped": "no train photo to place in context"}, {}
        p = Prompter(self.session, target, style(method), ref)
        metrics, counts, per_sample = {}, {}, {}
        self._recognition(target, p, metrics, counts, per_sample)
        for task, samples in target.choices.items():
            self._choices(task, samples, p, metrics, counts, per_sample)
        if self.judge is not None:
            for task, samples in target.open.items():
                self._open(task, samples, p, metrics, counts, per_sample)
        self._captions(target, p, metrics, counts, per_sample)
        if self.generation is not None:
            self.generation.score(target, style(method), ref, metrics, counts, grid_name, per_sample, label=method)
        return metrics, counts, per_sample

    # ---- understanding ----------------------------------------------------------------------------------
    def _answers(self, seqs: list[list[int]]) -> list[tuple[list[int], str]]:
        return generate_answers(self.session, seqs, self.s.max_new_tokens, self.s.batch_size)

    def _recognition(self, t: EvalTarget, p: Prompter, metrics: dict, counts: dict, per_sample=None) -> None:
        images, labels = [*t.positives, *t.negatives], [True] * len(t.positives) + [False] * len(t.negatives)
        if not images:
            return
        question, tokens = RECOGNITION_QUESTION.format(name=t.name), self.tokens(images)
        layout = recognition_layout(self.session.model.prompts)
        descriptions = self.descriptions(images) if layout.describes else [None] * len(tokens)
        seqs = [p.recognition(layout, question, tok, d) for tok, d in zip(tokens, descriptions)]
        logits = first_token_logits(self.session, seqs, self.s.batch_size)
        by_logit = self.session.backbone.says_yes(logits).tolist()
        by_text = [M.parse_yes_no(text) for _, text in self._answers(seqs)]
        ids, n_pos = [content_key(i) for i in images], len(t.positives)
        strata = ["pos"] * n_pos + ["neg"] * len(t.negatives)
        for key, decisions in (("recognition", by_logit), ("recognition_text", by_text)):
            acc = M.recognition_accuracy(decisions, labels)
            metrics.update({f"{key}/{k}": acc[k] for k in ("pos", "neg", "weighted")})
            right = [(d is True) if y else (d is False) for d, y in zip(decisions, labels)]  # None: wrong
            if key == "recognition":
                self._subsets(t, ids, right, strata, metrics, per_sample)
            record(per_sample, f"{key}/pos", ids[:n_pos], right[:n_pos])
            record(per_sample, f"{key}/neg", ids[n_pos:], right[n_pos:])
            if acc["weighted"] is not None:
                record(per_sample, f"{key}/weighted", ids, right, strata=strata)
            if key == "recognition_text":
                metrics[f"{key}/unparsed"] = acc["unparsed_rate"]
                counts[f"{key}/unparsed"] = acc["unparsed"]
                record(per_sample, f"{key}/unparsed", ids, [d is None for d in decisions])
        counts.update({"recognition/n_pos": len(t.positives), "recognition/n_neg": len(t.negatives)})

    @staticmethod
    def _subsets(t: EvalTarget, ids, right, strata, metrics: dict, per_sample) -> None:
        """recognition/subset/<name>: the logit decision on each named set of images (targets.py), weighted
        as (pos + neg) / 2 when the set holds both, else the share right."""
        from unipers.eval.stats import point
        from unipers.eval.uncertainty import group_of

        for name, keys in sorted(t.subsets.items()):
            idx = [i for i, k in enumerate(ids) if k in keys]
            if not idx:
                continue
            st = [strata[i] for i in idx]
            entry = {"ids": [ids[i] for i in idx], "values": [float(right[i]) for i in idx],
                     "strata": st if len(set(st)) > 1 else None}
            metrics[f"recognition/subset/{name}"] = point([group_of(entry)])
            record(per_sample, f"recognition/subset/{name}", entry["ids"], entry["values"], strata=entry["strata"])

    def _choices(self, task: str, samples, p: Prompter, metrics: dict, counts: dict, per_sample=None) -> None:
        if not samples:
            return
        prompts, answers, owners = [], [], []
        gen_seqs, texts = [], []
        for i, s in enumerate(samples):
            images = self.tokens([p.target.folder / s.image]) if s.image else []
            head = f"{IMAGE}\n" * len(images)
            q = p.question(head + s.question, images)
            for letter, text in s.options.items():
                prompts.append(q)
                answers.append(p.answer(text))
                owners.append((i, letter))
            gen_seqs.append(p.question(head + choice_question(s.question, s.options), images))
            texts.append({k: p.rewrite(v) for k, v in s.options.items()})
        logprobs = answer_logprobs(self.session, prompts, answers, self.s.batch_size)
        by_option: list[dict[str, list[float]]] = [{} for _ in samples]
        for (i, letter), lp in zip(owners, logprobs):
            by_option[i][letter] = lp
        by_sum, by_mean = zip(*(M.option_choices(d) for d in by_option))
        parsed = [M.parse_option(text, opts) for (_, text), opts in zip(self._answers(gen_seqs), texts)]
        gold = [s.answer for s in samples]
        metrics.update({f"{task}/sum": M.accuracy(by_sum, gold), f"{task}/mean": M.accuracy(by_mean, gold),
                        f"{task}/generation": M.accuracy(parsed, gold),
                        f"{task}/unparsed": sum(x is None for x in parsed) / len(parsed)})
        counts.update({f"{task}/n": len(samples), f"{task}/unparsed": sum(x is None for x in parsed)})
        ids = unique_ids([digest(s.question, content_key(p.target.folder / s.image) if s.image else "",
                                 sorted(s.options.items()), s.answer) for s in samples])
        for key, chosen in (("sum", by_sum), ("mean", by_mean), ("generation", parsed)):
            record(per_sample, f"{task}/{key}", ids, [c == g for c, g in zip(chosen, gold)])
        record(per_sample, f"{task}/unparsed", ids, [x is None for x in parsed])

    def _open(self, task: str, samples, p: Prompter, metrics: dict, counts: dict, per_sample=None) -> None:
        """Open-ended questions: the answer the method generates, judged against the reference (judge.py)."""
        if not samples:
            return
        from unipers.eval.prompts import rewrite

        seqs = []
        for s in samples:
            images = self.tokens([p.target.folder / s.image]) if s.image else []
            seqs.append(p.question(f"{IMAGE}\n" * len(images) + s.question, images))
        name = p.target.name
        plain = [rewrite(text, name, "none", None) for text in (s.question for s in samples)]
        references = [rewrite(s.answer, name, "none", None) for s in samples]
        answers = [rewrite(text, name, "none", None) for _, text in self._answers(seqs)]
        right = [q > 0.5 for q in self.judge.p_yes(name, plain, references, answers)]
        metrics[f"{task}/judge"] = sum(right) / len(right)
        counts[f"{task}/judge_n"] = len(right)
        ids = unique_ids([digest(s.question, content_key(p.target.folder / s.image) if s.image else "", s.answer)
                          for s in samples])
        record(per_sample, f"{task}/judge", ids, right)

    def _captions(self, t: EvalTarget, p: Prompter, metrics: dict, counts: dict, per_sample=None) -> None:
        if not t.positives:
            return
        seqs = [p.question(f"{IMAGE}\n{CAPTION_QUESTION}", [tok]) for tok in self.tokens(t.positives)]
        named = [M.names_concept(text, t.name, ids, p.identifier_id) for ids, text in self._answers(seqs)]
        metrics["caption/recall"] = M.caption_recall(named)
        record(per_sample, "caption/recall", [content_key(i) for i in t.positives], named)
        counts["caption/n"] = len(named)

def _judge_note(t: EvalTarget, judge) -> list[str]:
    n = sum(len(v) for v in t.open.values())
    if not n:
        return []
    if judge is None:
        return [f"{n} open-ended question(s) not scored: set eval.judge_path to a local causal LM folder"]
    return [f"{n} open-ended question(s) judged by {judge.name}"]


def run_checkpoints(run_dir: Path) -> list[Path]:
    """A run's concept files in step order, then last.safetensors (best_* are picks, not steps)."""
    folder = Path(run_dir) / "concepts"
    steps = sorted(folder.glob("step_*.safetensors"))
    files = steps + ([folder / "last.safetensors"] if (folder / "last.safetensors").is_file() else [])
    if not files:
        raise FileNotFoundError(f"{folder}: no step_*.safetensors or last.safetensors to evaluate")
    return files


def file_record(path: Path) -> dict:
    """What identifies a concept file: its SHA-256, the base it was trained on, its concepts and step."""
    import hashlib

    from unipers.concepts.io import read_metadata

    meta = read_metadata(path)
    return {"sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "base_fingerprint": meta.get("base_fingerprint"), "decoder_fingerprint": meta.get("decoder_fingerprint"),
            "connector_fingerprint": meta.get("connector_fingerprint"),
            "concepts": [c["name"] for c in meta["concepts"]], "step": int(meta["step"]) if "step" in meta else None}


def _block(method: str, label: str, step, files, rows: dict[str, tuple]) -> dict:
    """One method's (and checkpoint's) results from its rows: concept -> (metrics, counts, per-sample)."""
    keys = list(dict.fromkeys(k for m, *_ in rows.values() for k in m))
    mean = {k: M.mean_of([m.get(k) for m, *_ in rows.values()]) for k in keys}
    return {"method": method, "checkpoint": label, "step": step, "files": [str(f) for f in files],
            "concepts": {n: m for n, (m, *_) in rows.items()}, "counts": {n: c for n, (_, c, *_) in rows.items()},
            "mean": mean}


def _baseline(session, method: str, cfg, files: Sequence[Path] = ()):
    """The model state a baseline answers with: the untrained base, or (``token``) the concept ``files``
    with their rows at the init their training started from (`init_settings`)."""
    if method in ON_BASE:
        return session.concepts_disabled()
    return session.concepts_untrained(init_settings(files, cfg))


def init_settings(files: Sequence[Path], cfg) -> dict[str, dict]:
    """Per concept of ``files``: the bank.init, bank.init_noise and seed its training started from, read
    from the training config the concept file records, else the eval config's."""
    import yaml

    from unipers.concepts.io import read_metadata

    default = {"init": cfg.bank.init, "init_noise": cfg.bank.init_noise, "seed": cfg.seed}
    out = {}
    for f in files:
        meta = read_metadata(f)
        recorded = yaml.safe_load(meta["config"]) if meta.get("config") else None
        settings = dict(default)
        if isinstance(recorded, dict):
            bank = recorded.get("bank") or {}
            settings.update({k: bank[k] for k in ("init", "init_noise") if k in bank})
            settings["seed"] = recorded.get("seed", settings["seed"])
        out.update({c["name"]: settings for c in meta["concepts"]})
    return out


def run_eval(cfg, request: EvalRequest, session=None, log: Callable[[str], None] = None) -> dict:
    """Evaluate, write metrics.json, report.md and grids (and curves.png for a run); returns the results.

    A `session` passed in is reused (and left with no concepts loaded); by default one is built from `cfg`."""
    from unipers.eval import plots, report, uncertainty
    from unipers.eval.models import ClipEmbedder, DinoEmbedder
    from unipers.inference.session import InferenceSession
    from unipers.io import atomic_directory, check_output

    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(request.out)
    inputs = [*request.concept_files, *request.data, *([request.run_dir] if request.run_dir else [])]
    check_output(out, overwrite=request.overwrite, inputs=inputs)  # before any slow work
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = cfg.eval
    resamples, boot_seed = uncertainty.bootstrap_settings(settings, request.bootstrap)
    if settings.prompts:
        check_templates(settings.prompts)
    unknown = [b for b in settings.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"eval.baselines: unknown {', '.join(unknown)} (choose from {', '.join(BASELINES)})")
    folders = expand_data_dirs(request.data)
    files = run_checkpoints(Path(request.run_dir)) if request.run_dir else [Path(f) for f in request.concept_files]
    if not files and not request.baselines:
        raise ValueError("nothing to evaluate: give --concept FILE, --run RUN_DIR or --baselines")
    records = {str(f): file_record(f) for f in files}
    if request.run_dir:  # last.safetensors is often the newest step file again: evaluate it once
        unique: dict[str, Path] = {}
        for f in files:
            unique.setdefault(records[str(f)]["sha256"], f)
        files = list(unique.values())
    clip = dino = None
    if request.generation:  # fail on a missing metric model before any slow work
        clip = ClipEmbedder.load(settings.clip_path, device)
        dino = DinoEmbedder.load(settings.dino_path, device)
    judge = None
    if settings.judge_path:
        from unipers.eval.judge import Judge

        judge = Judge.load(settings.judge_path, device, settings.batch_size)
    session = session or InferenceSession.from_config(cfg, device=device)
    with atomic_directory(out, overwrite=request.overwrite, kind="eval", inputs=inputs) as tmp:
        grids = tmp / "grids"
        ev = Evaluator(session, settings, clip=clip, dino=dino, judge=judge, grids=grids)
        groups = ([(f.stem, records[str(f)]["step"], [f]) for f in files] if request.run_dir
                  else [("concepts", None, files)] if files else [])
        blocks, samples, evaluated = [], [], None
        for i, (label, step, group) in enumerate(groups):
            session.unload()  # the next file may hold the same names (a run's step files)
            names = [n for f in group for n in session.load(f)]
            targets = load_targets(folders, names)
            evaluated = evaluated or targets
            last = i == len(groups) - 1
            rows = {}
            for name, t in targets.items():
                log(f"eval: {label} {name}")
                grid = name if last else f"{name}_{label}"
                rows[name] = ev.score(t, PERSONAL, grid)
            blocks.append(_block(PERSONAL, label, step, group, rows))
            samples.append({n: r[2] for n, r in rows.items()})
        if request.baselines:
            targets = evaluated if evaluated is not None else load_targets(folders)
            for method in settings.baselines:
                if method == "token" and evaluated is None:
                    log("eval: no concept file, so no 'token' baseline (it needs trained rows to reset)")
                    continue
                rows = {}
                with _baseline(session, method, cfg, groups[-1][2] if groups else ()):
                    for name, t in targets.items():
                        log(f"eval: baseline ({method}) {name}")
                        rows[name] = ev.score(t, method, f"{name}_base-{method}")
                blocks.append(_block(method, "base" if method in ON_BASE else groups[-1][0], None,
                                     [] if method in ON_BASE else groups[-1][2], rows))
                samples.append({n: r[2] for n, r in rows.items()})
        session.unload()
        uncertainty.add_intervals(blocks, samples, resamples, boot_seed)
        uncertainty.add_separation(blocks)
        targets = evaluated if evaluated is not None else load_targets(folders)
        result = {
            "settings": {**dataclasses.asdict(settings), "generation": request.generation,
                         "templates": ev.templates if request.generation else [], "device": device,
                         "bootstrap": resamples, "bootstrap_seed": boot_seed},
            "per_sample": {"file": uncertainty.SAMPLES_FILE, "one line per": "method, checkpoint, concept, metric",
                           "metric": "mean over strata of each stratum's mean of values (one stratum: the mean)"},
            "config": dataclasses.asdict(cfg),
            "models": {"backbone": cfg.backbone.path, "decoder": cfg.decoder.path, "connector": cfg.connector.path,
                       "judge": judge.name if judge else None, "fingerprints": session.model.fingerprints},
            "concept_files": records,
            "data": {n: {"folder": str(t.folder), **t.counts(), "notes": t.notes + _judge_note(t, judge)}
                     for n, t in targets.items()},
            "results": blocks,
        }
        if settings.think and ev.generation is not None:
            result["think_rewrites"] = ev.generation.rewrites
        final = [b for b in blocks if b["method"] == PERSONAL]
        if final:
            result["concepts"], result["mean"] = final[-1]["concepts"], final[-1]["mean"]
            if "ci" in final[-1]:
                result["ci"] = final[-1]["ci"]
        if resamples:
            result["separation_rule"] = uncertainty.SEPARATION_RULE
        uncertainty.write_samples(tmp / uncertainty.SAMPLES_FILE, blocks, samples)
        report.write_all(result, tmp)
        plots.plot_baselines(result, tmp / "baselines.png")
        if request.run_dir:
            plots.plot_curves(result, tmp / "curves.png")
    return result
