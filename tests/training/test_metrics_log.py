"""metrics.csv: a loss term is logged only on steps that had samples for it, never carried over from an
earlier step (Lightning keeps a step metric's last value until the epoch ends)."""

import csv
from pathlib import Path

import lightning as L

from unipers.config import load_config
from unipers.training.run import train

CONFIGS = Path(__file__).parents[2] / "configs"


class GenerationSpy(L.Callback):
    """Which optimizer steps had a generation sample (this is one process: its batch is the global one)."""

    def __init__(self):
        self.had_gen: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.had_gen[trainer.global_step] = "gen" in batch


def test_diffusion_is_logged_only_on_steps_with_generation_samples(prepared_concepts, tmp_path, tiny_dirs):
    # One sample a batch, half of them generation: steps with and without a generation sample alternate
    # irregularly, and the metrics of every step are written.
    cfg = load_config([CONFIGS / "personalize.yaml"], [
        f"data.concepts=[{prepared_concepts[0]}]", f"run_dir={tmp_path / 'run'}", "trainer.progress_bar=false",
        "trainer.val_every=0", "trainer.checkpoint_every=0", "trainer.logger=csv", "personalize.warmup_steps=0",
        "data.batch_size=1", "trainer.max_steps=16", "trainer.log_every=1",
        "data.task_weights={recognition: 0.5, generation: 0.5}"])
    spy = GenerationSpy()
    run = train(cfg, [spy])
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/stage")]
    assert [int(r["step"]) for r in rows] == list(range(16))
    had_gen = [spy.had_gen[int(r["step"])] for r in rows]
    assert any(had_gen) and not all(had_gen)  # the run really mixed both kinds of step
    for row, gen in zip(rows, had_gen):
        assert (row["train/diffusion"] != "") == gen, (row, gen)
        assert (row["train/understanding"] != "") == (not gen), (row, gen)


def test_combine_logs_only_terms_with_a_global_count():
    import torch
    from types import SimpleNamespace

    from unipers.training.losses import TERMS, PersonalizeLoss

    weights = SimpleNamespace(understanding=1.0, image_tokens=0.0, diffusion=1.0)
    zero = torch.zeros(())
    sums = {"understanding": torch.tensor(6.0), "image_tokens": zero, "diffusion": zero}
    # This rank had no generation sample, another rank had two: the global count decides, so both log it.
    reduced = torch.tensor([3.0, 0.0, 2.0, 6.0, 0.0, 4.0])
    total, logs = PersonalizeLoss.combine(zero, sums, reduced, weights, world=2)
    assert set(logs) == {"train/understanding", "train/diffusion"} and float(logs["train/diffusion"]) == 2.0
    # No rank had one: no key at all, rather than a 0 or an older value.
    reduced = torch.tensor([3.0, 0.0, 0.0, 6.0, 0.0, 0.0])
    _, logs = PersonalizeLoss.combine(zero, sums, reduced, weights, world=2)
    assert set(logs) == {"train/understanding"} and len(TERMS) == 3
