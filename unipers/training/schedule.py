"""Stage schedules: a recipe is a list of stages, each naming which slot groups train, which losses
apply, how the data is mixed, and for how many steps.

    schedule = Schedule(cfg.personalize.schedule, max_steps=cfg.trainer.max_steps)
    schedule.at(step)            # the StageConfig in force at an optimizer step
    schedule.lr_factor(step)     # warm-up + cosine, restarted at each stage
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from unipers.config import ConfigError, StageConfig
from unipers.data.collate import StageFormat


def warmup_cosine(step: int, total: int, *, ramp: int = 0, delay: int = 0, floor: float = 0.0) -> float:
    """The LR multiplier at `step` of `total`: a linear ramp ``(step + 1) / ramp`` up to 1, times a cosine from
    1 down to `floor` that starts after `delay` steps (``floor=1``: constant after the ramp).

    ``ramp=W, delay=W`` warms up, then decays over the rest; ``delay=0`` decays from step 0 under the ramp."""
    warm = min(1.0, (step + 1) / ramp) if ramp else 1.0
    progress = min(1.0, max(0, step - delay) / max(1, total - delay))
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Schedule:
    def __init__(self, stages: Sequence[StageConfig], max_steps: int, *, warmup_steps: int = 0,
                 lr_schedule: str = "cosine"):
        self.stages = list(stages)
        self.starts: list[int] = []
        self.ends: list[int] = []
        step = 0
        for i, stage in enumerate(self.stages):
            length = stage.steps if stage.steps > 0 else max_steps - step
            if length <= 0:
                raise ConfigError(
                    f"stage {stage.name!r} gets no steps: stages before it take {step} of trainer.max_steps={max_steps}")
            self.starts.append(step)
            step += length
            self.ends.append(step)
        if step != max_steps:
            names = ", ".join(f"{s.name}={e - b}" for s, b, e in zip(self.stages, self.starts, self.ends))
            raise ConfigError(f"the stages ({names}) add up to {step} steps, not trainer.max_steps={max_steps}; "
                              "give the last stage steps: 0 to take the rest")
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule

    def index_at(self, step: int) -> int:
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.stages) - 1

    def at(self, step: int) -> StageConfig:
        return self.stages[self.index_at(step)]

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak LR: linear warm-up, then cosine to 10% (or constant), restarted in every
        stage."""
        i = self.index_at(step)
        floor = 1.0 if self.lr_schedule == "constant" else 0.1
        return warmup_cosine(step - self.starts[i], self.ends[i] - self.starts[i], ramp=self.warmup_steps + 1,
                             delay=self.warmup_steps, floor=floor)

    def formats(self) -> list[StageFormat]:
        return [StageFormat(self_prompting=s.self_prompting, image_tokens=s.losses.image_tokens > 0)
                for s in self.stages]

    def task_stages(self, default: Mapping[str, float]) -> list[tuple[int, dict[str, float]]]:
        """(first step, task weights) per stage, for the MixtureSampler. Tasks whose loss is off drop out."""
        out = []
        for stage, start in zip(self.stages, self.starts):
            weights = dict(stage.tasks if stage.tasks is not None else default)
            if stage.losses.understanding <= 0:
                weights = {t: w for t, w in weights.items() if t == "generation"}
            if stage.losses.diffusion <= 0 and stage.losses.image_tokens <= 0:
                weights.pop("generation", None)
            out.append((start, weights))
        return out
