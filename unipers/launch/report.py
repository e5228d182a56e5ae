"""Follow and gather a Slurm run written by `unipers slurm submit`.

    unipers slurm status runs/arr      # the job and each array task: state, concepts, output, log
    unipers slurm collect runs/arr     # -> runs/arr/collect.json + collect.md: concept files, eval results,
                                       #    missing and failed tasks

States come from ``squeue`` (live and recently ended jobs) and ``sacct`` where accounting is enabled;
without either, a task's output files still tell whether it finished.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from unipers.launch.slurm import CONFIG, LOGS, OUTPUTS, SUBMIT, TASKS

FAILED = {"FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
BEST = ("best_recognition", "best_diffusion")


def _query(cmd: list[str]) -> Optional[str]:
    """stdout of a Slurm client command, or None when it is missing or fails (e.g. sacct without accounting)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _indices(job_field: str, job_id: str) -> list[str]:
    """``123`` -> ["0"]; ``123_4`` -> ["4"]; ``123_[0-2,5%2]`` -> ["0", "1", "2", "5"]."""
    if job_field == job_id:
        return ["0"]
    if not job_field.startswith(job_id + "_"):
        return []
    rest = job_field[len(job_id) + 1:].strip("[]").split("%")[0]
    out: list[str] = []
    for part in rest.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def queue_states(job_id: str) -> tuple[dict[str, str], dict[str, bool]]:
    """(task index -> state, which tools answered). squeue wins over sacct: it is the controller's view now."""
    states: dict[str, str] = {}
    sacct = _query(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"])
    for line in (sacct or "").splitlines():
        job, _, state = line.partition("|")
        for i in _indices(job.strip(), job_id):
            states[i] = state.split()[0] if state.strip() else "?"
    squeue = _query(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T|%r"])
    for line in (squeue or "").splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        for i in _indices(job.strip(), job_id):
            states[i] = state + (f" ({reason})" if reason not in ("", "None") and state == "PENDING" else "")
    return states, {"squeue": squeue is not None, "sacct": sacct is not None}


def _concept_name(folder: str) -> str:
    try:
        return json.loads((Path(folder) / "concept.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        return Path(folder).name


def load_run(run: str | Path) -> tuple[Path, dict, dict[str, list[str]]]:
    """(run folder, submit.json, task index -> concept folders); a single job is task "0"."""
    run = Path(run)
    if not (run / SUBMIT).is_file():
        raise FileNotFoundError(f"{run} has no {SUBMIT}: not a run folder written by `unipers slurm submit`")
    info = json.loads((run / SUBMIT).read_text())
    tasks = json.loads((run / TASKS).read_text()) if (run / TASKS).is_file() else {}
    if not tasks:
        from omegaconf import OmegaConf

        tasks = {"0": list(OmegaConf.load(run / CONFIG).data.concepts)}
    return run, info, tasks


def status(run: str | Path) -> dict:
    """The run's tasks with their state, concepts, output file (or None) and log file."""
    run, info, tasks = load_run(run)
    job_id, stage, array = str(info["job_id"]), info["stage"], info["array"]
    states, tools = queue_states(job_id)
    rows = []
    for index, folders in sorted(tasks.items(), key=lambda kv: int(kv[0])):
        out_dir = run / "tasks" / index if array else run
        output = out_dir / OUTPUTS[stage]
        logs = sorted((run / LOGS).glob(f"*-{job_id}_{index}.out" if array else f"*-{job_id}.out"))
        rows.append({"index": index, "dir": str(out_dir), "concept_dirs": folders,
                     "concepts": [_concept_name(f) for f in folders], "state": states.get(index),
                     "output": str(output) if output.is_file() else None,
                     "log": str(logs[0]) if logs else None})
    return {"run": str(run), "job_id": job_id, "stage": stage, "array": array, "tools": tools, "tasks": rows}


def _rel(path: Optional[str], run: Path) -> str:
    if not path:
        return "-"
    p = Path(path)
    return str(p.relative_to(run)) if p.is_relative_to(run) else str(p)


def format_status(report: dict) -> str:
    run = Path(report["run"])
    kind = f"{len(report['tasks'])} array tasks" if report["array"] else "single job"
    lines = [f"run {run}  job {report['job_id']}  stage {report['stage']}  {kind}",
             f"{'TASK':<5} {'STATE':<24} {'CONCEPTS':<24} {'OUTPUT':<40} LOG"]
    for r in report["tasks"]:
        state = r["state"] or ("finished" if r["output"] else "?")
        lines.append(f"{r['index']:<5} {state:<24} {','.join(r['concepts']) or '-':<24} "
                     f"{_rel(r['output'], run):<40} {_rel(r['log'], run)}")
    if not report["tools"]["sacct"]:
        lines.append("(sacct unavailable: ended jobs leave squeue after a few minutes; '?' = no output file yet)")
    return "\n".join(lines)


def _evals(task_dir: Path) -> dict[str, object]:
    out = {}
    for path in sorted((task_dir / "eval").glob("*.json")):
        try:
            out[path.name] = json.loads(path.read_text())
        except ValueError as err:
            out[path.name] = {"error": f"unreadable: {err}"}
    return out


def collect(run: str | Path) -> dict:
    """Gather every task's concept file (``last``, else a ``best_*`` marked partial) and eval JSON into
    ``RUN/collect.json`` and ``RUN/collect.md``; list the tasks with no final file, and those that failed."""
    report = status(run)
    run = Path(report["run"])
    tasks, missing, failed = [], [], []
    for r in report["tasks"]:
        task_dir = Path(r["dir"])
        entry = {"index": r["index"], "concepts": r["concepts"], "state": r["state"], "output": r["output"],
                 "partial": None, "eval": _evals(task_dir), "log": r["log"]}
        if r["output"] is None:
            missing.append(r["index"])
            best = [task_dir / "concepts" / f"{b}.safetensors" for b in BEST]
            entry["partial"] = next((str(p) for p in best if p.is_file()), None)
            if (r["state"] or "").split(" ")[0] in FAILED:
                failed.append(r["index"])
        tasks.append(entry)
    result = {"run": str(run), "job_id": report["job_id"], "stage": report["stage"], "tasks": tasks,
              "outputs": [t["output"] for t in tasks if t["output"]], "missing": missing, "failed": failed}
    (run / "collect.json").write_text(json.dumps(result, indent=2) + "\n")
    (run / "collect.md").write_text(format_collect(result))
    return result


def _numbers(data, prefix: str = "") -> dict[str, float]:
    if isinstance(data, bool):
        return {}
    if isinstance(data, (int, float)):
        return {prefix: data}
    if isinstance(data, dict):
        return {k: v for key, value in data.items()
                for k, v in _numbers(value, f"{prefix}.{key}" if prefix else key).items()}
    return {}


def _metrics(evals: dict) -> str:
    """A short `file: key=value` summary of the first numbers (nested keys dotted) of each eval JSON."""
    parts = []
    for name, data in evals.items():
        nums = list(_numbers(data).items())[:6]
        parts.append(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in nums))
    return "; ".join(parts) or "-"


def format_collect(result: dict) -> str:
    run = Path(result["run"])
    lines = [f"# {run.name}: job {result['job_id']} ({result['stage']})", "",
             f"{len(result['outputs'])} of {len(result['tasks'])} tasks finished; "
             f"missing: {', '.join(result['missing']) or 'none'}; failed: {', '.join(result['failed']) or 'none'}", "",
             "| task | concepts | state | file | eval |", "|---|---|---|---|---|"]
    for t in result["tasks"]:
        file = (_rel(t["output"], run) if t["output"]
                else f"partial: {_rel(t['partial'], run)}" if t["partial"] else "-")
        lines.append(f"| {t['index']} | {', '.join(t['concepts'])} | {t['state'] or '-'} | {file} "
                     f"| {_metrics(t['eval'])} |")
    return "\n".join(lines) + "\n"
