"""The report's figures: each metric against the baselines (baselines.png), and over training (curves.png).

    plot_baselines(result, "eval/bo/baselines.png")   # one panel per metric: every method, with its interval
    plot_curves(result, "eval/bo/curves.png")         # --run: the mean metrics against the training step
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from unipers.eval.prompts import METHOD_TITLES, PERSONAL
from unipers.eval.report import metric_columns, title
from unipers.eval.uncertainty import judged


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from unipers.io import atomic_file

    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    return path


def plot_baselines(result: dict, path: Path) -> Optional[Path]:
    """Per judged metric, the mean row of the concept files (last checkpoint) and of every baseline, with
    95% intervals where they were computed; nothing when there is no baseline to compare with."""
    blocks = result["results"]
    personal = [b for b in blocks if b["method"] == PERSONAL]
    shown = personal[-1:] + [b for b in blocks if b["method"] != PERSONAL]
    if len(shown) < 2 or not personal:
        return None
    keys = [k for k in metric_columns(shown) if judged(k) and personal[-1]["mean"].get(k) is not None]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.35 * len(shown) * rows + 1.2 * rows), squeeze=False)
    names = [METHOD_TITLES.get(b["method"], b["method"]) for b in shown]
    for i, (ax, k) in enumerate(zip(axes.flat, keys)):
        values, low, high = [], [], []
        for b in shown:
            v = b["mean"].get(k)
            ci = b.get("ci", {}).get("mean", {}).get(k)
            values.append(float("nan") if v is None else v)
            low.append(0.0 if v is None or not ci else v - ci["ci_low"])
            high.append(0.0 if v is None or not ci else ci["ci_high"] - v)
        y = list(range(len(shown)))
        ax.barh(y, values, xerr=[low, high], color=["tab:orange"] + ["tab:blue"] * (len(shown) - 1), capsize=3)
        ax.set_yticks(y, names if i % cols == 0 else [""] * len(y), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title(k), fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, path)


def plot_curves(result: dict, path: Path) -> Optional[Path]:
    """The mean metrics of each checkpoint against its training step, one panel per metric family."""
    plt = _pyplot()
    blocks = [b for b in result["results"] if b["method"] == PERSONAL]
    if not blocks:
        return None
    steps = [b["step"] if b["step"] is not None else i for i, b in enumerate(blocks)]
    keys = metric_columns(blocks)
    families: dict[str, list[str]] = {}
    for k in keys:
        families.setdefault(k.split("/")[0] if "/" in k else "generation", []).append(k)
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(4 * max(1, len(families)), 3.2), squeeze=False)
    for ax, (family, ks) in zip(axes[0], families.items()):
        for k in ks:
            ax.plot(steps, [b["mean"].get(k) if b["mean"].get(k) is not None else float("nan") for b in blocks],
                    marker="o", label=title(k))
        ax.set_title(family)
        if family != "generation":  # accuracies and rates; cosines may be negative
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, path)
