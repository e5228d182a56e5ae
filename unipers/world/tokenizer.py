"""The tiny world's image tokenizer: Chameleon's VQ encoder trained on the world, and the image-token
embeddings of the AR model tied to its codebook.

A random frozen Chameleon VQ encoder is not a tokenizer (attribute probes on its codes sit near chance).
So the encoder is first trained *without* quantization, with an attribute head (shape, colour, pattern)
and a per-token regression of its patch's pixels (8x8 in the world: 16 tokens per image), and the
codebook is then fitted to the encoder's outputs by k-means. ``get_image_tokens`` of the saved model then
gives meaningful codes through the unchanged transformers code path.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unipers.world.synth import ATTRIBUTES, WorldObject

Progress = Callable[[int, dict], None]


def world_lr(step: int, steps: int, *, ramp: int = 0) -> float:
    """The LR multiplier of the world's own training loops (tokenizer, VAE, judge): a linear ramp over `ramp`
    steps times a cosine to zero. The same curve as ``training.schedule.warmup_cosine(step, steps, ramp=ramp)``
    but with the angle rounded as ``pi * step / steps``: the world's weights, and so every demo figure, depend
    on those last bits, so the world keeps its own rounding."""
    warm = min(1.0, (step + 1) / ramp) if ramp else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * step / steps))


def to_pixels(images: np.ndarray, image_processor=None) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float: the Chameleon processor's rescale and normalisation when
    ``image_processor`` is given (its output for same-size images), else plain [-1, 1] (the decoder's)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if image_processor is None:
        return x / 127.5 - 1.0
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (x * image_processor.rescale_factor - mean) / std


def label_tensor(objects: Sequence[WorldObject]) -> Tensor:
    return torch.tensor([o.labels() for o in objects], dtype=torch.long)


# ---- image tokenizer --------------------------------------------------------------------------------------

class _TokenizerHeads(nn.Module):
    """Training-time heads on the VQ encoder's (B, D, h, w) outputs; thrown away after training."""

    def __init__(self, dim: int, patch: int, positions: int):
        super().__init__()
        # Reads every position (not a pooled vector), so the codes must carry where the object's parts are.
        self.attributes = nn.Linear(dim * positions, sum(len(v) for v in ATTRIBUTES.values()))
        self.patch = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 3 * patch * patch))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.attributes(z.flatten(1)), self.patch(z.permute(0, 2, 3, 1))


def _attribute_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the three attributes, and per-attribute accuracy (3,)."""
    loss, acc, start = 0.0, [], 0
    for k, values in enumerate(ATTRIBUTES.values()):
        part = logits[:, start:start + len(values)]
        loss = loss + F.cross_entropy(part, labels[:, k])
        acc.append((part.argmax(1) == labels[:, k]).float().mean())
        start += len(values)
    return loss, torch.stack(acc)


def _patches(pixels: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) -> (B, H/p, W/p, 3*p*p) target pixels of each token's patch."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // patch, w // patch, c * patch * patch)


def kmeans(x: Tensor, k: int, *, iters: int = 25, seed: int = 0) -> Tensor:
    """k-means++ initialised Lloyd iterations on (N, D) float rows -> (k, D) centroids (empty ones re-seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centroids = x[torch.randint(n, (1,), generator=g)]
    closest = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        pick = torch.multinomial(closest / closest.sum(), 1, generator=g)
        centroids = torch.cat([centroids, x[pick]])
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = x[torch.randint(n, (int(empty.sum()),), generator=g)]
    return centroids


def train_image_tokenizer(model, pixels: Tensor, labels: Tensor, *, steps: int = 700, batch_size: int = 64,
                          lr: float = 2e-3, patch_weight: float = 4.0, seed: int = 0,
                          progress: Progress | None = None) -> dict:
    """Train ``model.model.vqmodel``'s encoder (no quantization), then set its codebook by k-means.

    ``pixels`` (N, 3, H, W) in [-1, 1], ``labels`` (N, 3) attribute indices. Returns training figures."""
    vq = model.model.vqmodel
    codebook = vq.quantize.embedding.weight
    encoder = nn.Sequential(vq.encoder, vq.quant_conv)
    side = pixels.shape[-1]
    with torch.no_grad():
        tokens_side = encoder(pixels[:1]).shape[-1]
    patch = side // tokens_side
    torch.manual_seed(seed)
    heads = _TokenizerHeads(codebook.shape[1], patch, tokens_side ** 2)
    params = [*encoder.parameters(), *heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: world_lr(s, steps, ramp=50))
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    acc = torch.zeros(3)
    for step in range(steps):
        idx = torch.randint(len(pixels), (batch_size,), generator=g)
        x = pixels[idx]
        z = encoder(x)
        logits, patches = heads(z)
        attr_loss, acc_now = _attribute_loss(logits, labels[idx])
        patch_loss = F.mse_loss(patches, _patches(x, patch))
        loss = attr_loss + patch_weight * patch_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = 0.9 * acc + 0.1 * acc_now.detach() if step else acc_now.detach()
        if progress:
            progress(step, {"loss": loss.item(), "patch": patch_loss.item()})
    encoder.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([encoder(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        sub = flat[torch.randperm(len(flat), generator=g)[:60_000]]
        codebook.copy_(kmeans(sub, codebook.shape[0], seed=seed))
        quantized = codebook[torch.cdist(flat, codebook).argmin(1)]
        rel_error = ((quantized - flat).norm(dim=1).mean() / flat.norm(dim=1).mean()).item()
    return {"attribute_accuracy": dict(zip(ATTRIBUTES, acc.tolist())), "patch_mse": patch_loss.item(),
            "codebook_relative_error": rel_error, "tokens_per_image": tokens_side ** 2}


def standardized_codebook(model) -> tuple[Tensor, Tensor]:
    """(codes, BPE ids): each VQ code's vector standardized per dimension, and its id in the vocabulary."""
    vocab = model.model.vocabulary_mapping
    codebook = model.model.vqmodel.quantize.embedding.weight.detach().float()
    codes = (codebook - codebook.mean(0)) / codebook.std(0).clamp_min(1e-6)
    return codes, torch.tensor([vocab.img2bpe[k] for k in range(codebook.shape[0])])


@torch.no_grad()
def init_image_embeddings(model, seed: int = 0) -> None:
    """Start the AR model's image-token embeddings at the VQ codebook: each code's vector, standardized per
    dimension, through a fixed random orthonormal map to the hidden size, at the table's scale. Codes that
    look alike then start alike, so the base reads a photo of an object it never saw like the seen ones it
    resembles."""
    codebook, ids = standardized_codebook(model)
    table = model.get_input_embeddings().weight
    width = max(codebook.shape[1], table.shape[1])
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed)))
    rows = codebook @ q[: codebook.shape[1], : table.shape[1]]
    rows = rows / rows.std() * table.float().std()
    table[ids] = rows.to(table.dtype)


@torch.no_grad()
def image_tokens(model, pixels: Tensor, batch_size: int = 256) -> Tensor:
    """(N, tokens) BPE ids of the images, through transformers' own ``get_image_tokens``."""
    return torch.cat([model.model.get_image_tokens(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


# ---- pre-training texts -----------------------------------------------------------------------------------


class CodebookEmbeddings(nn.Module):
    """Parametrization of the input embedding table whose image-token rows are a trained linear map of the
    (standardized) VQ codebook: ``rows = codes @ map``, the other rows the table's own.

    A row per code, trained freely, learns only from the photos that use that code: codes that occur
    mostly in one object's photos end up meaning that object, and a never-seen combination of seen
    attributes is read as a seen near-miss. One map shared by every code keeps codes that look alike
    reading alike. ``torch.nn.utils.parametrize.remove_parametrizations(..., leave_parametrized=True)``
    writes the rows back, so the saved model is a stock Chameleon."""

    def __init__(self, codes: Tensor, ids: Tensor, projection: Tensor):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("ids", ids, persistent=False)
        self.projection = nn.Parameter(projection.clone())

    def forward(self, table: Tensor) -> Tensor:
        return table.index_copy(0, self.ids, (self.codes @ self.projection).to(table.dtype))
