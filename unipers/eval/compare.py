"""`unipers eval --compare A B [--out DIR]`: two eval outputs, paired sample by sample.

    result = compare_outputs("eval/a", "eval/b", resamples=1000, seed=0)
    print(text_table(result))                     # what the command prints
    write_compare(result, "eval/a_vs_b")          # compare.json + compare.md, written whole

For each method both outputs scored (its last checkpoint), each concept and metric, the samples present in
both (same stratum and sample id in samples.jsonl) are paired. B - A on them comes with a paired percentile
bootstrap interval (pairs resampled, per stratum) and a two-sided sign-flip permutation p-value
(stats.paired_groups_test); the mean row pairs every concept's samples, concepts fixed, as eval's macro
mean. A folder that is not an eval output, or two that share no samples, is refused, naming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from unipers.errors import UnipersError
from unipers.eval.prompts import METHOD_TITLES
from unipers.eval.report import final_rows, fmt, markdown_table, order_metrics, title
from unipers.eval.stats import LEVEL, paired_groups_test, point
from unipers.eval.uncertainty import SAMPLES_FILE, read_samples, strata_of

COMPARE_KIND = "eval-compare"
INTERVAL = "paired percentile bootstrap (pairs resampled within each stratum, concepts fixed)"
TEST = ("two-sided sign-flip permutation test: each pair's difference negated at random; "
        "p = (1 + #{|T*| >= |T|}) / (1 + resamples)")


class CompareError(UnipersError, ValueError):
    """An input of --compare that is not an eval output, or two that share no samples."""


def read_output(folder: str | Path) -> tuple[dict, dict]:
    """(metrics.json, samples.jsonl by (method, checkpoint)) of an eval output; CompareError naming it if
    it is not one (no marker of kind eval, no metrics.json) or predates per-sample values."""
    from unipers.io import MARKER

    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder}: no such folder (give two `unipers eval` output folders)")
    try:
        kind = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "eval" or not (folder / "metrics.json").is_file():
        raise CompareError(f"{folder}: not a `unipers eval` output folder (needs metrics.json and the {MARKER} "
                           "marker of an eval)")
    if not (folder / SAMPLES_FILE).is_file():
        raise CompareError(f"{folder}: no {SAMPLES_FILE} (per-sample values): written by an older unipers eval; "
                           "evaluate again to compare")
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        metrics["results"]  # noqa: B018  (an eval's metrics.json has its blocks)
        return metrics, read_samples(folder / SAMPLES_FILE)
    except (ValueError, KeyError, TypeError) as err:
        raise CompareError(f"{folder}: unreadable eval output ({err})") from None


def _final_samples(metrics: dict, samples: dict) -> dict[str, dict]:
    """method -> {concept: {metric: entry}} of each method's last checkpoint (as final_rows)."""
    last = {b["method"]: b["checkpoint"] for b in metrics["results"]}
    return {m: samples.get((m, ck), {}) for m, ck in last.items()}


def _keyed(entry: dict) -> dict[tuple[str, str], float]:
    strata = entry.get("strata") or [""] * len(entry["ids"])
    return {(s, i): v for s, i, v in zip(strata, entry["ids"], entry["values"])}


def pair(entry_a: Optional[dict], entry_b: Optional[dict]) -> Optional[list[tuple[list, list]]]:
    """Per stratum (A's order), the values of the samples in both entries, in sample-id order; None when
    some stratum has no pair (a weighted recognition needs both positives and negatives)."""
    if not entry_a or not entry_b:
        return None
    ka, kb = _keyed(entry_a), _keyed(entry_b)
    strata = list(strata_of(entry_a))
    if set(strata) != set(strata_of(entry_b)):
        return None
    group = []
    for s in strata:
        shared = sorted(k for k in ka if k[0] == s and k in kb)
        if not shared:
            return None
        group.append(([ka[k] for k in shared], [kb[k] for k in shared]))
    return group


def _row(method: str, concept: str, metric: str, a, b, groups: list, resamples: int, seed: int) -> dict:
    row = {"method": method, "concept": concept, "metric": metric, "a": a, "b": b, "pairs": 0,
           "a_paired": None, "b_paired": None, "diff": None, "ci_low": None, "ci_high": None, "p_value": None}
    if groups:
        test = paired_groups_test(groups, resamples, seed, LEVEL, key=f"{method}/{concept}/{metric}")
        row.update(pairs=test["n"], a_paired=point([[x for x, _ in g] for g in groups]),
                   b_paired=point([[y for _, y in g] for g in groups]),
                   **{k: test[k] for k in ("diff", "ci_low", "ci_high", "p_value")})
    return row


def compare_outputs(dir_a: str | Path, dir_b: str | Path, resamples: int = 1000, seed: int = 0,
                    loaded: Optional[tuple] = None) -> dict:
    """Both outputs' final rows with paired B - A statistics per (method, concept or mean, metric);
    `loaded`: both `read_output`s, when already read."""
    (ma, sa), (mb, sb) = loaded or (read_output(dir_a), read_output(dir_b))
    fa, fb = _final_samples(ma, sa), _final_samples(mb, sb)
    ra, rb = final_rows(ma), final_rows(mb)
    rows = []
    for method in dict.fromkeys(m for m, _ in [*ra, *rb]):
        concepts = [c for c in dict.fromkeys(c for m, c in [*ra, *rb] if m == method) if c != "mean"]
        mean_groups: dict[str, list] = {}
        for concept in concepts:
            va, vb = ra.get((method, concept), {}), rb.get((method, concept), {})
            for metric in order_metrics([*va, *vb]):
                group = pair(fa.get(method, {}).get(concept, {}).get(metric),
                             fb.get(method, {}).get(concept, {}).get(metric))
                if group:
                    mean_groups.setdefault(metric, []).append(group)
                rows.append(_row(method, concept, metric, va.get(metric), vb.get(metric), [group] if group else [],
                                 resamples, seed))
        va, vb = ra.get((method, "mean"), {}), rb.get((method, "mean"), {})
        for metric in order_metrics([*va, *vb]):
            rows.append(_row(method, "mean", metric, va.get(metric), vb.get(metric), mean_groups.get(metric, []),
                             resamples, seed))
    if not any(r["pairs"] for r in rows if r["concept"] != "mean"):
        raise CompareError(f"{dir_a} and {dir_b} share no samples (no method, concept, metric and sample id "
                           "in both): nothing to pair")
    from unipers import __version__

    return {"a": str(dir_a), "b": str(dir_b),
            "settings": {"resamples": resamples, "seed": seed, "level": LEVEL, "interval": INTERVAL, "test": TEST,
                         "pairing": "each method's last checkpoint; samples with the same concept, metric, "
                                    "stratum and sample id"},
            "rows": rows, "unipers_version": __version__}


def _cells(r: dict) -> list[str]:
    delta = f"{r['b'] - r['a']:+.4f}" if r["a"] is not None and r["b"] is not None else "–"
    paired = f"{r['diff']:+.4f}" if r["diff"] is not None else "–"
    ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]" if r["ci_low"] is not None else "–"
    p = f"{r['p_value']:.4f}" if r["p_value"] is not None else "–"
    return [fmt(r["a"]), fmt(r["b"]), delta, paired, ci, p, str(r["pairs"])]


def text_table(result: dict) -> str:
    """The rows as aligned text: A, B, B - A as reported, then the paired difference, its CI, p and pairs."""
    header = ["method", "concept", "metric", f"A ({Path(result['a']).name})", f"B ({Path(result['b']).name})",
              "B - A", "paired B - A", "95% CI", "p", "pairs"]
    rows = [[METHOD_TITLES.get(r["method"], r["method"]), r["concept"], title(r["metric"]),
             *_cells(r)] for r in result["rows"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def render_markdown(result: dict) -> str:
    s = result["settings"]
    out = ["# unipers eval --compare", "", f"- A: `{result['a']}`", f"- B: `{result['b']}`",
           f"- pairing: {s['pairing']}",
           f"- interval: 95% {s['interval']}, {s['resamples']} resamples, seed {s['seed']}",
           f"- p: {s['test']}", "",
           "*A*, *B* and *B - A* are the reported values (all samples); *paired B - A*, its interval and *p* "
           "use the samples in both. Mean rows are macro means over concepts.", ""]
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [[r["concept"], title(r["metric"]), *_cells(r)]
                for r in result["rows"] if r["method"] == method]
        out += [f"## {METHOD_TITLES.get(method, method)}", "",
                markdown_table(["concept", "metric", "A", "B", "B - A", "paired B - A", "95% CI", "p", "pairs"],
                               rows), ""]
    return "\n".join(out)


def write_compare(result: dict, out: str | Path, overwrite: bool = False) -> Path:
    """compare.json and compare.md in a new folder `out` (eval's output rules: written whole, replacing
    only an earlier unipers output with `overwrite`, never an input)."""
    from unipers.io import atomic_directory

    with atomic_directory(out, overwrite=overwrite, kind=COMPARE_KIND, inputs=[result["a"], result["b"]]) as tmp:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "compare.md").write_text(render_markdown(result), encoding="utf-8")
    return Path(out)


def run_compare(dir_a: str | Path, dir_b: str | Path, out: Optional[str | Path] = None, *, overwrite: bool = False,
                resamples: int = 1000, seed: int = 0) -> dict:
    """Check `out` may be written, compare, and write it (when given)."""
    from unipers.io import check_output

    loaded = (read_output(dir_a), read_output(dir_b))  # a wrong input is named before anything else
    if out is not None:
        check_output(out, overwrite=overwrite, inputs=[dir_a, dir_b])
    result = compare_outputs(dir_a, dir_b, resamples, seed, loaded)
    if out is not None:
        write_compare(result, out, overwrite)
    return result
