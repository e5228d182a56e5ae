"""A run folder under ordinary mistakes: two runs at once, a fresh start over an old run, a diverged run, a
SIGKILL between a best file and the next checkpoint, `ckpt_path=last` after the files were touched."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from unipers.config import load_config
from unipers.errors import DivergedError
from unipers.io import FolderBusyError, folder_lock
from unipers.training.run import resolve_ckpt, train

CONFIGS = Path(__file__).parents[2] / "configs"
FAST = ["trainer.progress_bar=false", "trainer.checkpoint_every=0", "data.batch_size=4", "trainer.logger=csv",
        "personalize.warmup_steps=0", "trainer.val_every=0"]


def cfg_for(run_dir, concepts, *extra):
    return load_config([CONFIGS / "personalize.yaml"],
                       [f"data.concepts=[{','.join(map(str, concepts))}]", f"run_dir={run_dir}", *FAST, *extra])


def test_a_second_run_in_a_locked_folder_is_refused_and_changes_nothing(prepared_concepts, tmp_path, tree_digest,
                                                                          unipers_cli, one_line_error):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    with folder_lock(run):  # another run holds it
        before = tree_digest(run)
        with pytest.raises(FolderBusyError, match="in use by pid"):
            train(cfg_for(run, prepared_concepts[:1], "trainer.max_steps=2"))
        code, _, err = unipers_cli("train", "personalize", f"data.concepts=[{prepared_concepts[0]}]", f"run_dir={run}",
                                   *FAST, "trainer.max_steps=2")
        assert code == 2
        one_line_error(err, str(run), "in use")
        assert tree_digest(run) == before


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_fsdp_without_gpus_is_refused_before_the_model_loads(prepared_concepts, tmp_path, accelerator, unipers_cli,
                                                             one_line_error, monkeypatch):
    import unipers.models.unified as unified

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(unified.UnifiedModel, "from_config", lambda *a, **k: pytest.fail("the model was built"))
    run = tmp_path / "run"
    code, _, err = unipers_cli("train", "personalize", f"data.concepts=[{prepared_concepts[0]}]", f"run_dir={run}",
                               *FAST, "trainer.max_steps=2", "trainer.strategy=fsdp",
                               f"trainer.accelerator={accelerator}")
    assert code == 2
    one_line_error(err, "trainer.strategy=fsdp", "ddp")
    assert not run.exists()


def test_a_fresh_start_over_an_unfinished_run_is_refused(prepared_concepts, tmp_path, tree_digest):
    run = tmp_path / "run"
    train(cfg_for(run, prepared_concepts[:1], "trainer.max_steps=2", "trainer.checkpoint_every=1"))
    (run / "concepts" / "last.safetensors").unlink()  # as if it had been killed before the end
    before = tree_digest(run)
    with pytest.raises(FileExistsError, match="unfinished run .*ckpt_path=last"):
        train(cfg_for(run, prepared_concepts[:1], "trainer.max_steps=2"))
    assert tree_digest(run) == before


def test_last_is_the_highest_step_whatever_the_file_times(prepared_concepts, tmp_path):
    run = train(cfg_for(tmp_path / "run", prepared_concepts[:1], "trainer.max_steps=4",
                        "trainer.checkpoint_every=2"))
    early, late = run / "checkpoints" / "step_000002.ckpt", run / "checkpoints" / "step_000004.ckpt"
    os.utime(early, (late.stat().st_mtime + 100,) * 2)  # copied or touched: the early step looks newest
    assert resolve_ckpt("last", run) == str(late)


class Poison(L.Callback):
    """Make step 2 diverge: an infinite row (so the loss is not finite), or NaN gradients (so the rows become
    NaN only in the optimizer step)."""

    def __init__(self, how: str):
        self.how = how

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.how == "loss" and trainer.global_step == 2:
            with torch.no_grad():
                for p in module.model.bank.concept_rows("bo").parameters():
                    p.fill_(float("inf"))

    def on_after_backward(self, trainer, module):
        if self.how == "gradients" and trainer.global_step == 2:
            for p in module.model.bank.concept_rows("bo").parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


@pytest.mark.parametrize("how", ["loss", "gradients"])
def test_a_diverged_run_fails_and_saves_nothing_non_finite(prepared_concepts, tmp_path, how):
    run = tmp_path / "run"
    cfg = cfg_for(run, prepared_concepts[:1], "trainer.max_steps=4", "trainer.checkpoint_every=1",
                  "personalize.save_every=1")
    with pytest.raises(DivergedError, match="diverged at step 2"):
        train(cfg, [Poison(how)])
    assert not (run / "concepts" / "last.safetensors").exists()
    files = sorted((run / "concepts").glob("*.safetensors"))
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    # The two steps before the diverged one (global step 2 is the third) were saved; nothing after.
    assert [p.name for p in files] == ["step_000001.safetensors", "step_000002.safetensors"]
    assert [p.name for p in ckpts] == ["step_000001.ckpt", "step_000002.ckpt"]
    for f in files:
        assert all(torch.isfinite(t).all() for t in load_file(f).values())
    for f in ckpts:
        assert all(torch.isfinite(t).all() for t in torch.load(f, weights_only=True)["state_dict"].values())


KILL_AFTER_BEST = textwrap.dedent("""
    import os, signal, sys
    import lightning as L
    from unipers.config import load_config
    from unipers.training.run import train

    class Kill(L.Callback):  # after ConceptFiles wrote this validation's best file, before the checkpoint
        def on_validation_end(self, trainer, module):
            if trainer.global_step == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)

    train(load_config([sys.argv[2]], sys.argv[3:]), [Kill()])
""")


def best_files(run):
    out = {}
    for f in sorted((run / "concepts").glob("best_*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        out[f.name] = ({k: meta[k] for k in ("step", "metric", "value")}, load_file(f))
    return out


def test_best_files_after_a_sigkill_and_resume_match_an_uninterrupted_run(prepared_concepts, tmp_path):
    common = [f"data.concepts=[{','.join(map(str, prepared_concepts))}]", *FAST, "trainer.max_steps=8",
              "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.limit_val_batches=2",
              "trainer.weight_decay=0.01"]
    full = train(load_config([CONFIGS / "personalize.yaml"], [*common, f"run_dir={tmp_path / 'full'}"]))
    expected = best_files(full)
    assert expected and all(meta["metric"].startswith("val/") for meta, _ in expected.values())
    # Killed at every validating step in turn, right after that validation's best file was written.
    for kill_at in (2, 4, 6):
        run = tmp_path / f"killed{kill_at}"
        args = [*common, f"run_dir={run}"]
        killed = subprocess.run([sys.executable, "-c", KILL_AFTER_BEST, str(kill_at), str(CONFIGS / "personalize.yaml"),
                                 *args], capture_output=True, text=True, timeout=600)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not (run / "concepts" / "last.safetensors").exists()
        train(load_config([CONFIGS / "personalize.yaml"], [*args, "ckpt_path=last"]))
        got = best_files(run)
        assert got.keys() == expected.keys(), kill_at
        for name, (meta, tensors) in expected.items():
            assert got[name][0] == meta, (kill_at, name)
            assert all(torch.equal(tensors[k], got[name][1][k]) for k in tensors), (kill_at, name)


@pytest.mark.parametrize("damage", ["nan", "shape", "missing", "extra", "int"])
def test_a_damaged_checkpoint_is_refused_before_it_is_loaded(prepared_concepts, tmp_path, damage, unipers_cli,
                                                            one_line_error, tree_digest):
    run = tmp_path / "run"
    train(cfg_for(run, prepared_concepts[:1], "trainer.max_steps=2", "trainer.checkpoint_every=2"))
    (run / "concepts" / "last.safetensors").unlink()  # an unfinished run, to resume
    ckpt = run / "checkpoints" / "step_000002.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    state = saved["state_dict"]
    key = sorted(state)[0]
    if damage == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif damage == "shape":
        state[key] = state[key][:, :-1]
    elif damage == "missing":
        del state[key]
    elif damage == "extra":
        state["model.bank.rows.zz.embed.identifier"] = torch.zeros(1, 4)
    else:
        state[key] = state[key].long()
    torch.save(saved, ckpt)
    before = tree_digest(run)
    code, _, err = unipers_cli("train", "personalize", f"data.concepts=[{prepared_concepts[0]}]", f"run_dir={run}",
                               *FAST, "trainer.max_steps=4", "trainer.checkpoint_every=2", "ckpt_path=last")
    assert code == 2, err
    one_line_error(err, str(ckpt))
    assert tree_digest(run) == before


def test_the_row_check_names_the_non_finite_concept_and_passes_huge_finite_rows():
    from unipers.concepts.bank import ConceptBank, SlotLayout
    from unipers.training.personalize import non_finite_concepts

    bank = ConceptBank(100, 8, SlotLayout(2, 1, 1))
    for name in ("bo", "mam"):
        bank.add(name)
    assert non_finite_concepts(bank) == []
    with torch.no_grad():
        bank.concept_rows("mam").embed["und"].fill_(1e30)  # finite, but its square overflows the fused norm
        assert non_finite_concepts(bank) == []
        bank.concept_rows("bo").embed["gen"][0, 3] = float("nan")
    assert non_finite_concepts(bank) == ["bo"]
