"""unipers: personalize a unified multimodal model (Chameleon-style AR + diffusion decoder) with a few
soft concept tokens shared by understanding and generation.

    from unipers import InferenceSession, UnifiedModel, load_config, train

The names below are imported on first use, so ``import unipers`` and ``unipers --help`` stay fast (no
torch, transformers, diffusers or lightning until a model is built).
"""

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "unipers.config",
    "ConfigError": "unipers.config",
    "load_config": "unipers.config",
    "SlotLayout": "unipers.concepts.bank",
    "UnifiedModel": "unipers.models.unified",
    "InferenceSession": "unipers.inference.session",
    "GenerationOutput": "unipers.inference.session",
    "train": "unipers.training.run",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unipers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
