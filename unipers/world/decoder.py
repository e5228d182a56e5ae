"""Training the tiny world's decoder side: its VAE (before align), and the attribute classifier that
judges generated images.

The UNet and the connector are trained afterwards by the project's own align stage
(``unipers.training.run.run_align`` with ``align.train_decoder=blocks`` over every UNet block).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unipers.world.synth import ATTRIBUTES
from unipers.world.tokenizer import Progress, world_lr


def train_vae(vae, pixels: Tensor, *, steps: int = 800, batch_size: int = 64, lr: float = 2e-3, kl_weight: float = 1e-6,
              seed: int = 0, progress: Progress | None = None) -> dict:
    """Fit a diffusers AutoencoderKL to ``pixels`` (N, 3, H, W in [-1, 1]); then set its ``scaling_factor``
    so scaled latents have unit variance (as Stable Diffusion's 0.18215 does for its VAE)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: world_lr(s, steps, ramp=50))
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=g)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(g)).sample
        rec = F.mse_loss(recon, x)
        loss = rec + kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step, {"mse": rec.item()})
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        sample = pixels[:512]
        latents = vae.encode(sample).latent_dist.mean
        mse = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1), sample).item()
        scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]
    return {"reconstruction_psnr_db": psnr, "scaling_factor": scale}


class AttributeClassifier(nn.Module):
    """A small CNN: a 32x32 image in [0, 1] -> logits for shape, colour and pattern (concatenated)."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.sizes = [len(v) for v in ATTRIBUTES.values()]
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 256), nn.GELU(), nn.Linear(256, sum(self.sizes)),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2 - 1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, 3) predicted attribute indices."""
        logits = self(images).split(self.sizes, dim=1)
        return torch.stack([part.argmax(1) for part in logits], 1)

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        logits = self(images).split(self.sizes, dim=1)
        return sum(F.cross_entropy(part, labels[:, k]) for k, part in enumerate(logits))


def _degrade(x: Tensor, g: torch.Generator) -> Tensor:
    """Blur and noise of random strength, so generated (softer, noisier) images are judged fairly."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    amount = torch.rand(b, 1, 1, 1, generator=g)
    noise = torch.randn(x.shape, generator=g) * 0.04 * torch.rand(b, 1, 1, 1, generator=g)
    return (x + amount * (blurred - x) + noise).clamp(0, 1)


def train_classifier(images: Tensor, labels: Tensor, held_images: Tensor, held_labels: Tensor, *, steps: int = 600,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: Progress | None = None) -> tuple[AttributeClassifier, dict]:
    """Train on ``images`` (N, 3, H, W in [0, 1]) and report per-attribute accuracy on the held-out set."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = AttributeClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: world_lr(s, steps))
    clf.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = clf.loss(_degrade(images[idx], g), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step, {"loss": loss.item()})
    clf.eval().requires_grad_(False)
    pred = torch.cat([clf.predict(held_images[i:i + 512]) for i in range(0, len(held_images), 512)])
    acc = (pred == held_labels).float().mean(0)
    return clf, {"held_out_accuracy": dict(zip(ATTRIBUTES, acc.tolist()))}


def save_classifier(clf: AttributeClassifier, path) -> None:
    from unipers.io import save_safetensors_atomic

    save_safetensors_atomic(dict(clf.state_dict()), path, metadata={"unipers.format": "world-classifier-v1"})


def load_classifier(path) -> AttributeClassifier:
    from safetensors.torch import load_file

    clf = AttributeClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.eval().requires_grad_(False)
