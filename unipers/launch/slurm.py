"""Slurm jobs from a config: validate, write the run folder, render the sbatch file, submit.

    unipers slurm submit configs/personalize.yaml configs/slurm/cluster.yaml --concepts data/bo,data/mam
    unipers slurm submit configs/personalize.yaml trainer.devices=8 run_dir=runs/big --dry-run

The run folder (``run_dir``) holds ``slurm.sbatch``, ``config.yaml`` (resolved, every path absolute),
``code/`` (a copy of the ``unipers`` package and ``configs/``: the job runs with ``PYTHONPATH=RUN/code``,
so editing the checkout cannot change a queued job), ``tasks.json``, ``submit.json`` (the job id) and
``logs/`` (Slurm's output, appended to across requeues). A concept array trains array task i in
``RUN/tasks/<i>/``; a single job trains in ``RUN`` itself. Status and collect live in ``report.py``.

Requeue: ``--signal=USR1@90`` (no ``B:``) reaches the training tasks, which save ``last.ckpt`` at the end
of the step and requeue the job (``SlurmRequeue``); every start passes ``ckpt_path=last``.

Every value written into the script is shell-quoted or checked against a strict pattern (``checks.py``).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from unipers.config import ConfigError, load_config, to_yaml
from unipers.launch import checks

SBATCH, CONFIG, TASKS, SUBMIT, CODE, LOGS = "slurm.sbatch", "config.yaml", "tasks.json", "submit.json", "code", "logs"
OUTPUTS = {"personalize": "concepts/last.safetensors", "align": "connector.safetensors"}


@dataclass
class SlurmJob:
    """Everything `submit` writes and queues, computed without touching the disk or the queue."""

    cfg: Any
    run_dir: Path
    tasks: list[list[str]] = field(default_factory=list)
    """Concept folders of each array task; empty for a single (non-array) job."""
    script: str = ""
    """The sbatch file."""


def read_concepts(value: str) -> list[str]:
    """``--concepts``: a comma-separated list, or a file listing one folder per line (# comments)."""
    path = Path(value)
    if path.is_file():
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        items = [line for line in lines if line]
    else:
        items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--concepts {value!r} names no concept folder")
    return items


def split_tasks(concepts: Sequence[str], per_task: int) -> list[list[str]]:
    """Consecutive groups of `per_task` concepts, one per array task (the last may be shorter)."""
    if per_task < 1:
        raise ConfigError(f"slurm.concepts_per_task must be >= 1, got {per_task}")
    return [list(concepts[i:i + per_task]) for i in range(0, len(concepts), per_task)]


def mem_per_cpu(mem_per_task: str, cpus: int) -> str:
    """``64G`` per task with 8 CPUs -> ``8192M`` (what ``--mem-per-cpu`` takes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", mem_per_task.strip(), re.IGNORECASE)
    if not m:
        raise ConfigError(f"slurm.mem_per_task={mem_per_task!r} is not a size like 64G or 500M")
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2, "": 1}[m.group(2).upper()]
    return f"{math.ceil(float(m.group(1)) * scale / cpus)}M"


def _absolute(path: Optional[str]) -> Optional[str]:
    return None if path in (None, "tiny") else str(Path(path).expanduser().resolve())


def _check_inputs(cfg) -> None:
    """What would fail in the job (Slurm values, ckpt_path, every path it reads) fails now, naming the key."""
    s = cfg.slurm
    checks.check_run_dir(cfg.run_dir)
    checks.check_time(s.time)
    checks.check_names(s)
    checks.extra_directives(s)
    for key in ("cpus_per_task", "max_parallel", "gpus_per_node", "concepts_per_task"):
        value = getattr(s, key)
        if value is not None and value < (0 if key == "gpus_per_node" else 1):
            raise ConfigError(f"slurm.{key} must be >= {0 if key == 'gpus_per_node' else 1}, got {value}")
    for key in ("devices", "num_nodes"):
        if getattr(cfg.trainer, key) < 1:
            raise ConfigError(f"trainer.{key} must be >= 1 on Slurm (one srun task per device), "
                              f"got {getattr(cfg.trainer, key)}")
    if s.mem_per_task:
        mem_per_cpu(s.mem_per_task, s.cpus_per_task)
    if cfg.ckpt_path not in (None, "last"):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: a Slurm run resumes only its own folder (ckpt_path=last)")
    if cfg.stage == "personalize":
        if not cfg.data.concepts:
            raise ConfigError("data.concepts is empty: give --concepts or data.concepts=[data/bo,...]")
        for folder in cfg.data.concepts:
            if not (Path(folder) / "manifest.jsonl").is_file():
                raise ConfigError(f"data.concepts: {folder} is not a prepared concept folder (no manifest.jsonl)")
    else:
        pairs = cfg.data.pairs
        if not pairs:
            raise ConfigError("data.pairs is empty: give a folder with captions.jsonl, or tar shards")
        if not Path(pairs).is_dir():
            from unipers.data.pairs import expand_shards  # the loader's own expansion (globs, {000..127})

            try:
                expand_shards(pairs)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"data.pairs={pairs!r}: no such folder, and {err}") from err
    for key in ("backbone", "decoder"):
        path = getattr(cfg, key).path
        if path != "tiny" and not Path(path).is_dir():
            raise ConfigError(f"{key}.path: no such folder {path}")
    for key, path in (("connector.path", cfg.connector.path), ("eval.clip_path", cfg.eval.clip_path),
                      ("eval.dino_path", cfg.eval.dino_path)):
        if path and not Path(path).exists():
            raise ConfigError(f"{key}: no such file or folder {path}")


def plan(files: Sequence[str | Path], overrides: Sequence[str] = (), concepts: Optional[Sequence[str]] = None,
         evaluate: bool = False, generation: bool = True) -> SlurmJob:
    """Load and check the config, make its paths absolute, split the concepts, render the sbatch file and
    check that bash parses it. `generation=False`: ``--eval`` without the generation metrics."""
    cfg = load_config(list(files), list(overrides))
    if concepts is not None and cfg.stage != "personalize":
        raise ConfigError(f"--concepts makes a personalize array; stage={cfg.stage} takes data.pairs")
    if evaluate and cfg.stage != "personalize":
        raise ConfigError(f"--eval evaluates concept files; stage={cfg.stage} writes none")
    if not generation and not evaluate:
        raise ConfigError("--no-generation applies to --eval: add --eval, or drop --no-generation")
    if concepts is not None:
        cfg.data.concepts = list(concepts)
    cfg.run_dir = _absolute(cfg.run_dir)
    cfg.data.concepts = [_absolute(c) for c in cfg.data.concepts]
    if cfg.data.pairs:
        cfg.data.pairs = _absolute(cfg.data.pairs)
    for section in (cfg.backbone, cfg.decoder):
        section.path = _absolute(section.path) or "tiny"
    cfg.connector.path = _absolute(cfg.connector.path)
    cfg.eval.clip_path, cfg.eval.dino_path = _absolute(cfg.eval.clip_path), _absolute(cfg.eval.dino_path)
    _check_inputs(cfg)
    if evaluate:
        checks.check_eval(cfg, generation)
    tasks = split_tasks(cfg.data.concepts, cfg.slurm.concepts_per_task) if concepts is not None else []
    job = SlurmJob(cfg=cfg, run_dir=Path(cfg.run_dir), tasks=tasks)
    job.script = render(job, evaluate=evaluate, generation=generation)
    checks.check_parses(job.script, str(job.run_dir / SBATCH))
    return job


def directives(cfg, run_dir: Path, n_tasks: int) -> list[str]:
    """The ``#SBATCH`` options, in the order a reader looks for them, each one sbatch argument (quoted where
    it must be; the values were checked by `checks`)."""
    s, t = cfg.slurm, cfg.trainer
    # accelerator=auto asks for GPUs too: on a CPU partition sbatch refuses loudly, instead of a silent CPU run.
    gpus = s.gpus_per_node if s.gpus_per_node is not None else (0 if t.accelerator == "cpu" else t.devices)
    array = n_tasks > 0
    name = re.sub(r"[^\w.-]", "_", f"{cfg.stage}-{run_dir.name}")[:48]
    out = [f"--job-name={name}", f"--nodes={t.num_nodes}",
           f"--ntasks-per-node={t.devices}", f"--cpus-per-task={s.cpus_per_task}"]
    if gpus:
        out.append(f"--gpus-per-node={gpus}")
    if s.mem_per_task:
        out.append(f"--mem-per-cpu={mem_per_cpu(s.mem_per_task, s.cpus_per_task)}")
    out.append(f"--time={s.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            out.append(f"--{key}={getattr(s, key)}")
    log = checks.output_pattern(run_dir / LOGS, f"%x-{'%A_%a' if array else '%j'}.out")
    out += [checks.sbatch_word(f"--output={log}"), "--open-mode=append", "--export=ALL"]
    # USR1 without B: goes to the training tasks, not the batch shell (docs/slurm.md).
    out += ["--signal=USR1@90", "--requeue"] if s.requeue else ["--no-requeue"]
    if array:
        out.append(f"--array=0-{n_tasks - 1}" + (f"%{s.max_parallel}" if s.max_parallel else ""))
    out += checks.extra_directives(s)
    return out


def _concepts_override(folders: Sequence[str]) -> str:
    return "data.concepts=[" + ",".join(json.dumps(f) for f in folders) + "]"


def render(job: SlurmJob, evaluate: bool = False, generation: bool = True) -> str:
    """The sbatch file: directives, setup lines, then one ``srun`` task per device running ``unipers train``."""
    from unipers import __version__

    cfg, run = job.cfg, job.run_dir
    q = shlex.quote
    lines = ["#!/bin/bash", f"# unipers {__version__}: unipers slurm submit ({cfg.stage}), run folder {q(str(run))}"]
    lines += [f"#SBATCH {d}" for d in directives(cfg, run, len(job.tasks))]
    lines += ["", "set -eo pipefail"]
    if cfg.slurm.setup:
        lines += ["# set-up (slurm.setup)", *cfg.slurm.setup]
    lines += ["", f"RUN={q(str(run))}", 'export PYTHONPATH="$RUN/code${PYTHONPATH:+:$PYTHONPATH}"',
              'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"']
    train = ['python -m unipers.cli train "$RUN/config.yaml" ckpt_path=last']
    if job.tasks:
        lines += ['TASK="${SLURM_ARRAY_TASK_ID:?this file runs as a job array}"', 'case "$TASK" in']
        for i, folders in enumerate(job.tasks):
            data = " ".join(q(f) for f in folders)
            lines.append(f"  {i}) CONCEPTS={q(_concepts_override(folders))}; DATA=({data}) ;;")
        lines += ['  *) echo "no concepts for array task $TASK" >&2; exit 1 ;;', "esac", 'OUT="$RUN/tasks/$TASK"']
        train.append('run_dir="$OUT" "$CONCEPTS"')
    else:
        lines += ['OUT="$RUN"', f"DATA=({' '.join(q(f) for f in cfg.data.concepts)})"]
    lines += ['cd "$RUN"  # not the submit folder: python -m would import the checkout from there',
              'echo "unipers from $(python -c \'import unipers; print(unipers.__file__)\')," \\',
              '     "job ${SLURM_JOB_ID} on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"',
              'srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" ' + " ".join(train)]
    if evaluate:
        lines += ['if [ -f "$OUT/concepts/last.safetensors" ]; then',
                  '  srun --nodes=1 --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" python -m unipers.cli eval \\',
                  '    --concept "$OUT/concepts/last.safetensors" --data "${DATA[@]}" --out "$OUT/eval" --overwrite \\',
                  '    --config "$RUN/config.yaml"' + ("" if generation else " --no-generation"), "fi"]
    return "\n".join(lines) + "\n"


def snapshot_code(dest: Path) -> list[str]:
    """Copy the imported ``unipers`` package (and the checkout's ``configs/``, when there is one) into `dest`.
    The demo world (``unipers/world``) stays out: no job imports it."""
    package = Path(__file__).resolve().parents[1]
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(skip(folder, names)) | ({"world"} if Path(folder) == package else set())

    shutil.copytree(package, dest / "unipers", ignore=ignore)
    copied = ["unipers"]
    configs = package.parent / "configs"
    if configs.is_dir():
        shutil.copytree(configs, dest / "configs", ignore=skip)
        copied.append("configs")
    return copied


def _claim(run: Path) -> list[Path]:
    """Make the run folder, refusing a used one (a stale checkpoint would be resumed by the new job); the
    folders this call created, outermost first: the only ones a failed submit may remove again."""
    if run.exists() or run.is_symlink():
        if not run.is_dir():
            raise FileExistsError(f"run_dir {run} is not a folder")
        if any(run.iterdir()):
            raise FileExistsError(f"run_dir {run} is not empty: one fresh folder per Slurm run")
        return []
    missing, folder = [], run
    while not (folder.exists() or folder.is_symlink()):
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if folder == run:
                    raise FileExistsError(f"run_dir {run} appeared while submitting: one fresh folder per "
                                          "Slurm run") from None
                continue  # a parent made meanwhile by someone else: not ours to remove
            made.append(folder)
    except BaseException:
        _release(run, made)
        raise
    return made


def _release(run: Path, made: list[Path]) -> None:
    """Undo a failed submit: remove the run folder only when `_claim` made it (and the parents it made, while
    empty); in a folder that was there before, remove only the entries submit writes."""
    if run in made:
        shutil.rmtree(run, ignore_errors=True)
    else:
        for name in (LOGS, CODE, CONFIG, SBATCH, TASKS, SUBMIT):
            entry = run / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.exists() or entry.is_symlink():
                entry.unlink(missing_ok=True)
    for folder in reversed([p for p in made if p != run]):
        try:
            folder.rmdir()
        except OSError:
            break


def _write_run(job: SlurmJob) -> list[Path]:
    """Write the run folder; the folders made for it (see `_claim`). On failure what was written is removed."""
    from unipers.io import atomic_file

    run = job.run_dir
    made = _claim(run)
    try:
        (run / LOGS).mkdir()
        snapshot_code(run / CODE)
        for name, text in ((CONFIG, to_yaml(job.cfg)), (SBATCH, job.script),
                           (TASKS, json.dumps({str(i): t for i, t in enumerate(job.tasks)}, indent=2) + "\n")):
            with atomic_file(run / name) as tmp:
                tmp.write_text(text)
    except BaseException:
        _release(run, made)
        raise
    return made


def write_run(job: SlurmJob) -> Path:
    """Write the run folder (refusing a used one: a stale checkpoint would be resumed by the new job)."""
    _write_run(job)
    return job.run_dir


def sbatch(script: Path) -> str:
    """Queue `script`; the job id (``sbatch --parsable`` prints ``id`` or ``id;cluster``)."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: run on a Slurm login node (or use --dry-run)")
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch printed no job id for {script}: {out.stdout.strip()!r}")
    return job_id


def submit(job: SlurmJob) -> str:
    """Write the run folder and queue it; the job id. On refusal what this call wrote is removed again, and
    never a folder that was there before."""
    run = job.run_dir
    made = _write_run(job)
    try:
        checks.check_parses((run / SBATCH).read_text(), str(run / SBATCH))
        job_id = sbatch(run / SBATCH)
    except BaseException:
        _release(run, made)
        raise
    info = {"job_id": job_id, "stage": job.cfg.stage, "array": bool(job.tasks), "tasks": len(job.tasks) or 1,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv}
    (run / SUBMIT).write_text(json.dumps(info, indent=2) + "\n")
    return job_id
