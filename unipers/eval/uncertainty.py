"""Per-sample values of the benchmark's metrics, their bootstrap intervals, and "does not separate".

    per_sample = {}                                        # filled by the Evaluator: metric -> entry
    record(per_sample, "caption/recall", ids, [1.0, 0.0, 1.0])
    record(per_sample, "recognition/weighted", ids, values, strata=["pos", "pos", "neg"])
    add_intervals(blocks, samples, resamples=1000, seed=0)   # block["ci"]: ci_low / ci_high per metric
    add_separation(blocks)                                  # baseline block["separation"]
    write_samples(out / "samples.jsonl", blocks, samples)

Every metric that is a mean over samples keeps its samples: an *entry* holds the sample ids, their values
and, for the weighted recognition, each sample's stratum (pos / neg); the metric is the mean over strata
of each stratum's mean (one stratum: the plain mean). Sample ids are stable across runs: an image's
content key, a question's digest, a generation prompt's digest and image index. samples.jsonl holds one
line per (method, checkpoint, concept, metric), so two runs can be paired sample by sample (compare.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from unipers.eval.prompts import PERSONAL
from unipers.eval.stats import LEVEL, bootstrap_distribution, intervals_overlap, percentile_interval, rng_for

MAX_RESAMPLES = 1_000_000
SAMPLES_FILE = "samples.jsonl"
DOES_NOT_SEPARATE, SEPARATES, TOO_FEW = "does not separate", "separates", "too few samples"
MIN_SAMPLES = 5
"""Fewest samples in every stratum (and every concept) for an interval to judge separation: a percentile
bootstrap of n samples has (n - 1) / n of their variance, so n = 1 gives a point whatever the data."""
SEPARATION_RULE = ("a baseline does not separate from the concept file on a metric when their 95% intervals "
                   "overlap (stricter than the baseline's value lying inside the concept's interval); with "
                   f"fewer than {MIN_SAMPLES} samples in a stratum (positives, negatives) or concept on either "
                   "side it is too few samples to judge, which is no separation either; unparsed rates are "
                   "diagnostics and are not judged")


def bootstrap_settings(settings, resamples: Optional[int] = None) -> tuple[int, int]:
    """(resamples, seed) of the intervals: `resamples` (--bootstrap) if given, else ``eval.bootstrap``; the
    seed is ``eval.seed``. A bad count is a ConfigError naming where it came from."""
    from unipers.config import ConfigError

    source = "--bootstrap" if resamples is not None else "eval.bootstrap"
    value = resamples if resamples is not None else settings.bootstrap
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RESAMPLES:
        raise ConfigError(f"{source} must be an integer >= 0 and <= {MAX_RESAMPLES}, not {value!r}")
    return value, int(settings.seed)


# ---- recording --------------------------------------------------------------------------------------------
def digest(*parts) -> str:
    """A short stable id of some text (a question with its options, a prompt template)."""
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:12]


def unique_ids(ids: Sequence[str]) -> list[str]:
    """`ids` with repeats made distinct in order of appearance: a, a -> a, a#2."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def record(per_sample: Optional[dict], metric: str, ids: Sequence[str], values: Sequence, *,
           strata: Optional[Sequence[str]] = None) -> None:
    """Keep one metric's per-sample values (booleans as 0 / 1) in `per_sample` (nothing when it is None)."""
    if per_sample is None or len(values) == 0:
        return
    if len(ids) != len(values) or (strata is not None and len(strata) != len(values)):
        raise ValueError(f"{metric}: {len(ids)} ids, {len(values)} values, {len(strata or values)} strata")
    entry = {"ids": list(ids), "values": [float(v) for v in values]}
    if strata is not None:
        entry["strata"] = list(strata)
    per_sample[metric] = entry


def strata_of(entry: dict) -> dict[str, list[int]]:
    """stratum -> indices of its samples, in order of first appearance (one stratum "" without strata)."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(entry.get("strata") or [""] * len(entry["values"])):
        out.setdefault(s, []).append(i)
    return out


def group_of(entry: dict) -> list[np.ndarray]:
    values = np.asarray(entry["values"], dtype=np.float64)
    return [values[idx] for idx in strata_of(entry).values()]


# ---- intervals and separation -----------------------------------------------------------------------------
def _interval(dist: np.ndarray, n: int, n_min: int) -> dict:
    """ci_low, ci_high; n samples, n_min in the smallest stratum (of any concept, for a mean row)."""
    low, high = percentile_interval(dist, LEVEL)
    return {"ci_low": low, "ci_high": high, "n": n, "n_min": n_min}


def add_intervals(blocks: list[dict], samples: list[dict], resamples: int, seed: int) -> None:
    """block["ci"] = {"concepts": {concept: {metric: {ci_low, ci_high, n, n_min}}}, "mean": {...}} for each
    block (with `samples[i]` = block i's {concept: {metric: entry}}). A concept's interval resamples its
    samples (per stratum); the mean row's resamples each concept's samples and averages, concepts fixed.
    The generator of (concept, metric) depends on the seed and those names only. `resamples` 0: nothing."""
    if resamples <= 0:
        return
    for block, per_concept in zip(blocks, samples):
        ci: dict = {"concepts": {}, "mean": {}}
        dists: dict[str, list[np.ndarray]] = {}
        for concept, entries in per_concept.items():
            for metric, entry in entries.items():
                group = group_of(entry)
                dist = bootstrap_distribution(group, resamples, rng_for(seed, f"{concept}/{metric}"))
                ci["concepts"].setdefault(concept, {})[metric] = _interval(dist, len(entry["values"]),
                                                                           min(len(s) for s in group))
                dists.setdefault(metric, []).append(dist)
        for metric, ds in dists.items():
            rows = [c[metric] for c in ci["concepts"].values() if metric in c]
            ci["mean"][metric] = _interval(np.mean(ds, axis=0), sum(r["n"] for r in rows),
                                           min(r["n_min"] for r in rows))
        block["ci"] = ci


def judged(metric: str) -> bool:
    """Quality metrics are judged; unparsed rates and copy diagnostics describe how a number came about."""
    return not (metric.endswith("/unparsed") or metric.startswith("copy/"))


def verdict(a: dict, b: dict) -> str:
    """SEPARATES, DOES_NOT_SEPARATE or TOO_FEW for two intervals (SEPARATION_RULE)."""
    if min(a.get("n_min", 0), b.get("n_min", 0)) < MIN_SAMPLES:
        return TOO_FEW
    overlap = intervals_overlap((a["ci_low"], a["ci_high"]), (b["ci_low"], b["ci_high"]))
    return DOES_NOT_SEPARATE if overlap else SEPARATES


def add_separation(blocks: list[dict]) -> None:
    """Each baseline block's ``separation``: per concept (and the mean row) and metric, "does not separate"
    when its interval overlaps the last concept-file block's, "too few samples" when either interval has
    fewer than MIN_SAMPLES in a stratum, else "separates" (SEPARATION_RULE)."""
    personal = [b for b in blocks if b["method"] == PERSONAL and "ci" in b]
    if not personal:
        return
    ours = personal[-1]["ci"]
    for block in blocks:
        if block["method"] == PERSONAL or "ci" not in block:
            continue
        sep: dict = {"against": personal[-1]["checkpoint"], "concepts": {}, "mean": {}}
        rows = [(c, v, ours["concepts"].get(c, {}), sep["concepts"].setdefault(c, {}))
                for c, v in block["ci"]["concepts"].items()]
        rows.append(("mean", block["ci"]["mean"], ours["mean"], sep["mean"]))
        for _, theirs, mine, into in rows:
            for metric, iv in theirs.items():
                if metric in mine and judged(metric):
                    into[metric] = verdict(iv, mine[metric])
        block["separation"] = sep


# ---- samples.jsonl ----------------------------------------------------------------------------------------
def write_samples(path: Path, blocks: list[dict], samples: list[dict]) -> None:
    """One JSON line per (method, checkpoint, concept, metric): its sample ids, values (and strata)."""
    from unipers.io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for block, per_concept in zip(blocks, samples):
            for concept, entries in per_concept.items():
                for metric, entry in entries.items():
                    line = {"method": block["method"], "checkpoint": block["checkpoint"], "concept": concept,
                            "metric": metric, **entry}
                    f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")


def read_samples(path: Path) -> dict[tuple[str, str], dict[str, dict[str, dict]]]:
    """samples.jsonl as {(method, checkpoint): {concept: {metric: entry}}}; ValueError naming a bad line."""
    out: dict = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                entry = {"ids": [str(i) for i in row["ids"]], "values": [float(v) for v in row["values"]]}
                if row.get("strata") is not None:
                    entry["strata"] = [str(s) for s in row["strata"]]
                if not entry["ids"] or len(entry["ids"]) != len(entry["values"]) or \
                        len(entry.get("strata", entry["ids"])) != len(entry["ids"]):
                    raise ValueError("ids, values and strata differ in length")
                key = (str(row["method"]), str(row["checkpoint"]))
                out.setdefault(key, {}).setdefault(str(row["concept"]), {})[str(row["metric"])] = entry
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a per-sample line ({err})") from None
    return out
