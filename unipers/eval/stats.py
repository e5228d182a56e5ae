"""Uncertainty of the benchmark's means: percentile bootstrap intervals and a paired sign-flip test.

    bootstrap_ci([1, 0, 1, 1, 0], resamples=1000, seed=0)        # (low, high): 95% CI of the mean
    stratified_ci([[pos, neg]], ...)                             # (mean(pos) + mean(neg)) / 2, strata resampled apart
    paired_test(a, b, resamples=1000, seed=0)                    # {"diff", "ci_low", "ci_high", "p_value", "n"}

A *group* is one concept's samples as a list of strata (one stratum for a plain mean; positives and
negatives for the weighted recognition); its statistic is the mean over strata of each stratum's mean, and
the statistic of several groups is their mean (the benchmark's macro mean over concepts). The bootstrap
resamples every stratum on its own, with replacement and at its own size, so each stratum keeps its
weight. Numpy only; every result is a function of the values, the seed and the key (a metric's name),
so one metric's interval does not change when others are computed before it.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
_CHUNK = 1 << 21  # resampled values held at once (memory bound for large strata)

Group = Sequence[Sequence[float]]
"""One concept's samples: a list of strata, each a list of per-sample values."""


def rng_for(seed: int, key: str = "", stream: int = 0) -> np.random.Generator:
    """The generator of one statistic: a function of the seed and the key only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), stream]))


def _arrays(group: Group) -> list[np.ndarray]:
    strata = [np.asarray(s, dtype=np.float64) for s in group]
    if not strata or any(s.ndim != 1 or s.size == 0 for s in strata):
        raise ValueError("every stratum needs at least one value")
    return strata


def point(groups: Sequence[Group]) -> float:
    """The statistic itself: mean over groups of the mean over strata of the stratum means."""
    return float(np.mean([np.mean([s.mean() for s in _arrays(g)]) for g in groups]))


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples,) means of `values` resampled with replacement at their own size."""
    n = values.size
    rows = max(1, _CHUNK // n)
    out = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def bootstrap_distribution(group: Group, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples,) statistics of one group, each stratum resampled on its own."""
    strata = _arrays(group)
    return np.mean([_resampled_means(s, resamples, rng) for s in strata], axis=0)


def percentile_interval(distribution: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval: the (1 - level) / 2 and (1 + level) / 2 quantiles of the distribution."""
    low, high = np.quantile(distribution, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def stratified_ci(groups: Sequence[Group], resamples: int = 1000, seed: int = 0, level: float = LEVEL,
                  key: str = "") -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of the statistic of `groups` (None when `resamples` is 0). The groups
    are fixed (every concept counts once); the samples within each stratum are resampled."""
    if resamples <= 0:
        return None
    if not groups:
        raise ValueError("no groups")
    rng = rng_for(seed, key)
    dist = np.mean([bootstrap_distribution(g, resamples, rng) for g in groups], axis=0)
    return percentile_interval(dist, level)


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = LEVEL,
                 key: str = "") -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of the mean of `values` (None when `resamples` is 0)."""
    return stratified_ci([[values]], resamples, seed, level, key)


# ---- paired comparison ------------------------------------------------------------------------------------
PairedGroup = Sequence[tuple[Sequence[float], Sequence[float]]]
"""One concept's paired samples: per stratum, (values of A, values of B) in the same sample order."""


def _differences(groups: Sequence[PairedGroup]) -> list[list[np.ndarray]]:
    out = []
    for group in groups:
        strata = []
        for a, b in group:
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            if a.shape != b.shape or a.ndim != 1 or a.size == 0:
                raise ValueError(f"paired strata need equal, non-zero lengths; got {a.shape} and {b.shape}")
            strata.append(b - a)
        if not strata:
            raise ValueError("a paired group without strata")
        out.append(strata)
    return out


def _sign_flip_stats(diffs: list[list[np.ndarray]], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples,) statistics with each pair's difference multiplied by a random sign."""
    total = np.zeros(resamples)
    for group in diffs:
        part = np.zeros(resamples)
        for d in group:
            rows = max(1, _CHUNK // d.size)
            for start in range(0, resamples, rows):
                stop = min(resamples, start + rows)
                signs = rng.integers(0, 2, size=(stop - start, d.size)) * 2 - 1
                part[start:stop] += (signs * d).mean(axis=1)
        total += part / len(group)
    return total / len(diffs)


def paired_groups_test(groups: Sequence[PairedGroup], resamples: int = 1000, seed: int = 0, level: float = LEVEL,
                       key: str = "") -> dict:
    """B - A on paired samples: the difference of the statistics, its paired percentile bootstrap interval
    (the same resampled pairs for both sides) and a two-sided sign-flip permutation p-value.

    Under the null hypothesis that A and B are exchangeable within each pair, each pair's difference is
    as likely negated; p = (1 + #{|T*| >= |T|}) / (1 + resamples), T the observed difference and T* those
    with random signs, so p is never 0 and identical runs give p = 1. `resamples` 0: only the difference."""
    diffs = _differences(groups)
    observed = float(np.mean([np.mean([d.mean() for d in g]) for g in diffs]))
    n = sum(d.size for g in diffs for d in g)
    out = {"diff": observed, "ci_low": None, "ci_high": None, "p_value": None, "n": n}
    if resamples <= 0:
        return out
    boot = np.mean([bootstrap_distribution(g, resamples, rng_for(seed, key, 1)) for g in diffs], axis=0)
    out["ci_low"], out["ci_high"] = percentile_interval(boot, level)
    flipped = _sign_flip_stats(diffs, resamples, rng_for(seed, key, 2))
    tol = 1e-12 * max(1.0, abs(observed))
    out["p_value"] = float((1 + np.count_nonzero(np.abs(flipped) >= abs(observed) - tol)) / (1 + resamples))
    return out


def paired_test(a: Sequence[float], b: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = LEVEL,
                key: str = "") -> dict:
    """`paired_groups_test` of one plain mean: a[i] and b[i] are the same sample's values in A and B."""
    return paired_groups_test([[(a, b)]], resamples, seed, level, key)


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Do the closed intervals (low, high) a and b share a point?"""
    return a[0] <= b[1] and b[0] <= a[1]
