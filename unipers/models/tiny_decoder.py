"""A random tiny Stable-Diffusion-format decoder folder, for tests and the tiny demo world.

It is written with ``save_pretrained`` and read back through ``DiffusionDecoder.from_pretrained``, the same
path a real checkpoint takes. UNet attention runs only at 8x8 and in the mid block: at 32x32 and 16x16 it
costs seconds per step on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_matching")


def build_tiny_decoder(out_dir: str | Path, *, cross_attention_dim: int = 64, pooled_dim: int | None = 64,
                       image_size: int = 32, seed: int = 0, prediction_type: str = "epsilon",
                       vae_attention: bool = True, vae_channels: tuple[int, ...] = (32, 64),
                       latent_channels: int = 4, unet_channels: tuple[int, int] = (32, 64)) -> Path:
    """Write vae/, unet/, scheduler/ and model_index.json to ``out_dir``; same seed -> bit-identical weights.

    ``prediction_type="flow_matching"`` writes a FlowMatchEulerDiscreteScheduler instead of DDPM.
    ``vae_attention=False`` drops the VAE's mid-block attention (16x16 tokens: most of a CPU training step).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    vae_channels = tuple(vae_channels)
    scale = 2 ** (len(vae_channels) - 1)
    if image_size % (scale * 2):
        raise ValueError(f"image_size must be a multiple of {scale * 2} (VAE downsamples x{scale}, UNet x2)")
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            layers_per_block=1, norm_num_groups=8, sample_size=image_size, mid_block_add_attention=vae_attention,
        )
        unet = UNet2DConditionModel(
            sample_size=image_size // scale, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=tuple(unet_channels), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, cross_attention_dim=cross_attention_dim,
            class_embed_type="projection" if pooled_dim is not None else None,
            projection_class_embeddings_input_dim=pooled_dim,
        )
    if prediction_type == "flow_matching":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False, prediction_type=prediction_type)
    vae.save_pretrained(out_dir / "vae")
    unet.save_pretrained(out_dir / "unet")
    scheduler.save_pretrained(out_dir / "scheduler")
    _write_model_index(out_dir, type(scheduler).__name__)
    return out_dir


def _write_model_index(out_dir: Path, scheduler_class: str) -> None:
    # Written by hand: building a StableDiffusionPipeline to save it would import CLIP from transformers.
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
