"""unipers: personalize a unified multimodal model (Chameleon-style AR + diffusion decoder) with a few
soft concept tokens shared by understanding and generation.

Heavy libraries (torch, transformers, diffusers, lightning) are imported lazily by the modules that need
them, so ``unipers --help`` stays fast.
"""

__version__ = "0.1.0"
