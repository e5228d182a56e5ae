"""CPU threads: small models train with one intra-op thread (a busy machine cannot stall their barriers,
and the result does not depend on the core count); the setting is restored afterwards."""

import pytest
import torch

from unipers.config import ConfigError, load_config
from unipers.runtime import SMALL_MODEL_PARAMS, cpu_description, cpu_threads, threads_for


def test_threads_for_small_and_large_models():
    assert threads_for(0, 10_000) == 1
    assert threads_for(0, SMALL_MODEL_PARAMS) is None  # torch's default: one per core
    assert threads_for(3, 10_000) == threads_for(3, 10 * SMALL_MODEL_PARAMS) == 3
    with pytest.raises(ValueError, match="-1"):
        threads_for(-1, 10)


def test_cpu_threads_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with cpu_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before


def test_a_negative_thread_count_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.cpu_threads"):
        load_config([], ["trainer.cpu_threads=-2"])


def test_cpu_description_names_the_kernels():
    info = cpu_description()
    assert info["model"] and info["torch_capability"] == torch.backends.cpu.get_cpu_capability()
