"""The trainable state a Lightning checkpoint holds, checked before a resumed run trusts it."""

from __future__ import annotations

from typing import Iterable

import torch

from unipers.errors import UnipersError


class CheckpointError(UnipersError):
    """A checkpoint whose trainable state does not fit this run; the message names the file and the key."""


def check_trainable_state(module: torch.nn.Module, state: dict, names: Iterable[str], path: object) -> None:
    """`state` must hold exactly `names` (the module's trainable tensors), each with its parameter's shape, a
    floating dtype and finite values; else CheckpointError naming `path` and the key. Run before loading:
    a tensor of another shape would fail deep in load_state_dict, a NaN one would train on."""
    params = dict(module.named_parameters())
    names = set(names)
    missing, extra = sorted(names - set(state)), sorted(set(state) - names)
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} trained tensor(s), e.g. {missing[0]} (saved by "
                              "another configuration of this run?)")
    if extra:
        raise CheckpointError(f"{path}: holds {len(extra)} tensor(s) this run does not train, e.g. {extra[0]}")
    for key in sorted(names):
        value, want = state[key], params[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{path}: {key} is {getattr(value, 'dtype', type(value).__name__)}, not a float tensor")
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, this run {tuple(want.shape)}")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds non-finite values")


def check_checkpoint(module, path) -> None:
    """Read the checkpoint at `path` and run ``module.check_checkpoint`` on it: before the run writes its
    config or logs, so a damaged checkpoint leaves the run folder as it was."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    module.check_checkpoint(checkpoint, path)
