"""Image and text embedders from local folders: CLIP (image and text towers, or the vision tower alone) and
DINO. Eval's CLIP-I / CLIP-T / DINO and prepare's negative retrieval use the same classes.

    clip = ClipEmbedder.load(path)             # transformers CLIPModel + its processor
    clip.images(generated)      # (N, D) unit rows; generated: (N, 3, H, W) floats in [0, 1], or PIL images
    clip.texts(["a photo of a dog"])
    vision = ClipEmbedder.load(path, text=False)   # CLIPVisionModelWithProjection: a vision-only folder
    dino = DinoEmbedder.load(path)             # AutoModel + AutoImageProcessor (ViT, DINOv2)

Preprocessing is the checkpoint's own image processor (resize the shortest edge, center crop, rescale,
CLIP or ImageNet mean/std) applied to 8-bit RGB images, exactly as the model saw them in training.
Generated images are converted from [0, 1] floats to uint8 by clamping, scaling by 255 and *rounding*
(a truncating cast darkens every pixel by half a level on average), so a generated image equal to a
reference photo embeds to the same vector.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image
from torch import Tensor

from unipers.errors import UnipersError

ImagesLike = Union[Tensor, Sequence[Image.Image]]


class MetricModelError(UnipersError, ValueError):
    """A metric model that is not configured or cannot be loaded; the message names the config key."""


def require_model(path: str | os.PathLike | None, key: str, metric: str, model: str, kind: str) -> Path:
    """The folder at config `key`, or an error saying which key to set and what it must hold."""
    hint = f"set {key}=/path/to/{model.lower()} (a local transformers {kind} folder)"
    if not path:
        raise MetricModelError(f"{metric} needs a {model} model: {hint}, or pass --no-generation")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MetricModelError(f"{key}={path}: not a local model folder (no config.json); {metric} needs it: {hint}")
    return path


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) floats in [0, 1] -> 8-bit RGB images (clamped, x255, rounded)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def _as_pil(images: ImagesLike) -> list[Image.Image]:
    return to_pil(images) if isinstance(images, Tensor) else [im.convert("RGB") for im in images]


def _tensor(output) -> Tensor:
    # transformers 5 returns a model output from get_*_features (the projection in pooler_output);
    # 4.x returned the tensor itself.
    return output if isinstance(output, Tensor) else output.pooler_output


class _Embedder:
    batch_size = 32

    def __init__(self, model, image_processor, device: str | torch.device):
        self.model = model.to(device).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.device = torch.device(device)

    def _pixels(self, batch: list[Image.Image]) -> Tensor:
        return self.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """The model's embedding of preprocessed pixels, not normalized."""
        raise NotImplementedError

    @torch.no_grad()
    def images(self, images: ImagesLike) -> Tensor:
        """Unit-norm float32 embeddings (N, D) on the CPU."""
        pil = _as_pil(images)
        rows = [self.image_features(self._pixels(pil[i:i + self.batch_size])).float()
                for i in range(0, len(pil), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1).cpu()


class ClipEmbedder(_Embedder):
    def __init__(self, model, image_processor, tokenizer=None, device: str | torch.device = "cpu"):
        super().__init__(model, image_processor, device)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu",
             key: str = "eval.clip_path", metric: str = "CLIP-I", *, text: bool = True) -> "ClipEmbedder":
        """``text=False``: the vision tower and its projection only (``CLIPVisionModelWithProjection``), which
        a vision-only folder holds too; `texts` is then unavailable."""
        from transformers import AutoProcessor, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

        kind = "CLIPModel" if text else "CLIPVisionModelWithProjection"
        path = require_model(path, key, metric, "CLIP", kind)
        try:
            if not text:
                return cls(CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True),
                           CLIPImageProcessor.from_pretrained(path, local_files_only=True), None, device)
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise MetricModelError(f"{key}={path}: cannot load a {kind} and its processor ({err})") from err
        return cls(model, processor.image_processor, processor.tokenizer, device)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        if self.tokenizer is None:
            return self.model(pixel_values=pixel_values).image_embeds
        return _tensor(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text-tower embeddings (N, D) on the CPU (truncated to the model's 77 positions)."""
        if self.tokenizer is None:
            raise ValueError("this CLIP was loaded without its text tower (text=False)")
        limit = self.model.config.text_config.max_position_embeddings
        rows = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt").to(self.device)
            rows.append(_tensor(self.model.get_text_features(input_ids=enc["input_ids"],
                                                             attention_mask=enc["attention_mask"])).float())
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1).cpu()


class DinoEmbedder(_Embedder):
    """The CLS token of the last layer (DreamBooth's DINO metric): ``last_hidden_state[:, 0]``, which for
    DINOv2 is already layer-normed. Not ``pooler_output``: ViTModel's pooler is an extra untrained tanh layer."""

    @classmethod
    def load(cls, path: str | os.PathLike | None, device: str | torch.device = "cpu",
             key: str = "eval.dino_path", metric: str = "DINO") -> "DinoEmbedder":
        from transformers import AutoImageProcessor, AutoModel

        path = require_model(path, key, metric, "DINO", "ViT / DINOv2 AutoModel")
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise MetricModelError(f"{key}={path}: cannot load a DINO model and its image processor ({err})") from err
        return cls(model, processor, device)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]
