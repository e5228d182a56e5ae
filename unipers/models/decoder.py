"""The frozen diffusion decoder: draws images from a :class:`Conditioning` and scores conditionings by the
denoising loss, so concept tokens upstream are trained through it.

Sampling is our own short classifier-free-guidance loop: ``StableDiffusionPipeline`` takes neither an
attention mask nor class labels and has no flow-matching support.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unipers.models.connector import Conditioning

Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


class DiffusionDecoder(nn.Module):
    """Frozen diffusers VAE + UNet2DConditionModel + noise scheduler from a Stable-Diffusion-format folder
    (subfolders vae/, unet/, scheduler/; text_encoder/tokenizer are never loaded).

    Frozen by construction: no parameter requires grad and ``train()`` keeps it in eval mode (Lightning
    calls ``train()`` on the whole module tree), yet gradients flow through it to the conditioning.
    ``self.scheduler`` holds the training schedule and is never stepped: each ``sample`` call builds its own.

    ``gradient_checkpointing=True``: the UNet's resnets and transformer blocks keep only their inputs for
    backward and recompute the rest there. diffusers (0.40, 0.42) checkpoints whenever grad is enabled and
    the flag is set, whatever ``training`` says, so the UNet stays entirely in eval (dropout off);
    tests/models/test_decoder_checkpointing.py fails if a release starts to require training mode.
    """

    def __init__(self, vae: nn.Module, unet: nn.Module, scheduler) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        attention: str = "sdpa", gradient_checkpointing: bool = False) -> DiffusionDecoder:
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        path = Path(path)
        for sub in ("vae", "unet", "scheduler"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"{path} is not a Stable-Diffusion-format folder: no {sub}/ subfolder")
        if attention not in ("sdpa", "xformers"):
            raise ValueError(f"unknown attention {attention!r}; valid: 'sdpa', 'xformers'")
        # Without accelerate diffusers warns on every load unless low_cpu_mem_usage is off explicitly.
        low_mem = importlib.util.find_spec("accelerate") is not None
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=low_mem)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                    low_cpu_mem_usage=low_mem)
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
        if scheduler_cls is None:
            raise ValueError(f"unknown scheduler class {scheduler_config.get('_class_name')!r} in {path}/scheduler")
        scheduler = scheduler_cls.from_config(scheduler_config)
        if attention == "xformers":
            if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
                raise RuntimeError("attention='xformers' needs the xformers package and a CUDA GPU "
                                   "(xformers has no CPU kernels); use attention='sdpa'")
            unet.enable_xformers_memory_efficient_attention()
        else:
            unet.set_attn_processor(AttnProcessor2_0())
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing(_checkpoint)
        return cls(vae, unet, scheduler)

    def train(self, mode: bool = True) -> DiffusionDecoder:
        return super().train(False)

    # ---- shapes and config ---------------------------------------------------------------------------

    @property
    def cross_attention_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def pooled_dim(self) -> int | None:
        if self.unet.config.class_embed_type == "projection":
            return self.unet.config.projection_class_embeddings_input_dim
        return None

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def is_flow_matching(self) -> bool:
        return type(self.scheduler).__name__.startswith("FlowMatch")

    @property
    def prediction_type(self) -> str:
        """"epsilon" | "v_prediction" | "sample" | "flow_matching" (velocity noise - latents)."""
        if self.is_flow_matching:
            return "flow_matching"
        return self.scheduler.config.get("prediction_type", "epsilon")

    # The UNet's first parameter, not diffusers' ModelMixin.device / .dtype: those walk the offload hooks
    # on every call (2% of a tiny personalization step).
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ---- latents ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None,
                      sample: bool = False) -> Tensor:
        """Pixels in [-1, 1] -> scaled latents; ``sample=False`` takes the posterior mean so latents can be
        cached once per image."""
        dist = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1]."""
        shift = self.vae.config.get("shift_factor") or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---- training -----------------------------------------------------------------------------------

    def loss(self, latents: Tensor, cond: Conditioning, generator: Generators = None,
             timesteps: Tensor | None = None, noise: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Denoising MSE of the frozen UNet given ``cond``; differentiable in ``cond``.

        ``generator`` may be a list, one per sample: each sample's noise and timestep then depend only on
        its own generator, not on the batch it lands in (DDP and resumed runs draw the same).
        ``reduction="none"`` gives the per-sample mean (B,). Flow-matching schedulers: ``timesteps`` are
        scheduler timesteps (sigma * num_train_timesteps).
        """
        latents = latents.to(self.device, torch.float32)
        batch = latents.shape[0]
        if noise is None:
            noise = _randn(latents.shape, generator, latents.device)
        noise = noise.to(latents)
        num_train = self.scheduler.config.num_train_timesteps
        prediction_type = self.prediction_type
        if timesteps is None:
            index = _randint(num_train, batch, generator, latents.device)
            timesteps = (self.scheduler.timesteps[index.cpu()] if self.is_flow_matching else index)
        timesteps = timesteps.to(latents.device)
        if prediction_type == "flow_matching":
            sigmas = (timesteps.float() / num_train).view(-1, *[1] * (latents.ndim - 1))
            noisy = sigmas * noise + (1 - sigmas) * latents
            target = noise - latents
        elif prediction_type in ("epsilon", "v_prediction", "sample"):
            timesteps = timesteps.long()
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            target = {"epsilon": noise, "sample": latents}.get(prediction_type)
            if target is None:
                target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: epsilon, "
                             "v_prediction, sample, and flow-matching schedulers")
        pred = self._unet(noisy, timesteps, cond)
        if reduction == "none":
            return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return F.mse_loss(pred.float(), target.float())

    def _unet(self, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        if self.pooled_dim is not None and cond.pooled is None:
            raise ValueError(f"this UNet takes a pooled vector of size {self.pooled_dim} (projection class "
                             "embedding) but the conditioning has none; give the connector pooled_dim")
        cond = cond.to(self.device, self.dtype)
        return self.unet(latents.to(self.dtype), timesteps, encoder_hidden_states=cond.embeds,
                         encoder_attention_mask=cond.mask,
                         class_labels=cond.pooled if self.pooled_dim is not None else None).sample

    # ---- sampling -----------------------------------------------------------------------------------

    def make_sampler(self, name: str | None = None):
        """A fresh scheduler for sampling: "ddim" (default) | "euler" | "dpm" | "ddpm"; flow-matching bases
        keep their own scheduler (None or "euler")."""
        import diffusers

        if self.is_flow_matching:
            if name not in (None, "euler"):
                raise ValueError(f"sampler {name!r} does not fit flow-matching scheduler "
                                 f"{type(self.scheduler).__name__}; use None or 'euler'")
            return type(self.scheduler).from_config(self.scheduler.config)
        key = name or "ddim"
        if key not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
        return getattr(diffusers, SAMPLERS[key]).from_config(self.scheduler.config)

    @torch.no_grad()
    def sample(self, cond: Conditioning, uncond: Conditioning | None = None, *, num_steps: int = 25,
               guidance: float = 5.0, generator: Generators = None, height: int | None = None,
               width: int | None = None, scheduler: str | None = None, batched_cfg: bool = True) -> Tensor:
        """Images in [0, 1], (B, 3, H, W). ``generator`` may be a list (one per sample), so a batch gives
        the same images as one call per sample. ``uncond`` may be a batch of one; guidance <= 1 skips it."""
        batch = cond.batch_size
        height, width = height or self.image_size, width or self.image_size
        scale = self.vae_scale_factor
        if height % scale or width % scale:
            raise ValueError(f"height and width must be multiples of {scale}; got {height}x{width}")
        use_cfg = guidance > 1.0
        if use_cfg:
            if uncond is None:
                raise ValueError("guidance > 1 needs an uncond conditioning (or pass guidance <= 1)")
            uncond = uncond.expand(batch)
        sampler = self.make_sampler(scheduler)
        sampler.set_timesteps(num_steps, device=self.device)
        shape = (batch, self.latent_channels, height // scale, width // scale)
        latents = _randn(shape, generator, self.device) * (getattr(sampler, "init_noise_sigma", None) or 1.0)
        both = Conditioning.cat([uncond, cond]) if use_cfg and batched_cfg else None
        step_generator = list(generator) if isinstance(generator, Sequence) else generator
        for t in sampler.timesteps:
            model_in = latents
            if hasattr(sampler, "scale_model_input"):
                model_in = sampler.scale_model_input(latents, t)
            if not use_cfg:
                pred = self._unet(model_in, t, cond)
            else:
                if both is not None:
                    pred_uncond, pred_cond = self._unet(torch.cat([model_in] * 2), t, both).chunk(2)
                else:
                    pred_uncond, pred_cond = self._unet(model_in, t, uncond), self._unet(model_in, t, cond)
                pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            latents = sampler.step(pred.float(), t, latents, generator=step_generator).prev_sample
        return self.decode_latents(latents)


def _checkpoint(module: nn.Module, *args):
    """diffusers' default checkpoint function, spelled out so no diffusers release can swap it: non-reentrant
    (the reentrant one warns on the first blocks, whose inputs do not depend on the conditioning), and at
    module level so the UNet still pickles."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module.__call__, *args, use_reentrant=False)


def _randint(high: int, batch: int, generator: Generators, device: torch.device) -> Tensor:
    """`batch` integers in [0, high), drawn like `_randn`: per sample when given a list of generators."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, high, (batch,), generator=generator, device=gen_device)
    generator = list(generator)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=g.device).cpu() for g in generator])


def _randn(shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """Noise drawn on the generator's device (CPU for a CPU generator) and moved, so a seed gives the same
    noise on any device; a list of generators draws each sample from its own."""
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    generator = list(generator)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device)
                      for g in generator])
