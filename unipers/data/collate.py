"""From manifest records to model batches: cached image features, prompt layouts, dynamic padding.

A batch is a dict with up to two parts, each padded only to its own longest sequence:

    "und": ids, attention_mask, labels (answer tokens only), task, label, uid  -> understanding loss
    "gen": ids, attention_mask, latents, gen_slots, uid                        -> diffusion loss
    "img": ids, attention_mask, labels (the target's VQ tokens)                -> AR image-token loss

Images are never decoded per step: image tokens (VQ) and decoder latents are computed once per image and
model fingerprint, and stored beside the prepared folder (``cache/``), so later runs reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from unipers.concepts.prompts import IGNORE_INDEX, IMAGE_MARKER, Encoded, PromptBuilder
from unipers.concepts.recognition import recognition_layout
from unipers.data.augment import ViewSpec, augment_view, split_view_key, view_key
from unipers.data.manifest import Sample
from unipers.models.padding import pad_batch

UNDERSTANDING_TASKS = ("recognition", "qa", "vqa", "caption")


@dataclass(frozen=True)
class Record:
    """A manifest sample, the prepared folder its image path is relative to, and a run-wide id.

    The id seeds the sample's diffusion noise, so a sample draws the same noise whichever rank or batch
    it lands in (DDP runs match single-process runs; resumed runs match uninterrupted ones).
    """

    sample: Sample
    root: Path
    uid: int = 0
    view: int = 0  # 0: the image itself; k > 0: augmented view k drawn by `spec` (unipers/data/augment.py)
    spec: ViewSpec | None = None

    @property
    def image_key(self) -> str | None:
        if not self.sample.image:
            return None
        path = str(self.root / self.sample.image)
        return view_key(path, self.spec, self.view) if self.spec is not None else path


def question_text(sample: Sample) -> str:
    """The question side of an understanding sample, image placeholder first (Chameleon order)."""
    text = sample.question or ""
    if sample.options:
        text += "".join(f"\n{k}. {v}" for k, v in sorted(sample.options.items())) + "\nAnswer with the letter."
    if sample.image and IMAGE_MARKER not in text:
        text = f"{IMAGE_MARKER}\n{text}"
    return text


@dataclass(frozen=True)
class StageFormat:
    """How a stage formats its samples."""

    self_prompting: bool = False
    image_tokens: bool = False  # also build the AR image-token part for generation samples


class Collator:
    """Records (or (record, stage) pairs from a staged MixtureSampler) -> a batch dict."""

    def __init__(self, prompts: PromptBuilder, pad_id: int, image_tokens: Mapping[str, Tensor],
                 latents: Mapping[str, Tensor], stages: Sequence[StageFormat] = (StageFormat(),),
                 descriptions: Mapping[str, Sequence[int]] | None = None):
        """``descriptions`` (image key -> the base's description ids): recognition samples are then asked
        in two turns, describe then decide (`PromptBuilder.encode_described_qa`)."""
        self.prompts, self.pad_id = prompts, pad_id
        self.image_tokens, self.latents = image_tokens, latents
        self.stages = list(stages)
        self.descriptions = descriptions

    def __call__(self, items: Sequence) -> dict:
        pairs = [it if isinstance(it, tuple) else (it, 0) for it in items]
        fmt = self.stages[pairs[0][1]]  # a batch never spans two stages (stages start on step boundaries)
        records = [r for r, _ in pairs]
        und = [r for r in records if r.sample.task in UNDERSTANDING_TASKS]
        gen = [r for r in records if r.sample.task == "generation"]
        batch: dict = {"concepts": [r.sample.concept for r in records], "stage": pairs[0][1]}
        if und:
            enc = [self._encode_und(r, fmt) for r in und]
            batch["und"] = self._pad(enc) | {"task": [r.sample.task for r in und],
                                             "label": [r.sample.label for r in und], "uid": [r.uid for r in und]}
        if gen:
            seqs = [self.prompts.encode(r.sample.prompt, mode="gen", gen_slots=r.sample.gen_slots) for r in gen]
            ids, mask = pad_batch(seqs, self.pad_id)
            batch["gen"] = {"ids": ids, "attention_mask": mask,
                            "latents": torch.stack([self.latents[r.image_key] for r in gen]),
                            "gen_slots": [r.sample.gen_slots for r in gen], "uid": [r.uid for r in gen]}
            if fmt.image_tokens:
                enc = []
                for seq, r in zip(seqs, gen):
                    tokens = self.image_tokens[r.image_key].tolist()
                    prompt = seq + [self.prompts.boi_id]
                    enc.append(Encoded(prompt + tokens, [IGNORE_INDEX] * len(prompt) + tokens))
                batch["img"] = self._pad(enc)
        return batch

    def _encode_und(self, r: Record, fmt: StageFormat) -> Encoded:
        s = r.sample
        if s.task == "recognition" and r.image_key and not s.options:
            description = self.descriptions[r.image_key] if self.descriptions is not None else None
            return recognition_layout(self.prompts).qa(s.question or "", s.answer, self.image_tokens[r.image_key], description,
                                               self_prompt=fmt.self_prompting)
        return self.prompts.encode_qa(question_text(s), s.answer,
                                      images=[self.image_tokens[r.image_key]] if r.image_key else (),
                                      self_prompt=fmt.self_prompting)

    def _pad(self, enc: Sequence[Encoded]) -> dict:
        ids, mask = pad_batch([e.ids for e in enc], self.pad_id)
        labels, _ = pad_batch([e.labels for e in enc], 0, labels=True)
        return {"ids": ids, "attention_mask": mask, "labels": labels}


# ---- feature caches ------------------------------------------------------------------------------------
def _load_rgb(path: str):
    """An image by feature key: a plain path, or a view key (an augmented view of that path)."""
    from PIL import Image

    file, spec, view = split_view_key(path)
    with Image.open(file) as im:
        img = im.convert("RGB")
    if spec is None:
        return img
    # seeded by the image's place in its prepared folder, not the absolute path: same views on every machine
    return augment_view(img, spec, "/".join(Path(file).parts[-2:]) + f"#{spec.tag}/{view}")


def _decoder_pixels(path: str, size: int) -> Tensor:
    from torchvision.transforms import functional as TF

    im = _load_rgb(path)
    im = TF.center_crop(TF.resize(im, size, antialias=True), [size, size])
    return TF.to_tensor(im) * 2 - 1


def cached_features(keys: Sequence[str], kind: str, fingerprint: str, compute, batch_size: int = 32,
                    root: str | Path | None = None) -> dict[str, Tensor]:
    """{image path: feature}, computed once per (image, model) and stored in ``<folder>/cache/``.

    `compute(paths) -> Tensor` runs the frozen encoder on a batch. Each prepared folder keeps its own file,
    ``cache/<kind>-<fingerprint>.safetensors``, keyed by the path relative to the folder; ``root`` puts every
    key under one folder instead (an align pairs folder).
    """
    from safetensors.torch import load_file

    from unipers.io import save_safetensors_atomic

    by_root: dict[Path, list[str]] = {}
    for key in dict.fromkeys(keys):
        path = Path(key)
        folder = Path(root) if root is not None else \
            next((p for p in path.parents if (p / "manifest.jsonl").is_file()), path.parent)
        by_root.setdefault(folder, []).append(key)
    out: dict[str, Tensor] = {}
    for folder, group in by_root.items():
        file = folder / "cache" / f"{kind}-{fingerprint}.safetensors"
        stored = load_file(str(file)) if file.is_file() else {}
        rel = {k: str(Path(k).relative_to(folder)) for k in group}
        missing = [k for k in group if rel[k] not in stored]
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            with torch.no_grad():
                feats = compute(chunk).cpu()
            stored.update({rel[k]: f.contiguous() for k, f in zip(chunk, feats)})
        if missing:
            save_safetensors_atomic(stored, file)
        out.update({k: stored[rel[k]] for k in group})
    return out


def image_token_cache(model, keys: Sequence[str]) -> dict[str, Tensor]:
    """VQ image tokens for every image, through the backbone's own processor."""
    bb = model.backbone

    def compute(paths):
        pixels = bb.processor.image_processor(images=[_load_rgb(p) for p in paths], return_tensors="pt").pixel_values
        return bb.encode_images(pixels)

    return cached_features(keys, "image_tokens", bb.base_fingerprint, compute)


def description_cache(model, tokens: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, list[int]]:
    """The base's description ids of every image (`UnifiedModel.describe`), stored like the image tokens
    (padded with -1), keyed by the base and the describe question."""
    import hashlib

    p = model.prompts
    width = p.describe_tokens

    def compute(paths):
        rows = model.describe([tokens[k] for k in paths])
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)

    layout = hashlib.sha256(f"{p.describe_question}\n{width}".encode()).hexdigest()[:12]
    stored = cached_features(keys, f"descriptions-{layout}", model.backbone.base_fingerprint, compute)
    return {k: [t for t in v.tolist() if t >= 0] for k, v in stored.items()}


def latent_cache(model, keys: Sequence[str], root: str | Path | None = None) -> dict[str, Tensor]:
    """Decoder latents (VAE mean) at the decoder's resolution for every generation target (or align
    image: ``root``, its pairs folder)."""
    dec = model.decoder

    def compute(paths):
        pixels = torch.stack([_decoder_pixels(p, dec.image_size) for p in paths])
        return dec.encode_images(pixels.to(dec.device, dec.dtype)).float()

    return cached_features(keys, "latents", model.decoder_fingerprint, compute, root=root)
