"""From manifest records to model batches: cached image features, prompt layouts, dynamic padding.

A batch is a dict with up to two parts, each padded only to its own longest sequence:

    "und": ids, attention_mask, labels (answer tokens only), task, label, uid  -> understanding loss
    "gen": ids, attention_mask, latents, gen_slots, uid                        -> diffusion loss
    "img": ids, attention_mask, labels (the target's VQ tokens)                -> AR image-token loss

Images are never decoded per step: image tokens (VQ) and decoder latents are computed once per image and
model fingerprint, and stored beside the prepared folder (``cache/``), so later runs reuse them; each
entry is keyed by its photo's content (sha256), so a photo replaced under the same name is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from unipers.concepts.prompts import IGNORE_INDEX, IMAGE_MARKER, Encoded, PromptBuilder
from unipers.concepts.recognition import recognition_layout
from unipers.data.augment import ViewSpec, augment_view, split_view_key, view_key
from unipers.data.manifest import Sample
from unipers.errors import UnipersError
from unipers.models.padding import pad_batch

log = logging.getLogger(__name__)

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
CACHE_FORMAT = 2
"""Layout of the cache files. A file of another layout, such as the path-keyed files written before
entries carried their photo's hash, is rebuilt, not read."""
SAVE_EVERY_S = 60.0
"""While a cache fills, save it after this many seconds of encoding: an interrupted encode keeps what it did."""
SAVE_STRETCH = 10.0
"""...and after at least this many times the last save's own duration, so rewriting a large file stays
under a tenth of the work."""
_META = "unipers.feature_cache"


class _Invalid(Exception):
    """A cache file that cannot be trusted (the message says why): it is rebuilt."""


def _load_rgb(path: str):
    """An image by feature key: a plain path, or a view key (an augmented view of that path)."""
    from PIL import Image

    file, spec, view = split_view_key(path)
    try:
        with Image.open(file) as im:
            img = im.convert("RGB")
    except OSError as err:  # PIL's "cannot identify image file" is an OSError too
        raise UnipersError(f"{file}: cannot read image ({err})") from err
    if spec is None:
        return img
    # seeded by the image's place in its prepared folder, not the absolute path: same views on every machine
    return augment_view(img, spec, "/".join(Path(file).parts[-2:]) + f"#{spec.tag}/{view}")


def _decoder_pixels(path: str, size: int) -> Tensor:
    from torchvision.transforms import functional as TF

    im = _load_rgb(path)
    im = TF.center_crop(TF.resize(im, size, antialias=True), [size, size])
    return TF.to_tensor(im) * 2 - 1


def file_digests(files: Iterable[str]) -> dict[str, str | None]:
    """sha256 of each file's bytes; None for a file that is gone (then only a stored entry can answer).
    Hashing costs 1-3% of decoding the same photo (benchmarks/bench_cache_keys.py)."""
    out: dict[str, str | None] = {}
    for file in dict.fromkeys(files):
        h = hashlib.sha256()
        try:
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            out[file] = None
            continue
        except OSError as err:
            raise UnipersError(f"{file}: cannot read image ({err.strerror or err})") from err
        out[file] = h.hexdigest()
    return out


def _read_cache(file: Path, kind: str, fingerprint: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(entries, their photos' digests) of a valid cache file; empty when there is none or it is invalid."""
    if not file.is_file():
        return {}, {}
    try:
        return _checked(file, kind, fingerprint)
    except Exception as err:  # whatever is wrong with the file (truncated, foreign, stale), it is rebuilt
        log.warning("%s: %s; rebuilding it", file, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return {}, {}


def _checked(file: Path, kind: str, fingerprint: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(_META, "null"))
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise _Invalid(f"not a format-{CACHE_FORMAT} feature cache")
        if (meta.get("kind"), meta.get("fingerprint")) != (kind, fingerprint):
            raise _Invalid(f"written for {meta.get('kind')}-{meta.get('fingerprint')}")
        digests, names = meta.get("sources"), set(f.keys())
        if not isinstance(digests, dict) or set(digests) != names:
            raise _Invalid("its entries and their photo hashes do not match")
        entries = {k: f.get_tensor(k) for k in names}
    for key, t in entries.items():
        if list(t.shape) != meta.get("shape") or str(t.dtype) != meta.get("dtype"):
            want = f"{meta.get('dtype')}{meta.get('shape')}"
            raise _Invalid(f"entry {key} is {t.dtype}{list(t.shape)}, not {want}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise _Invalid(f"entry {key} is not finite")
    return entries, digests


def _write_cache(file: Path, kind: str, fingerprint: str, entries: dict[str, Tensor],
                 digests: dict[str, str]) -> None:
    from unipers.io import save_safetensors_atomic

    first = next(iter(entries.values()))
    meta = {"format": CACHE_FORMAT, "kind": kind, "fingerprint": fingerprint, "shape": list(first.shape),
            "dtype": str(first.dtype), "sources": digests}
    save_safetensors_atomic(entries, file, metadata={_META: json.dumps(meta, sort_keys=True)})


def _fill(file: Path, kind: str, fingerprint: str, compute, todo: Sequence[str], rel: Mapping[str, str],
          sums: Mapping[str, str | None], entries: dict[str, Tensor], digests: dict[str, str],
          batch_size: int) -> None:
    """Encode `todo` into `entries` batch by batch, saving the file on the way and at the end."""
    like = next(iter(entries.values()), None)
    last, every = time.monotonic(), SAVE_EVERY_S
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        with torch.no_grad():
            feats = compute(chunk).cpu()
        if feats.is_floating_point() and not (ok := torch.isfinite(feats.flatten(1)).all(1)).all():
            raise RuntimeError(f"{kind}: the encoder gave non-finite values for {chunk[int((~ok).nonzero()[0])]}")
        if like is not None and (feats.shape[1:] != like.shape or feats.dtype != like.dtype):
            raise _Invalid(f"its entries are {like.dtype}{list(like.shape)}, the encoder gives "
                           f"{feats.dtype}{list(feats.shape[1:])}")
        like = feats[0]
        for k, f in zip(chunk, feats):
            entries[rel[k]], digests[rel[k]] = f.contiguous(), sums[split_view_key(k)[0]]
        if i + batch_size < len(todo) and time.monotonic() - last >= every:
            t = time.monotonic()
            _write_cache(file, kind, fingerprint, entries, digests)
            last = time.monotonic()
            every = max(SAVE_EVERY_S, SAVE_STRETCH * (last - t))
    if todo:
        _write_cache(file, kind, fingerprint, entries, digests)


def cached_features(keys: Sequence[str], kind: str, fingerprint: str, compute, batch_size: int = 32,
                    root: str | Path | None = None) -> dict[str, Tensor]:
    """{image path: feature}, computed once per (image content, model) and stored in ``<folder>/cache/``.

    `compute(paths) -> Tensor` runs the frozen encoder on a batch. Each prepared folder keeps its own file,
    ``cache/<kind>-<fingerprint>.safetensors``, keyed by the path relative to the folder; ``root`` puts every
    key under one folder instead (an align pairs folder). Each entry carries the sha256 of its photo's
    bytes: a photo replaced under the same name is encoded again, the others are read. A photo that is
    gone is answered from the file. A file that fails its checks (layout, keys, shapes, dtype, finite
    values) is rebuilt with a warning.
    """
    by_root: dict[Path, list[str]] = {}
    for key in dict.fromkeys(keys):
        path = Path(key)
        folder = Path(root) if root is not None else \
            next((p for p in path.parents if (p / "manifest.jsonl").is_file()), path.parent)
        by_root.setdefault(folder, []).append(key)
    out: dict[str, Tensor] = {}
    for folder, group in by_root.items():
        file = folder / "cache" / f"{kind}-{fingerprint}.safetensors"
        entries, digests = _read_cache(file, kind, fingerprint)
        rel = {k: str(Path(k).relative_to(folder)) for k in group}
        sums = file_digests(split_view_key(k)[0] for k in group)  # views share their photo's hash

        def stale(key: str) -> bool:
            now = sums[split_view_key(key)[0]]
            return rel[key] not in entries or (now is not None and now != digests[rel[key]])

        todo = [k for k in group if stale(k)]
        try:
            _fill(file, kind, fingerprint, compute, todo, rel, sums, entries, digests, batch_size)
        except _Invalid as err:  # stored entries the encoder no longer matches
            log.warning("%s: %s; rebuilding it", file, err)
            entries, digests = {}, {}
            _fill(file, kind, fingerprint, compute, group, rel, sums, entries, digests, batch_size)
        out.update({k: entries[rel[k]] for k in group})
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
    p = model.prompts
    width = p.describe_tokens

    def compute(paths):
        rows = model.describe([tokens[k] for k in paths])
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)

    layout = hashlib.sha256(f"{p.describe_question}\n{width}".encode()).hexdigest()[:12]
    stored = cached_features(keys, f"descriptions-{layout}", model.backbone.base_fingerprint, compute)
    return {k: [t for t in v.tolist() if t >= 0] for k, v in stored.items()}


def latent_cache(model, keys: Sequence[str], root: str | Path | None = None,
                 batch_size: int = 32) -> dict[str, Tensor]:
    """Decoder latents (VAE mean) at the decoder's resolution for every generation target (or align
    image: ``root``, its pairs folder), encoded `batch_size` images at a time."""
    dec = model.decoder

    def compute(paths):
        pixels = torch.stack([_decoder_pixels(p, dec.image_size) for p in paths])
        return dec.encode_images(pixels.to(dec.device, dec.dtype)).float()

    return cached_features(keys, "latents", model.decoder_fingerprint, compute, batch_size, root=root)
