"""Inference: ask, recognize, generate with any number of concepts loaded over one base.

Names are imported lazily, so `unipers ask --help` does not import torch.
"""

__all__ = ["GenerationSettings", "InferenceSession", "InputError"]


def __getattr__(name: str):
    if name in __all__:
        from unipers.inference import session

        return getattr(session, name)
    raise AttributeError(f"module 'unipers.inference' has no attribute {name!r}")
