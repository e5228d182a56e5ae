"""What `unipers slurm submit` writes into the sbatch file, checked before anything is written.

Two kinds of text reach the script. Values on shell command lines (the run folder, concept folders,
overrides) are shell-quoted where they are written (``render``). Values on ``#SBATCH`` lines are read by
sbatch's own parser (whitespace splits options, quotes group, an unquoted ``#`` starts a comment, a
newline ends the directive and the next line is shell code), so each is checked against a strict
pattern here and refused, naming its key, when it could add or change an option:

- ``slurm.partition`` (a comma-separated list), ``account``, ``qos``: letters, digits, ``_ . -``.
- ``slurm.constraint``: the same plus Slurm's feature syntax ``& | [ ] ( ) * , :``.
- ``slurm.time``: a Slurm time (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``...).
- ``slurm.extra``: one ``--option=value`` (or ``--flag``) per item, each its own ``#SBATCH`` line; the
  value without whitespace, quotes, ``#``, ``$`` or backslashes; no short options (``-o``); and none
  of the options unipers sets itself or relies on (``DENIED``), nor an abbreviation of one (sbatch
  accepts unique prefixes: ``--out=`` is ``--output=``).
- ``run_dir``: also on the ``--output`` line; written there quoted for sbatch, with ``%`` doubled (a
  literal ``%`` in a file name pattern). It may hold spaces and quotes, but no control characters and
  none of ``$ ` ; | & < > \\``: quoting keeps the shell from acting on them, but a folder named like
  a command is a mistake, ``$`` would be an OmegaConf interpolation in the job's config, and a
  backslash switches off sbatch's ``%j`` patterns. It must also read back unchanged from the
  ``run_dir=`` override each array task gets (YAML would cut it at `` #`` or split it at ``: ``).

``slurm.setup`` is shell code by design and is written as given; ``bash -n`` then checks that the whole
script parses. ``check_eval`` refuses ``--eval`` without the metric models its generation metrics load.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from unipers.schema import ConfigError

TIME_RE = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
PATTERNS = {
    "partition": (re.compile(rf"{NAME}(,{NAME})*"), "names of letters, digits, _ . - (comma-separated)"),
    "account": (re.compile(NAME), "a name of letters, digits, _ . -"),
    "qos": (re.compile(NAME), "a name of letters, digits, _ . -"),
    "constraint": (re.compile(r"[A-Za-z0-9_.&|\[\]()*,:-]+"),
                   "node features: letters, digits, _ . - and Slurm's & | [ ] ( ) * , :"),
}
EXTRA_RE = re.compile(r"--([a-z][a-z0-9-]*)(?:=([A-Za-z0-9_.,:=@+/~*&|\[\]()-]+))?")
DENIED = {
    # Written by unipers from other keys: set those instead.
    "job-name": "unipers names the job", "nodes": "use trainer.num_nodes", "ntasks": "one task per device",
    "ntasks-per-node": "use trainer.devices", "cpus-per-task": "use slurm.cpus_per_task",
    "gpus-per-node": "use slurm.gpus_per_node", "mem-per-cpu": "use slurm.mem_per_task",
    "time": "use slurm.time", "partition": "use slurm.partition", "account": "use slurm.account",
    "qos": "use slurm.qos", "constraint": "use slurm.constraint", "array": "use --concepts",
    "requeue": "use slurm.requeue", "no-requeue": "use slurm.requeue",
    # What status, collect and the requeue rely on.
    "output": "logs go to RUN/logs", "error": "logs go to RUN/logs", "input": "the job reads no stdin",
    "open-mode": "logs are appended across requeues", "export": "the job needs the submit environment",
    "signal": "USR1 drives the requeue",
    # What would make sbatch print no job id, or not return.
    "test-only": "submit needs a job id", "wait": "submit returns once queued",
}
PREFIX_OK = {"mem", "gpus"}
"""Real sbatch options that are also prefixes of a denied one: exact names, not abbreviations."""
RUN_DIR_BAD = re.compile(r"[\x00-\x1f\x7f$`;|&<>\\]")
SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_./:=@%,+~-]+")


def check_time(value: str) -> None:
    if not isinstance(value, str) or not TIME_RE.fullmatch(value):
        raise ConfigError(f"slurm.time={value!r} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS)")


def check_names(slurm) -> None:
    """``slurm.partition``, ``account``, ``qos``, ``constraint``: each None or matching its pattern."""
    for key, (pattern, what) in PATTERNS.items():
        value = getattr(slurm, key)
        if value is not None and not pattern.fullmatch(str(value)):
            raise ConfigError(f"slurm.{key}={value!r} is not a valid #SBATCH --{key} value: {what}, "
                              "no spaces or newlines")


def extra_directives(slurm) -> list[str]:
    """``slurm.extra`` as checked ``--option[=value]`` items, one per ``#SBATCH`` line."""
    denied = dict(DENIED)
    if slurm.mem_per_task:  # sbatch refuses --mem with --mem-per-cpu
        denied.update({"mem": "slurm.mem_per_task sets --mem-per-cpu", "mem-per-gpu": denied["mem-per-cpu"]})
    out = []
    for i, item in enumerate(slurm.extra):
        item = str(item)
        key = f"slurm.extra[{i}]={item!r}"
        if re.match(r"-[^-]", item):
            raise ConfigError(f"{key}: write the long form, --option=value (short options are not accepted)")
        option = item if item.startswith("--") else f"--{item}"
        m = EXTRA_RE.fullmatch(option)
        if not m:
            raise ConfigError(f"{key} is not one --option=value: lowercase option name, value of letters, digits "
                              "and _ . , : = @ + / ~ * & | [ ] ( ) - (no spaces, quotes, #, $ or newlines)")
        name = m.group(1)
        hit = name if name in denied else None
        if hit is None and name not in PREFIX_OK:
            hit = next((d for d in sorted(denied) if d.startswith(name)), None)
        if hit is not None:
            what = f"--{hit}" if hit == name else f"--{name} (sbatch may read it as --{hit})"
            raise ConfigError(f"{key}: {what} is set by unipers ({denied[hit]}); remove it from slurm.extra")
        out.append(option)
    return out


def check_run_dir(run_dir: str) -> None:
    from omegaconf import OmegaConf

    bad = RUN_DIR_BAD.search(run_dir)
    if bad:
        raise ConfigError(f"run_dir={run_dir!r}: {bad.group()!r} is not allowed in a Slurm run folder "
                          "(no control characters or $ ` ; | & < > \\); spaces and quotes are fine")
    # Array tasks get run_dir=RUN/tasks/<i> as an override, which is read as YAML: ' #' would start a
    # comment and ': ' a mapping, and the task would train somewhere else.
    task = f"{run_dir}/tasks/0"
    try:
        back = OmegaConf.from_dotlist([f"run_dir={task}"]).run_dir
    except Exception:
        back = None
    if back != task:
        raise ConfigError(f"run_dir={run_dir!r} does not read back as itself in a run_dir= override "
                          "(YAML takes ' #' for a comment and ': ' for a mapping): rename the folder")


def sbatch_word(text: str) -> str:
    """`text` as one argument on an ``#SBATCH`` line: as is when plain, else double-quoted with ``"`` and
    ``\\`` escaped (sbatch's parser honours both quoting and backslashes). Newlines cannot be written."""
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{text!r}: a newline cannot be written on an #SBATCH line")
    if SBATCH_PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def output_pattern(folder: Path, name: str) -> str:
    """``--output`` for a file `name` (with Slurm's ``%`` patterns) in `folder`: ``%`` in the folder doubled."""
    return str(folder).replace("%", "%%") + "/" + name


def check_eval(cfg, generation: bool) -> None:
    """``--eval`` runs `unipers eval` in every task after training; its generation metrics load CLIP and
    DINO from ``eval.clip_path`` / ``eval.dino_path``, which would otherwise fail in each task."""
    if not generation:
        return
    paths = {"eval.clip_path": cfg.eval.clip_path, "eval.dino_path": cfg.eval.dino_path}
    missing = [key for key, path in paths.items() if not path]
    if missing:
        give = " ".join(f"{key}=/path/to/{key.split('.')[1][:-5]}" for key in missing)
        raise ConfigError(f"--eval: {' and '.join(missing)} not set; the generation metrics (CLIP-I, CLIP-T, "
                          f"DINO) need them in every task: give {give} (local transformers folders), "
                          "or add --no-generation to evaluate understanding only")
    for key, path in paths.items():
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{key}={path}: not a local model folder (no config.json), which --eval's "
                              "generation metrics load; fix the path or add --no-generation")


def check_parses(script: str, name: str) -> None:
    """Refuse a script bash cannot parse (``bash -n``: nothing runs); skipped where there is no bash."""
    bash: Optional[str] = shutil.which("bash")
    if bash is None:
        return
    out = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        why = "; ".join(line.strip() for line in out.stderr.splitlines() if line.strip()) or f"exit {out.returncode}"
        raise ConfigError(f"{name} does not parse as a bash script ({why}); slurm.setup lines are written "
                          "into it as given: check them")
