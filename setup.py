"""unipers: personalize a unified multimodal model with a few soft concept tokens."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "unipers" / "__init__.py").read_text(), version)

setup(
    name="unipers",
    version=version["__version__"],
    description="Personalize a Chameleon-style AR model and a diffusion decoder with one set of concept tokens",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    # The pins' lower ends (transformers 5.20, diffusers 0.40, torch 2.14) support 3.10; later releases of
    # transformers and diffusers need 3.11, and pip picks what the interpreter allows.
    python_requires=">=3.10",
    # The top-level configs/ ships inside the package as unipers/configs (unipers.paths.config_dir), so an
    # installed wheel loads `load_config(["personalize"])` without a checkout.
    packages=find_packages(include=["unipers", "unipers.*"]) + ["unipers.configs"],
    package_dir={"unipers.configs": "configs"},
    package_data={"unipers.configs": ["*.yaml", "*/*.yaml"], "unipers.models": ["presets/*.json", "presets/*.md"]},
    install_requires=[
        # A matching pair: the registry's default (CUDA) builds also run on CPU-only machines, and
        # torchvision's operators do not load against the CPU-only torch 2.13 wheel (DESIGN.md).
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "lightning>=2.6,<2.7",
        "torchdata>=0.11",
        "transformers>=5.20,<6",
        "tokenizers>=0.22",
        "diffusers>=0.40,<0.50",
        "peft>=0.17",  # LoRA on the decoder in the align stage (through diffusers' add_adapter)
        "omegaconf>=2.4",  # register_resolver (the ${cache:...} paths)
        "einops>=0.8",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",  # unipers eval --run: metrics against training step
    ],
    extras_require={
        "dev": ["pytest>=8"],
        # Loggers the configs offer besides CSV (trainer.logger).
        "tensorboard": ["tensorboard>=2.16"],
        "wandb": ["wandb>=0.17"],
        # GPU-only attention kernels; PyTorch SDPA is the default everywhere.
        "xformers": ["xformers>=0.0.30"],
    },
    entry_points={"console_scripts": ["unipers=unipers.cli:main"]},
)
