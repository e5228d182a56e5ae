"""Helpers for the Slurm tests: run `unipers slurm`, follow jobs in squeue, read their logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}


def slurm_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "unipers.cli", "slurm", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def submit(*args, env) -> tuple[str, Path]:
    """Submit through the CLI; (job id, run folder)."""
    out = slurm_cli("submit", *args, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    run = next(a.split("=", 1)[1] for a in map(str, args) if a.startswith("run_dir="))
    return json.loads((Path(run) / "submit.json").read_text())["job_id"], Path(run)


def job_states(job_id: str) -> dict[str, str]:
    """job or array-task id -> state, from squeue (ended jobs stay listed MinJobAge=300 s on the test cluster)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i %T"],
                         capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_job(job_id: str, run: Path, timeout: float = 240) -> dict[str, str]:
    """Wait until no task of the job is active; its final states. Shows the logs on timeout."""
    def done():
        states = job_states(job_id)
        return states if states and not (set(states.values()) & ACTIVE) else None
    try:
        return wait_for(done, timeout, f"job {job_id}")
    except AssertionError:
        logs = "\n".join(p.read_text()[-3000:] for p in sorted((run / "logs").glob("*.out")))
        subprocess.run(["scancel", job_id])
        raise AssertionError(f"job {job_id} still active after {timeout} s: {job_states(job_id)}\n{logs}")


def logs_of(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "logs").glob("*.out")))
