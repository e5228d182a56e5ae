"""GPU paths, marked ``gpu``: each selects itself by what the machine has and skips cleanly elsewhere.

    python -m pytest -m gpu -q          # on a CUDA machine
    python -m pytest --collect-only -q -m gpu

On a CPU-only machine every test here skips with the reason. Lightning runs FSDP only on CUDA ("The
strategy `fsdp` requires a GPU accelerator"), so the FSDP test needs two GPUs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from unipers.config import load_config
from unipers.training.run import train

CONFIGS = Path(__file__).parents[2] / "configs"
FAST = ["trainer.progress_bar=false", "trainer.val_every=0", "trainer.checkpoint_every=0", "trainer.logger=csv",
        "personalize.warmup_steps=0", "trainer.max_steps=4"]


def run_if(*, gpus: int = 1, bf16: bool = False, xformers: bool = False):
    """The marks that select a test by what the machine has (litgpt's ``_RunIf`` pattern)."""
    count = torch.cuda.device_count()
    reasons = []
    if count < gpus:
        reasons.append(f"needs {gpus} CUDA GPU(s), found {count}")
    elif bf16 and not torch.cuda.is_bf16_supported():
        reasons.append("needs a GPU with bfloat16")
    if xformers and importlib.util.find_spec("xformers") is None:
        reasons.append("needs xformers (pip install 'unipers[xformers]')")
    return [pytest.mark.gpu, pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))]


def apply(marks):
    def wrap(fn):
        for mark in marks:
            fn = mark(fn)
        return fn
    return wrap


def cfg_for(run_dir, concepts, *extra):
    return load_config([CONFIGS / "personalize.yaml"],
                       [f"data.concepts=[{','.join(map(str, concepts))}]", f"run_dir={run_dir}", *FAST, *extra])


class Snapshots(L.Callback):
    """The concept rows and the frozen base at the start and the end of training."""

    def _take(self, module):
        return ({k: v.detach().float().cpu().clone() for k, v in module.model.bank.state_dict().items()},
                {k: v.detach().float().cpu().clone() for k, v in module.model.backbone.model.state_dict().items()})

    def on_train_start(self, trainer, module):
        self.start = self._take(module)

    def on_train_end(self, trainer, module):
        self.end = self._take(module)


@apply(run_if(gpus=1, bf16=True))
def test_bf16_mixed_personalize_moves_exactly_the_concept_rows(prepared_concepts, tmp_path, tiny_dirs):
    snap = Snapshots()
    train(cfg_for(tmp_path / "run", prepared_concepts, "trainer.accelerator=gpu", "trainer.devices=1",
                  "trainer.precision=bf16-mixed"), [snap])
    (rows0, base0), (rows1, base1) = snap.start, snap.end
    for concept in ("bo", "mam"):
        assert any(not torch.equal(rows0[k], rows1[k]) for k in rows0 if f".{concept}." in k), concept
    assert all(torch.isfinite(v).all() for v in rows1.values())
    assert all(torch.equal(base0[k], base1[k]) for k in base0)  # the base: bit-identical


@apply(run_if(gpus=1, xformers=True))
def test_xformers_samples_equal_sdpa(concept_files):
    from unipers.inference import InferenceSession

    images = {}
    for attention in ("sdpa", "xformers"):
        session = InferenceSession.from_config(load_config([], [f"decoder.attention={attention}"]), device="cuda")
        session.load(concept_files["bo"])
        out = session.generate(["A photo of <bo> on a beach."], num_images=2, seed=3, steps=10)
        images[attention] = out.tensors.float().cpu()
    assert torch.allclose(images["sdpa"], images["xformers"], atol=2e-2)


@apply(run_if(gpus=2))
def test_fsdp_rows_equal_ddp_rows(prepared_concepts, tmp_path, tiny_dirs):
    rows = {}
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        args = [str(CONFIGS / "personalize.yaml"), f"data.concepts=[{','.join(map(str, prepared_concepts))}]",
                f"run_dir={run}", *FAST, "trainer.accelerator=gpu", "trainer.devices=2",
                f"trainer.strategy={strategy}", "data.batch_size=2"]
        done = subprocess.run([sys.executable, "-m", "unipers.cli", "train", *args], capture_output=True, text=True,
                              env=dict(os.environ), timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        rows[strategy] = load_file(run / "concepts" / "last.safetensors")
    assert rows["ddp"].keys() == rows["fsdp"].keys()
    for key in rows["ddp"]:
        assert torch.allclose(rows["ddp"][key], rows["fsdp"][key], atol=1e-5, rtol=1e-4), key


RECIPE_GB = 19.6
"""docs/gpu.md's recipe: the 32-layer Anole-7B + SD1.5 personalize step at batch 1, bf16, both
checkpointing switches on (weights 16.0 GB, activations 2.1 GB, 1.5 GB margin)."""


@apply(run_if(gpus=1, bf16=True))
def test_realshape_step_peak_memory_is_under_the_recipe(prepared_concepts, tmp_path):
    """One personalize step at the real widths (Anole-7B with 1 decoder layer, SD1.5) on the shipped configs:
    its peak GPU memory is under the recipe's 32-layer figure less the 31 layers' weights it does not hold."""
    from unipers.models.realshape import build_realshape_backbone, build_realshape_decoder

    backbone = build_realshape_backbone(tmp_path / "anole-7b", "anole-7b", num_layers=1)
    decoder = build_realshape_decoder(tmp_path / "sd15", "sd15")
    layer = load_file(backbone / "model.safetensors")
    layer_bytes = sum(v.numel() * 2 for k, v in layer.items() if ".layers.0." in k)  # bf16
    del layer
    torch.cuda.reset_peak_memory_stats()
    cfg = load_config([CONFIGS / "personalize.yaml", CONFIGS / "backbone" / "anole-7b.yaml",
                       CONFIGS / "decoder" / "sd15.yaml"],
                      [f"backbone.path={backbone}", f"decoder.path={decoder}",
                       f"data.concepts=[{prepared_concepts[0]}]", f"run_dir={tmp_path / 'run'}", *FAST,
                       "trainer.max_steps=1", "data.batch_size=1", "trainer.accelerator=gpu", "trainer.devices=1"])
    train(cfg)
    peak = torch.cuda.max_memory_allocated()
    bound = RECIPE_GB * 1e9 - 31 * layer_bytes
    print(f"realshape step (1 layer): peak {peak / 1e9:.2f} GB, bound {bound / 1e9:.2f} GB")
    assert peak < bound
