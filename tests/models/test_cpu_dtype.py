"""bfloat16 on a CPU without bf16 kernels loads as float32, with one line saying so; UNIPERS_CPU_BF16
overrides the detection both ways."""

import pytest
import torch

from unipers.config import ConfigError, load_config
from unipers.models import backbone as bb

REQUESTED = {"backbone.dtype": "bfloat16", "decoder.dtype": "bfloat16"}


@pytest.fixture
def cpu(monkeypatch):
    """A CPU-only machine whose bf16 support the test sets: cpu(True) / cpu(False)."""
    monkeypatch.delenv(bb.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(bb, "runs_on_cpu", lambda: True)

    def set_support(supported: bool):
        monkeypatch.setattr(bb, "cpu_bf16_supported", lambda: supported)

    return set_support


def test_without_bf16_kernels_bfloat16_loads_as_float32_with_one_line(cpu, capsys):
    cpu(False)
    got = bb.load_dtypes({**REQUESTED, "decoder.dtype": "float16"})
    assert got == {"backbone.dtype": "float32", "decoder.dtype": "float16"}  # only bf16 is the CPU's problem
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backbone.dtype=bfloat16" in err and "UNIPERS_CPU_BF16=1" in err


def test_with_bf16_kernels_bfloat16_stays(cpu, capsys):
    cpu(True)
    assert bb.load_dtypes(REQUESTED) == REQUESTED
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("supported", "env", "expected"), [(False, "1", "bfloat16"), (True, "0", "float32")])
def test_the_environment_overrides_the_detection(cpu, monkeypatch, supported, env, expected):
    cpu(supported)
    monkeypatch.setenv(bb.CPU_BF16_ENV, env)
    assert set(bb.load_dtypes(REQUESTED).values()) == {expected}


def test_a_bad_override_is_a_one_line_config_error(cpu, monkeypatch):
    cpu(False)
    monkeypatch.setenv(bb.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="UNIPERS_CPU_BF16='yes'"):
        bb.load_dtypes(REQUESTED)


def test_on_a_gpu_machine_nothing_changes(monkeypatch, capsys):
    monkeypatch.setattr(bb, "runs_on_cpu", lambda: False)
    monkeypatch.setattr(bb, "cpu_bf16_supported", lambda: False)
    assert bb.load_dtypes(REQUESTED) == REQUESTED and capsys.readouterr().err == ""


def test_the_detection_answers_here_and_avx2_kernels_count_as_no_bf16(monkeypatch):
    assert isinstance(bb.cpu_bf16_supported(), bool)  # this machine's real answer, whichever it is
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert bb.cpu_bf16_supported() is False


@pytest.mark.parametrize("supported", [False, True])
def test_from_config_applies_the_rule_to_both_models(cpu, tiny_dirs, supported, capsys):
    from unipers.models.unified import UnifiedModel

    cpu(supported)
    model = UnifiedModel.from_config(load_config([], ["backbone.dtype=bfloat16", "decoder.dtype=bfloat16"]))
    want = torch.bfloat16 if supported else torch.float32
    assert model.backbone.model.lm_head.weight.dtype == want
    assert model.decoder.dtype == want and model.decoder.vae.dtype == want
    assert ("load as float32" in capsys.readouterr().err) is not supported
