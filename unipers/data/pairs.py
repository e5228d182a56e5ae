"""Image–caption pairs for the align stage: a folder plus a captions JSONL, or WebDataset-format tar shards.

    loader = build_align_data("folder", "data/pairs", image_size=512, batch_size=32)  # data/pairs/captions.jsonl
    loader = build_align_data("shards", "data/shards/pairs-{000000..000511}.tar", image_size=512,
                              batch_size=32, num_workers=8)
    batch = next(iter(loader))  # {"pixels": (B, 3, S, S) in [-1, 1], "captions": [str], "keys": [str]}
    # a folder with latents=latent_cache(model, paths, root=folder): "latents" (B, C, h, w) instead of "pixels"

Folder: one JSON object per line, ``{"image": "rel/path.png", "caption": "..."}``; the key is the image path
without its extension. Shards: ordinary tar files in the WebDataset layout (members grouped by key, the
path up to the first dot of the file name: ``0001.jpg`` + ``0001.txt``, or ``0001.json`` with a
"caption"). Shards are streamed with ``tarfile`` (never extracted) and split over DDP ranks *and*
DataLoader workers; a pair that cannot be read is skipped and counted, never fatal. Pixels go through the
same resize + centre crop as cached personalize latents (``collate._decoder_pixels``).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from unipers.data.collate import _decoder_pixels

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else the initialised process group, else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    return rank or 0, world_size or 1


# ---- folder + captions JSONL ---------------------------------------------------------------------------
class CaptionFolderDataset(Dataset):
    """Pairs listed in a captions JSONL, images relative to ``folder``. Errors name the file and line.

    ``latents``: {image path: VAE latents} (`collate.latent_cache`); items then carry "latents" instead of
    "pixels", and no image is read during training."""

    def __init__(self, folder: str | os.PathLike, captions_jsonl: str | os.PathLike, image_size: int,
                 latents: Mapping[str, torch.Tensor] | None = None):
        self.folder, self.captions_jsonl, self.image_size = Path(folder), Path(captions_jsonl), image_size
        self.latents = latents
        self.items: list[tuple[str, str, str]] = []  # (image path, caption, key)
        missing: list[str] = []
        with open(self.captions_jsonl, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.captions_jsonl}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("image"), str) \
                        or not isinstance(row.get("caption"), str):
                    raise ValueError(f'{where}: expected {{"image": str, "caption": str}}, got {line.strip()[:120]}')
                path = self.folder / row["image"]
                if latents is None and not path.is_file():
                    missing.append(f"{where}: {path}")
                key = Path(row["image"]).with_suffix("").as_posix()
                self.items.append((str(path), row["caption"], key))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"image not found: {missing[0]}{more}")
        if not self.items:
            raise ValueError(f"{self.captions_jsonl}: no pairs")
        if latents is not None and (lacking := [path for path, _, _ in self.items if path not in latents]):
            raise KeyError(f"no cached latents for {lacking[0]} (and {len(lacking) - 1} more)")

    @property
    def image_paths(self) -> list[str]:
        return [path for path, _, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, caption, key = self.items[index]
        if self.latents is not None:
            return {"latents": self.latents[path], "caption": caption, "key": key}
        try:
            pixels = _decoder_pixels(path, self.image_size)
        except Exception as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        return {"pixels": pixels, "caption": caption, "key": key}


# ---- WebDataset-format tar shards ----------------------------------------------------------------------
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A list of paths, or a pattern with ``{000..127}`` ranges and/or glob wildcards -> sorted paths."""
    if not isinstance(shards, (str, os.PathLike)):
        return [str(s) for s in shards]
    patterns, out = [str(shards)], []
    while any(_RANGE.search(p) for p in patterns):  # expand the first range of each, until none is left
        nxt = []
        for p in patterns:
            m = _RANGE.search(p)
            if m is None:
                nxt.append(p)
                continue
            lo, hi, width = int(m[1]), int(m[2]), len(m[1])
            nxt += [p[:m.start()] + str(i).zfill(width) + p[m.end():] for i in range(lo, hi + 1)]
        patterns = nxt
    for p in patterns:
        found = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.isfile(p) else [])
        if not found:
            raise FileNotFoundError(f"no shard matches {p}")
        out += found
    return out


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name, ext = the rest (lower case)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShardDataset(IterableDataset):
    """Stream pairs from tar shards, each shard read by exactly one (rank, worker) per epoch.

    Shard order is shuffled per epoch from ``seed`` (the same on every rank); shard ``i`` goes to rank
    ``i % world_size`` and, within it, to worker ``(i // world_size) % num_workers``. Samples are then
    mixed in a per-(epoch, rank, worker) seeded buffer of ``shuffle_buffer`` (0 keeps shard order).
    ``rank``/``world_size`` default to the initialised process group. ``repeat=True`` loops over epochs
    forever (for ``max_steps`` training under DDP, where ranks must never run dry at different steps).
    ``skipped`` counts unreadable pairs by reason in this process (workers log theirs).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], image_size: int, *,
                 rank: int | None = None, world_size: int | None = None, seed: int = 0,
                 shuffle_buffer: int = 1000, repeat: bool = False):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("no shards given")
        self.image_size, self.rank, self.world_size = image_size, rank, world_size
        self.seed, self.shuffle_buffer, self.repeat = seed, shuffle_buffer, repeat
        self.epoch = 0
        self.skipped: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, epoch: int, rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards one (rank, worker) reads in ``epoch``."""
        order = list(self.shards)
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        slots = world_size * num_workers
        return order[worker * world_size + rank::slots]

    def __iter__(self) -> Iterator[dict]:
        rank, world = _rank_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if len(self.shards) < world:
            raise ValueError(f"{len(self.shards)} shards for {world} ranks: every rank needs at least one shard")
        if len(self.shards) < world * num_workers and worker == 0 and rank == 0:
            log.warning("%d shards for %d ranks x %d workers: some workers stay idle", len(self.shards), world,
                        num_workers)
        epoch = self.epoch
        while True:
            mine = self.shards_for(epoch, rank, world, worker, num_workers)
            rng = random.Random(f"samples/{self.seed}/{epoch}/{rank}/{worker}")
            yield from _shuffled(self._read(mine), self.shuffle_buffer, rng)
            if not self.repeat:
                return
            epoch += 1

    def _read(self, shards: Iterable[str]) -> Iterator[dict]:
        for shard in shards:
            group: dict[str, bytes] = {}
            key = None
            try:
                with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, ext = _split_name(member.name)
                        if k != key and group:
                            yield from self._decode(shard, key, group)
                            group = {}
                        key = k
                        group[ext] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                self._skip("bad_shard", shard, None, f"stopped after {key}: {err}")
            if group:
                yield from self._decode(shard, key, group)

    def _decode(self, shard: str, key: str, group: dict[str, bytes]) -> Iterator[dict]:
        image = next((group[e] for e in IMAGE_EXTS if e in group), None)
        caption_ext = next((e for e in CAPTION_EXTS if e in group), None)
        if image is None or caption_ext is None:
            self._skip("no_image" if image is None else "no_caption", shard, key, sorted(group))
            return
        try:
            text = group[caption_ext].decode("utf-8")
            caption = json.loads(text)["caption"] if caption_ext == "json" else text.strip()
            if not isinstance(caption, str) or not caption:
                raise ValueError("empty or not a string")
        except Exception as err:
            self._skip("bad_caption", shard, key, err)
            return
        try:
            pixels = _decoder_pixels(io.BytesIO(image), self.image_size)  # PIL opens paths and files alike
        except Exception as err:
            self._skip("bad_image", shard, key, err)
            return
        yield {"pixels": pixels, "caption": caption, "key": key}

    def _skip(self, reason: str, shard: str, key: str | None, detail) -> None:
        self.skipped[reason] += 1
        log.warning("skipped %s in %s (%s): %s", key or "the rest of the shard", shard, reason, detail)


def _shuffled(items: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``size`` (0 or 1: pass through)."""
    if size <= 1:
        yield from items
        return
    buf: list[dict] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


# ---- batches -------------------------------------------------------------------------------------------
def pair_collate(items: Sequence[dict]) -> dict:
    image = "latents" if "latents" in items[0] else "pixels"
    return {image: torch.stack([it[image] for it in items]), "captions": [it["caption"] for it in items],
            "keys": [it["key"] for it in items]}


def build_align_data(kind: str, source: str | os.PathLike | Sequence[str], *, image_size: int, batch_size: int,
                     captions: str | os.PathLike | None = None, num_workers: int = 0, seed: int = 0,
                     rank: int | None = None, world_size: int | None = None, shuffle_buffer: int = 1000,
                     repeat: bool = True, latents: Mapping[str, torch.Tensor] | None = None):
    """A training loader over pairs. kind: "folder" (``source`` = folder, ``captions`` defaults to
    ``source/captions.jsonl``) or "shards" (``source`` = shard list or pattern).

    Build it where the process group exists (a ``train_dataloader`` hook) or pass ``rank``/``world_size``.
    Folder: a seeded DistributedSampler (Lightning sets its epoch) in torchdata's StatefulDataLoader, so a
    resume replays exactly; drop_last keeps batch counts equal on every rank. Shards: ``repeat=True``
    streams forever (stop with ``max_steps``), so no rank runs out of data before another. ``latents``
    (folder only): cached VAE latents per image path, used instead of the images.
    """
    from torch.utils.data.distributed import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    common = dict(batch_size=batch_size, collate_fn=pair_collate, num_workers=num_workers, drop_last=True,
                  persistent_workers=False)
    if kind == "folder":
        dataset = CaptionFolderDataset(source, captions or Path(source) / "captions.jsonl", image_size, latents)
        r, w = _rank_world(rank, world_size)
        sampler = DistributedSampler(dataset, num_replicas=w, rank=r, shuffle=True, seed=seed, drop_last=True)
        return StatefulDataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), **common)
    if kind == "shards":
        if captions is not None or latents is not None:
            raise ValueError("captions= and latents= are for kind='folder'; shards carry their captions and are "
                             "streamed, never cached")
        dataset = TarShardDataset(source, image_size, rank=rank, world_size=world_size, seed=seed,
                                  shuffle_buffer=shuffle_buffer, repeat=repeat)
        return StatefulDataLoader(dataset, **common)
    raise ValueError(f"unknown align data kind {kind!r}; valid: 'folder', 'shards'")
