"""`unipers slurm submit` on hostile or broken input, without a cluster: values that would add lines or options
to the sbatch file are refused at submit (exit 2, one line naming the key, the user's folders untouched); a
run folder with spaces and quotes reaches the job intact; --eval needs its metric models; a refused submit
removes only what it made."""

import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from unipers.launch import slurm
from unipers.launch.slurm import plan, write_run

CONFIGS = Path(__file__).parents[2] / "configs"
PERSONALIZE, LOCAL = CONFIGS / "personalize.yaml", CONFIGS / "slurm" / "local.yaml"
PWN = "touch {tmp}/PWNED"


def sbatch_arguments(script: str) -> list[str]:
    """The options sbatch reads from the script, split as its parser splits them (Slurm's src/sbatch/opt.c):
    whitespace separates, quotes group, a backslash escapes, an unquoted # ends the line, and the first line
    that is not a comment ends the directives."""
    args = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        arg, quote, escape, started = "", None, False, False
        for ch in line[len("#SBATCH"):]:
            if escape:
                arg, escape = arg + ch, False
            elif ch == "\\":
                escape = started = True
            elif quote:
                quote, arg = (None, arg) if ch == quote else (quote, arg + ch)
            elif ch in "\"'":
                quote, started = ch, True
            elif ch == "#":
                break
            elif ch.isspace():
                if started:
                    args.append(arg)
                arg, started = "", False
            else:
                arg, started = arg + ch, True
        assert quote is None, f"unmatched quote in {line!r}"
        if started:
            args.append(arg)
    return args


BAD = [  # (id, settings written to a config file, the key the refusal names)
    ("partition-newline-directive", {"slurm": {"partition": "gpu\n#SBATCH --output=/tmp/x"}}, "slurm.partition"),
    ("partition-newline-command", {"slurm": {"partition": f"gpu\n{PWN}"}}, "slurm.partition"),
    ("partition-space-option", {"slurm": {"partition": "gpu --output=/tmp/x"}}, "slurm.partition"),
    ("account-space-option", {"slurm": {"account": "proj --array=0-999"}}, "slurm.account"),
    ("account-hash", {"slurm": {"account": "proj#x"}}, "slurm.account"),
    ("qos-quotes", {"slurm": {"qos": 'normal" --output=/tmp/x "'}}, "slurm.qos"),
    ("qos-substitution", {"slurm": {"qos": f"$({PWN})"}}, "slurm.qos"),
    ("constraint-newline", {"slurm": {"constraint": "a100|h100\n#SBATCH -o /tmp/x"}}, "slurm.constraint"),
    ("constraint-space-option", {"slurm": {"constraint": "a100 --output=/tmp/x"}}, "slurm.constraint"),
    ("time-newline", {"slurm": {"time": "04:00:00\n"}}, "slurm.time"),
    ("time-space-option", {"slurm": {"time": "04:00:00 --output=/tmp/x"}}, "slurm.time"),
    ("extra-newline-directive", {"slurm": {"extra": ["--mail-type=END\n#SBATCH --output=/tmp/x"]}}, "slurm.extra"),
    ("extra-newline-command", {"slurm": {"extra": [f"--mail-type=END\n{PWN}"]}}, "slurm.extra"),
    ("extra-space-option", {"slurm": {"extra": ["--mail-type=END --output=/tmp/x"]}}, "slurm.extra"),
    ("extra-output", {"slurm": {"extra": ["--output=/tmp/x"]}}, "slurm.extra"),
    ("extra-error-no-dashes", {"slurm": {"extra": ["error=/tmp/x"]}}, "slurm.extra"),
    ("extra-abbreviated-output", {"slurm": {"extra": ["--out=/tmp/x"]}}, "slurm.extra"),
    ("extra-short-option", {"slurm": {"extra": ["-o /tmp/x"]}}, "slurm.extra"),
    ("extra-array", {"slurm": {"extra": ["--array=0-999"]}}, "slurm.extra"),
    ("extra-job-name", {"slurm": {"extra": ["--job-name=x"]}}, "slurm.extra"),
    ("extra-substitution", {"slurm": {"extra": [f"--comment=$({PWN})"]}}, "slurm.extra"),
    ("extra-mem-beside-mem-per-task", {"slurm": {"mem_per_task": "64G", "extra": ["--mem=0"]}}, "slurm.extra"),
    ("run-dir-semicolon", {"run_dir": "{tmp}/runs/a;" + PWN}, "run_dir"),
    ("run-dir-substitution", {"run_dir": "{tmp}/runs/$(" + PWN + ")"}, "run_dir"),
    ("run-dir-backtick", {"run_dir": "{tmp}/runs/`" + PWN + "`"}, "run_dir"),
    ("run-dir-newline", {"run_dir": "{tmp}/runs/a\n#SBATCH --output=/tmp/x"}, "run_dir"),
    ("run-dir-yaml-comment", {"run_dir": "{tmp}/runs/a #b"}, "run_dir"),
    ("setup-does-not-parse", {"slurm": {"setup": ["if true; then"]}}, "slurm.sbatch"),
]


@pytest.mark.parametrize("settings, key", [pytest.param(s, k, id=i) for i, s, k in BAD])
def test_bad_value_is_refused_at_submit_naming_the_key(settings, key, fake_concepts, fake_bin, tmp_path, monkeypatch,
                                                      unipers_cli, one_line_error, tree_digest):
    site = tmp_path / "site.yaml"
    site.write_text(json.dumps(settings).replace("{tmp}", str(tmp_path)))  # YAML reads JSON
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    args = ["slurm", "submit", PERSONALIZE, LOCAL, site, f"data.concepts=[{fake_concepts[0]}]"]
    if "run_dir" not in settings:
        args.append(f"run_dir={tmp_path / 'runs' / 'run'}")
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli(*args)
    assert code == 2, err
    one_line_error(err, key, *(["slurm.setup"] if key == "slurm.sbatch" else []))
    # No run folder, no sbatch call (fake_bin would have written sbatch.calls), nothing ran.
    assert tree_digest(tmp_path) == before


def test_accepted_extra_options_are_one_sbatch_argument_each(fake_concepts, tmp_path):
    extra = ["mail-type=END,FAIL", "--exclusive", "--gres=gpu:a100:2", "--nodelist=n[01-04]", "--mem=0",
             "--gpus=2", "--export-file=/etc/env", "--begin=now+60", "--mail-user=me@example.org"]
    job = plan([PERSONALIZE, LOCAL], [f"data.concepts=[{fake_concepts[0]}]", f"run_dir={tmp_path / 'run'}",
                                      "slurm.partition=gpu,gpu-long", "slurm.constraint='[(a100&ib)*2|h100]'",
                                      f"slurm.extra={json.dumps(extra)}"])
    args = sbatch_arguments(job.script)
    assert args[-len(extra):] == ["--mail-type=END,FAIL", *extra[1:]]
    assert "--partition=gpu,gpu-long" in args and "--constraint=[(a100&ib)*2|h100]" in args
    directives = [line for line in job.script.splitlines() if line.startswith("#SBATCH")]
    assert len(directives) == len(args)  # one option per line


def test_run_dir_with_spaces_and_quotes_reaches_the_job_intact(fake_concepts, fake_bin, tmp_path):
    run = tmp_path / "my runs" / "it's a \"quoted\" run, 100% [x]"
    job = plan([PERSONALIZE, LOCAL], [f"run_dir={run}"], concepts=fake_concepts[:2], evaluate=True,
               generation=False)
    assert job.run_dir == run
    write_run(job)
    script = run / "slurm.sbatch"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # sbatch reads the log pattern as one argument, with the folder's % doubled (Slurm's literal %).
    args = sbatch_arguments(script.read_text())
    assert f"--output={str(run).replace('%', '%%')}/logs/%x-%A_%a.out" in args
    assert all(a.startswith("--") for a in args), args
    # Run the script as array task 1, with an `srun` that prints its arguments; task 1 has a concept file,
    # so its eval step runs too.
    (fake_bin / "srun").write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n')
    (fake_bin / "srun").chmod(0o755)
    (run / "tasks" / "1" / "concepts").mkdir(parents=True)
    (run / "tasks" / "1" / "concepts" / "last.safetensors").write_bytes(b"x")
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="7",
               SLURM_CPUS_PER_TASK="1")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"unipers from {run}/code/unipers/__init__.py" in out.stdout
    got = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
    task = f"{run}/tasks/1"
    for expected in (f"{run}/config.yaml", "ckpt_path=last", f"run_dir={task}", f"{task}/concepts/last.safetensors",
                     fake_concepts[1], f"{task}/eval", "--no-generation"):
        assert expected in got, (expected, got)
    # The train CLI reads run_dir=... as YAML: it must read back as the task's folder.
    assert OmegaConf.from_dotlist([f"run_dir={task}"]).run_dir == task


def _real_sbatch_arguments(script: Path) -> list[str]:
    """What the installed sbatch reads from `script` (``-vvv --test-only``: it lists the arguments before it
    contacts a controller, and never queues); skips where it cannot."""
    exe = shutil.which("sbatch")
    if exe is None:
        pytest.skip("no sbatch on PATH")
    proc = subprocess.Popen([exe, "-vvv", "--test-only", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(30, proc.kill)
    timer.start()
    args, done = [], False
    try:
        for line in proc.stdout:
            m = re.match(r'sbatch: debug2: Found in script, argument "(.*)"$', line.rstrip("\n"))
            if m:
                args.append(m.group(1))
            if "end of defined options" in line:
                done = True
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    if not done:
        pytest.skip("sbatch did not list its options (no slurm.conf?)")
    return args


def test_installed_sbatch_reads_each_directive_as_one_argument(fake_concepts, tmp_path):
    run = tmp_path / "runs" / "it's \"q\"#1 50%"
    job = plan([PERSONALIZE, LOCAL], [f"run_dir={run}", "slurm.extra=['--mail-type=END,FAIL']"],
               concepts=fake_concepts[:2])
    script = tmp_path / "job.sbatch"
    script.write_text(job.script)
    assert _real_sbatch_arguments(script) == sbatch_arguments(job.script)
    assert f"--output={str(run).replace('%', '%%')}/logs/%x-%A_%a.out" in sbatch_arguments(job.script)


@pytest.mark.parametrize("given, missing", [((), ("eval.clip_path", "eval.dino_path")),
                                            (("clip",), ("eval.dino_path",))])
def test_eval_without_metric_models_is_refused_saying_how_to_fix(given, missing, fake_concepts, metric_models, tmp_path,
                                                                unipers_cli, one_line_error, tree_digest):
    before = tree_digest(tmp_path)
    models = [m for m in metric_models if any(f"eval.{g}_path=" in m for g in given)]
    code, _, err = unipers_cli("slurm", "submit", PERSONALIZE, LOCAL, "--concepts", ",".join(fake_concepts[:2]),
                               *models, f"run_dir={tmp_path / 'run'}", "--eval")
    assert code == 2, err
    line = one_line_error(err, *missing, "--no-generation")
    assert all(key not in line for key in {"eval.clip_path", "eval.dino_path"} - set(missing))
    assert tree_digest(tmp_path) == before


def test_eval_model_folder_without_config_json_is_refused(fake_concepts, metric_models, tmp_path, unipers_cli,
                                                          one_line_error):
    (tmp_path / "models" / "dino" / "config.json").unlink()
    code, _, err = unipers_cli("slurm", "submit", PERSONALIZE, LOCAL, "--concepts", ",".join(fake_concepts[:2]),
                               *metric_models, f"run_dir={tmp_path / 'run'}", "--eval", "--dry-run")
    assert code == 2, err
    one_line_error(err, "eval.dino_path", "config.json")


def test_eval_no_generation_needs_no_metric_models(fake_concepts, tmp_path, unipers_cli, one_line_error):
    code, out, err = unipers_cli("slurm", "submit", PERSONALIZE, LOCAL, "--concepts", ",".join(fake_concepts[:2]),
                                 f"run_dir={tmp_path / 'run'}", "--eval", "--no-generation", "--dry-run")
    assert code == 0, err
    assert re.search(r"--config \"\$RUN/config.yaml\" --no-generation$", out, re.MULTILINE), out
    code, _, err = unipers_cli("slurm", "submit", PERSONALIZE, LOCAL, "--concepts", ",".join(fake_concepts[:2]),
                               f"run_dir={tmp_path / 'run'}", "--no-generation", "--dry-run")
    assert code == 2
    one_line_error(err, "--no-generation", "--eval")


@pytest.fixture
def refusing_bin(tmp_path):
    """A PATH folder whose `sbatch` refuses every job and writes nothing."""
    bin_dir = tmp_path / "refusing"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: Invalid account" >&2\nexit 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def test_refused_submit_removes_only_the_folders_it_made(fake_concepts, refusing_bin, tmp_path, monkeypatch,
                                                         unipers_cli, tree_digest):
    monkeypatch.setenv("PATH", f"{refusing_bin}:{os.environ['PATH']}")
    submit = ("slurm", "submit", PERSONALIZE, LOCAL, f"data.concepts=[{fake_concepts[0]}]")
    # A new folder (and the parents made for it) goes again.
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli(*submit, f"run_dir={tmp_path / 'new' / 'deeper' / 'run'}")
    assert code == 1 and "Invalid account" in err, err
    assert tree_digest(tmp_path) == before and not (tmp_path / "new").exists()
    # An empty folder that was there before stays, as it was; so does the folder around it.
    (tmp_path / "mine" / "run").mkdir(parents=True)
    before = tree_digest(tmp_path)
    code, _, err = unipers_cli(*submit, f"run_dir={tmp_path / 'mine' / 'run'}")
    assert code == 1, err
    assert tree_digest(tmp_path) == before and (tmp_path / "mine" / "run").is_dir()


def test_failed_write_removes_only_the_folders_it_made(fake_concepts, tmp_path, monkeypatch, tree_digest):
    def broken(dest):
        (dest / "unipers").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(slurm, "snapshot_code", broken)
    (tmp_path / "mine").mkdir()
    for run in (tmp_path / "new" / "run", tmp_path / "mine"):
        before = tree_digest(tmp_path)
        job = plan([PERSONALIZE, LOCAL], [f"data.concepts=[{fake_concepts[0]}]", f"run_dir={run}"])
        with pytest.raises(OSError, match="disk full"):
            write_run(job)
        assert tree_digest(tmp_path) == before
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "new").exists()
