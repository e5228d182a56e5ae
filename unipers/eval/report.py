"""Benchmark outputs: metrics.json, report.md (with intervals and separation), image grids, training curves.

    write_all(result, "eval/bo")         # metrics.json + report.md (the figures are plots.py's)

(`unipers eval --compare` is compare.py; per-sample values and intervals are uncertainty.py.)

report.md is rendered from the same dict that metrics.json holds, with every number rounded to 4 places,
so a test can check that the table says what the JSON says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from unipers.eval.prompts import METHOD_TITLES, PERSONAL
from unipers.eval.uncertainty import DOES_NOT_SEPARATE, MIN_SAMPLES, SEPARATES, TOO_FEW

# metric key -> column header, in table order; keys not listed follow in the order they appear
COLUMNS = {
    "recognition/weighted": "Rec. weighted", "recognition/pos": "Rec. pos", "recognition/neg": "Rec. neg",
    "recognition_text/weighted": "Rec. text weighted", "recognition_text/pos": "Rec. text pos",
    "recognition_text/neg": "Rec. text neg", "recognition_text/unparsed": "Rec. text unparsed",
    "vqa/sum": "VQA LL-sum", "vqa/mean": "VQA LL-mean", "vqa/generation": "VQA gen", "vqa/unparsed": "VQA unparsed",
    "qa/sum": "QA LL-sum", "qa/mean": "QA LL-mean", "qa/generation": "QA gen", "qa/unparsed": "QA unparsed",
    "vqa/judge": "VQA judge", "qa/judge": "QA judge",
    "caption/recall": "Caption recall", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO",
    "copy/share": "Copies", "clip_i/no_copies": "CLIP-I w/o copies", "clip_t/no_copies": "CLIP-T w/o copies",
    "dino/no_copies": "DINO w/o copies", "copy/clip_max": "Copy CLIP max", "copy/dino_max": "Copy DINO max",
    "copy/pixel_max": "Copy pixel max",
}

NOTES = """\
- Recognition: positives are the concept's held-out photos (test split if the manifest has one, else val),
  negatives the same split's negative images plus the other evaluated concepts' held-out photos; each
  distinct image is asked once ("Is <name> in this photo?"). *Rec.* decides by the answer's first-token
  logits (Yes > No); *Rec. text* parses the generated answer (whole-word yes/no; both or neither is
  unparsed and counted wrong). weighted = (pos + neg) / 2 (Yo'Chameleon).
- Multiple choice: *LL-sum* / *LL-mean* pick the option whose text has the highest summed / mean per-token
  log-probability as the answer; *gen* reads the option letter (or exact option text) from the generated
  answer.
- Judge (open-ended questions, a reference answer and no options): the generated answer, with the
  reference, goes to the local judge model of eval.judge_path (named under Data and Settings), whose
  verdict is whether " yes" is more likely than " no" after "Does the candidate answer agree with the
  reference answer? Answer yes or no."; the share judged right.
- Caption recall: share of "Describe this photo." captions of held-out photos that name the concept
  (its identifier token, or its name as a word).
- CLIP-I / DINO: mean cosine over all (generated image, train photo) pairs; CLIP-T: mean cosine of each
  generated image with its prompt, the concept written as its class word ("a photo of a dog"). All are
  plain cosines of L2-normalized embeddings (CLIP-T is *not* CLIPScore's 100 x cosine), images
  preprocessed by the checkpoint's own processor from 8-bit RGB.
- Copies: each generated image's highest similarity to any train photo by CLIP, DINO and pixels (normalized
  cross-correlation of 64 x 64 thumbnails; *Copy ... max* are their means); an image is a copy when one
  reaches eval.copy_thresholds. *Copies* is their share; *w/o copies* recomputes a metric without them.
- Mean rows are macro means over concepts (each concept counts once).
- Intervals: 95% percentile bootstrap over each metric's samples (images, questions, generated images);
  the weighted recognition resamples positives and negatives apart; a mean row's interval resamples
  within every concept, the concepts fixed. Per-sample values are in samples.jsonl."""


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}"


def order_metrics(keys) -> list[str]:
    """Metric keys in table order: COLUMNS' order with the named sets of recognition images after
    recognition's own columns, then the others as they come."""
    present = list(dict.fromkeys(keys))
    sets = sorted(k for k in present if k.startswith("recognition/subset/"))
    known = [k for k in COLUMNS if k in present]
    at = max((i + 1 for i, k in enumerate(known) if k.startswith("recognition/")), default=0)
    return known[:at] + sets + known[at:] + [k for k in present if k not in COLUMNS and k not in sets]


def title(key: str) -> str:
    """A metric's column header: COLUMNS', or "Rec. <set>" for a named set of recognition images."""
    if key.startswith("recognition/subset/"):
        return f"Rec. {key.rsplit('/', 1)[1]}"
    return COLUMNS.get(key, key)


def metric_columns(blocks: list[dict]) -> list[str]:
    return order_metrics(k for b in blocks for m in (*b["concepts"].values(), b["mean"])
                         for k, v in m.items() if v is not None)


def table_rows(blocks: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the Markdown table: each block's concepts, then its mean row."""
    keys = metric_columns(blocks)
    header = ["method", "checkpoint", "concept", *(title(k) for k in keys)]
    rows = []
    for b in blocks:
        method = METHOD_TITLES.get(b["method"], b["method"])
        for name, m in [*b["concepts"].items(), ("mean", b["mean"])]:
            rows.append([method, b["checkpoint"], name, *(fmt(m.get(k)) for k in keys)])
    return header, rows


def fmt_ci(interval: Optional[dict]) -> str:
    """[low, high], marked † when a stratum has fewer than MIN_SAMPLES samples (too narrow to trust)."""
    if not interval:
        return "–"
    few = " †" if interval.get("n_min", MIN_SAMPLES) < MIN_SAMPLES else ""
    return f"[{interval['ci_low']:.4f}, {interval['ci_high']:.4f}]{few}"


def ci_rows(blocks: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the intervals table: the same rows and columns as `table_rows`."""
    keys = metric_columns(blocks)
    header = ["method", "checkpoint", "concept", *(title(k) for k in keys)]
    rows = []
    for b in blocks:
        ci = b.get("ci") or {"concepts": {}, "mean": {}}
        for name, m in [*((n, ci["concepts"].get(n, {})) for n in b["concepts"]), ("mean", ci["mean"])]:
            rows.append([METHOD_TITLES.get(b["method"], b["method"]), b["checkpoint"], name,
                         *(fmt_ci(m.get(k)) for k in keys)])
    return header, rows


def separation_rows(blocks: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per baseline and concept (and mean), the metrics that do and do not separate."""
    header = ["baseline", "concept", DOES_NOT_SEPARATE, TOO_FEW, SEPARATES]
    rows = []
    for b in blocks:
        sep = b.get("separation")
        if not sep:
            continue
        for name, judged in [*sep["concepts"].items(), ("mean", sep["mean"])]:
            cells = [", ".join(title(k) for k in order_metrics(judged) if judged[k] == v) or "–"
                     for v in (DOES_NOT_SEPARATE, TOO_FEW, SEPARATES)]
            rows.append([METHOD_TITLES.get(b["method"], b["method"]), name, *cells])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    blocks = result["results"]
    personal = [b for b in blocks if b["method"] == PERSONAL]
    main = personal[-1:] + [b for b in blocks if b["method"] != PERSONAL]
    out = ["# unipers eval", ""]
    if main:
        out += [markdown_table(*table_rows(main)), ""]
    s = result["settings"]
    if any("ci" in b for b in main):
        out += ["## 95% confidence intervals", "",
                f"Percentile bootstrap, {s.get('bootstrap')} resamples, seed {s.get('bootstrap_seed')} "
                "(see [How the numbers are computed](#how-the-numbers-are-computed)). † marks an interval with "
                f"fewer than {MIN_SAMPLES} samples in a stratum or concept: too narrow to trust (1 sample gives "
                "a point).", "",
                markdown_table(*ci_rows(main)), ""]
    separation = separation_rows(main)
    if separation[1]:
        out += ["## Separation from the baselines", "", f"Rule: {result.get('separation_rule', '')}.", "",
                markdown_table(*separation), "", "![each metric against the baselines](baselines.png)", ""]
    if len(personal) > 1:
        curve = [{**b, "concepts": {}} for b in personal]
        out += ["## Over training (mean over concepts)", "", markdown_table(*table_rows(curve)), "",
                "![metrics against training step](curves.png)", ""]
    if "think_rewrites" in result:
        out += think_section(result["think_rewrites"])
    out += ["## How the numbers are computed", "", NOTES, "", "## Data", ""]
    for name, d in result["data"].items():
        counts = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("folder", "notes"))
        out.append(f"- `{name}`: {d['folder']} ({counts})" + "".join(f"; {n}" for n in d.get("notes", [])))
    out += ["", "## Concept files", ""]
    for path, rec in result["concept_files"].items():
        step = f", step {rec['step']}" if rec["step"] is not None else ""
        out.append(f"- `{path}`: sha256 {rec['sha256'][:16]}…, base {rec['base_fingerprint']}, "
                   f"concepts {', '.join(rec['concepts'])}{step}")
    out += ["", "## Settings", "", "```json", json.dumps(s, indent=2), "```", ""]
    return "\n".join(out)


def think_section(rewrites: list[dict]) -> list[str]:
    """eval.think's rewrites: how many, how many refused (drawn as written), and each distinct one."""
    refused = sum("refused" in r for r in rewrites)
    out = ["## Prompts rewritten first (eval.think)", "",
           f"Each generation prompt that names a loaded concept was drawn as the AR model rewrote it with what it "
           f"knows about the concept: {len(rewrites) - refused} rewritten, {refused} refused (a rewrite that "
           "dropped the concept; drawn as written). CLIP-T compares with the prompt as asked.", "",
           "| method | concept | prompt | drawn as |", "|---|---|---|---|"]
    seen = set()
    for r in rewrites:
        row = (r["method"], r["concept"], r["prompt"], r.get("rewrite") or "(refused: as written)")
        if row not in seen:
            seen.add(row)
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return out + [""]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def save_grid(images, per_row: int, path: Path) -> Path:
    """uint8 (N, 3, H, W) images as one PNG, `per_row` images (one prompt's seeds) per row."""
    from torchvision.utils import make_grid, save_image

    from unipers.io import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".png") as tmp:
        save_image(make_grid(images.float() / 255, nrow=max(1, per_row), padding=2), tmp, format="png")
    return path


def write_all(result: dict, out: Path) -> None:
    from unipers import __version__
    from unipers.io import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    result.setdefault("unipers_version", __version__)
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(render_markdown(result), encoding="utf-8")


def final_rows(result: dict) -> dict[tuple[str, str], dict]:
    """(method, concept) -> metrics, for the last checkpoint of the concept files and each baseline."""
    rows: dict[tuple[str, str], dict] = {}
    for b in result["results"]:  # later blocks of a method (later checkpoints) replace earlier ones
        for name, m in [*b["concepts"].items(), ("mean", b["mean"])]:
            rows[(b["method"], name)] = m
    return rows
