"""CPU threads for training and running small models.

    from unipers.runtime import cpu_threads, threads_for
    with cpu_threads(threads_for(setting=0, n_params=model_size)):
        trainer.fit(...)

A small model's ops (the demo world's 4-layer, 128-wide base; the embedded tiny models) take microseconds.
Split over several intra-op threads, every op ends at a barrier where the threads wait for each other; when
another process holds one of the cores, that wait lasts a scheduler time slice, and a run slows several
times over (``benchmarks/bench_contention.py``: 2.8x with one competing process on 2 cores). One thread
has no barrier: it slows 1.1x beside the same competitor, and its results do not depend on the machine's
core count (float sums are split differently over 1, 2 or 16 threads, so each count rounds differently).
Large models keep torch's default (one thread per core), where the work per op dwarfs the barrier.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

SMALL_MODEL_PARAMS = 50_000_000
"""Below this many parameters (trainable and frozen), a CPU run uses one intra-op thread."""


def threads_for(setting: int, n_params: int) -> Optional[int]:
    """Intra-op threads for a CPU run: ``setting`` when it is positive; for 0 (auto), 1 for a model under
    ``SMALL_MODEL_PARAMS`` parameters and None (torch's default) above."""
    if setting < 0:
        raise ValueError(f"cpu threads must be 0 (auto) or positive, not {setting}")
    if setting:
        return setting
    return 1 if n_params < SMALL_MODEL_PARAMS else None


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: leave torch's setting), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_description() -> dict:
    """The CPU a result came from: its model name and the instruction set torch's kernels use. Float
    rounding in matmuls and convolutions differs between instruction sets (AVX2, AVX-512, AMX), so a model
    trained from scratch comes out differently on each; a figure is quoted with the CPU it came from."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"model": name, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
