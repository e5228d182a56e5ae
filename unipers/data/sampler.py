"""MixtureSampler: multi-task batches with set mixing ratios, sharded over DDP ranks, resumable.

Each epoch draws `num_samples` indices: a task by its weight, then the next sample of that task from a
per-task shuffle (tasks cycle, so a small task is repeated rather than starving the mix). Everything is
a function of (seed, epoch), and the sampler's state (epoch, position) goes into Lightning checkpoints
through torchdata's StatefulDataLoader, so a resumed run replays exactly the batches it had not seen.

With `stages` (a list of (first_step, weights)) and `samples_per_step` (global batch), the weights change
with the optimizer step a draw will land in, and the sampler yields (index, stage) pairs so the collator
can format each sample for its stage (e.g. self-prompting). Training runs use one epoch of
max_steps x global batch draws, so stage boundaries and resumes never meet an epoch boundary.
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Sequence

from torch.utils.data import Sampler


class MixtureSampler(Sampler[int]):
    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float], *, num_samples: int | None = None,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 stages: Sequence[tuple[int, Mapping[str, float]]] | None = None, samples_per_step: int = 1):
        self.by_task: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            self.by_task.setdefault(task, []).append(i)
        self.yield_stage = stages is not None
        self.stages = [(int(first), self._clean(w)) for first, w in (stages or [(0, weights)])]
        self.weights = self.stages[0][1]
        self.samples_per_step = samples_per_step
        total = num_samples if num_samples is not None else len(tasks)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.per_rank = max(1, -(-total // num_replicas))  # ceil: every rank gets the same count
        self.epoch = 0
        self.position = 0  # indices of this epoch already yielded on this rank

    def _clean(self, weights: Mapping[str, float]) -> dict[str, float]:
        unknown = set(weights) - {"recognition", "qa", "vqa", "caption", "generation"}
        if unknown:
            raise ValueError(f"task weights name unknown task(s): {', '.join(sorted(unknown))}")
        # Tasks with no samples drop out; the remaining weights are renormalised.
        kept = {t: float(w) for t, w in weights.items() if w > 0 and t in self.by_task}
        if not kept:
            have = ", ".join(sorted(self.by_task)) or "none"
            raise ValueError(f"no task has both samples and a positive weight (tasks present: {have})")
        return kept

    def stage_at(self, draw: int) -> int:
        """Index of the stage the `draw`-th sample of an epoch trains in."""
        step = draw // self.samples_per_step
        return max(i for i, (first, _) in enumerate(self.stages) if first <= step or i == 0)

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def epoch_indices(self, epoch: int) -> list[tuple[int, int]]:
        """All ranks' (index, stage) draws for `epoch` (this rank takes every num_replicas-th)."""
        rng = random.Random(f"{self.seed}/{epoch}")
        queues: dict[str, list[int]] = {t: [] for t in self.by_task}
        out = []
        for draw in range(self.per_rank * self.num_replicas):
            stage = self.stage_at(draw)
            weights = self.stages[stage][1]
            names = sorted(weights)
            task = rng.choices(names, weights=[weights[t] for t in names])[0]
            if not queues[task]:
                queues[task] = rng.sample(self.by_task[task], len(self.by_task[task]))
            out.append((queues[task].pop(), stage))
        return out

    def __iter__(self) -> Iterator:
        mine = self.epoch_indices(self.epoch)[self.rank::self.num_replicas]
        start = self.position
        for i in range(start, len(mine)):
            self.position = i + 1
            yield mine[i] if self.yield_stage else mine[i][0]
        # A finished epoch moves on by itself, so a loop that never calls set_epoch still varies the order.
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
