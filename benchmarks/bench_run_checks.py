"""What the run's safety checks cost a training step: the finite checks of the loss and the concept rows,
side by side with the same training without them.

    python benchmarks/bench_run_checks.py               # ~3 min on 2 cores
    python benchmarks/bench_run_checks.py --steps 60 --repeats 3

1. **Per-step check alone**: ``non_finite_concepts(bank)`` (the row check after each optimizer step) timed
   on banks at the tiny width (hidden 64) and at Anole-7B's (hidden 4096, 8/4/4 slots + identifier), with
   1 and 10 concepts. The loss check is one ``isfinite`` on the already all-reduced (2 x terms) tensor.
2. **Whole steps, with and without**: the embedded tiny model personalized for ``--steps`` steps through
   ``unipers.training.run.train`` twice per repeat, alternating A B A B: once as shipped, once with
   ``PersonalizeModule.optimizer_step`` replaced by Lightning's own (no row check) and the loss check
   bypassed, in the order A B, B A, ... Median seconds per step from step 5 on (the first steps warm
   caches).

Prints a markdown table; JSON in benchmarks/results/run_checks.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results"


def time_row_check(hidden: int, concepts: int, repeats: int = 200) -> float:
    """Median microseconds of one ``non_finite_concepts`` call."""
    import torch

    from unipers.concepts.bank import ConceptBank, SlotLayout
    from unipers.training.personalize import non_finite_concepts

    bank = ConceptBank(1000, hidden, SlotLayout(8, 4, 4))
    for i in range(concepts):
        bank.add(f"c{i}")
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        assert non_finite_concepts(bank) == []
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


class StepClock:
    """Wall time of each optimizer step (end to end, as Lightning runs it)."""

    def __init__(self):
        import lightning as L

        class Clock(L.Callback):
            def __init__(self):
                self.ends = []

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.ends.append(time.perf_counter())

        self.callback = Clock()

    def per_step(self, skip: int = 5) -> float:
        ends = self.callback.ends[skip:]
        return statistics.median(b - a for a, b in zip(ends, ends[1:]))


def run_steps(concepts: list[Path], work: Path, steps: int, checks: bool) -> float:
    import lightning as L
    import torch

    from unipers.config import load_config
    from unipers.training import personalize
    from unipers.training.run import train

    clock = StepClock()
    cfg = load_config(["personalize"], [f"data.concepts=[{','.join(map(str, concepts))}]", f"run_dir={work}",
                                        f"trainer.max_steps={steps}", "trainer.val_every=0",
                                        "trainer.checkpoint_every=0", "trainer.progress_bar=false",
                                        "trainer.logger=csv", "data.batch_size=4"])
    real_step, real_isfinite = personalize.PersonalizeModule.optimizer_step, personalize.torch.isfinite
    if not checks:  # the naive way: no row check after the step, no loss check before the backward
        personalize.PersonalizeModule.optimizer_step = L.LightningModule.optimizer_step
        personalize.torch = _NoLossCheck(torch)
    try:
        train(cfg, [clock.callback])
    finally:
        personalize.PersonalizeModule.optimizer_step = real_step
        personalize.torch = torch
    assert personalize.torch.isfinite is real_isfinite
    return clock.per_step()


class _NoLossCheck:
    """torch, but ``isfinite`` says yes at once (so the loss check costs nothing)."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def isfinite(self, x):
        return self._torch.ones((), dtype=self._torch.bool)


def prepared(root: Path) -> list[Path]:
    from PIL import Image

    from unipers.data.prepare import PrepareOptions, prepare_concept

    out = []
    for name, colour in (("bo", (200, 120, 40)), ("mam", (40, 80, 200))):
        photos = root / f"{name}_photos"
        photos.mkdir()
        for i in range(6):
            im = Image.new("RGB", (96 + 8 * i, 96), colour)
            im.paste((255 - i * 30, 20 * i, 128), (10 + 5 * i, 20, 50 + 5 * i, 70))
            im.save(photos / f"p{i}.png")
        out.append(prepare_concept(photos, name, root / name, class_word="dog" if name == "bo" else "cat",
                                   options=PrepareOptions(quiet=True)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "run_checks.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    checks = {f"hidden {h}, {n} concept{'s' if n > 1 else ''}": time_row_check(h, n)
              for h in (64, 4096) for n in (1, 10)}
    arms = {"with checks": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        concepts = prepared(tmp)
        for r in range(args.repeats):
            for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):  # A B, B A: neither always first
                arms[arm].append(run_steps(concepts, tmp / f"run_{arm.replace(' ', '_')}_{r}", args.steps, arm == "with checks"))
    step = {arm: statistics.median(v) for arm, v in arms.items()}
    print("\n| row check (non_finite_concepts) | µs per step |\n|---|---|")
    for name, us in checks.items():
        print(f"| {name} | {us:.1f} |")
    print("\n| tiny model, personalize | s per step (median) |\n|---|---|")
    for arm, s in step.items():
        print(f"| {arm} | {s:.4f} |")
    print(f"\nchecks: {100 * (step['with checks'] / step['without'] - 1):+.1f}% per step on the tiny model")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                               "row_check_us": checks, "step_s": step, "runs": arms, "steps": args.steps},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
