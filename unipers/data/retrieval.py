"""CLIP retrieval over a negative pool: hard / easy negatives and soft positives.

    unipers prepare photos/bo --name bo --negatives /data/laion_pool --clip /models/clip-vit-large

The pool (any folder tree of images, 100k+ is fine) is embedded with a local
``CLIPVisionModelWithProjection`` in streamed batches; only the float16 embedding matrix and the file
list are held in memory. Embeddings are cached in ``POOL/.unipers_clip_cache/<clip-fingerprint>.npz``
with each file's size and mtime: a second run reuses them, and a changed pool re-embeds only the files
that were added or modified (removed files are dropped). If the pool folder is read-only the cache goes
to a fallback folder chosen by the caller (``unipers prepare`` uses ``.unipers_clip_cache`` beside the
output folder, so it survives ``--overwrite`` and is shared by a job array over concepts).

Selection (``select_from_pool``), all by cosine similarity to the normalized mean embedding of the
concept's train photos: pool images closer than ``near_duplicate`` to any concept photo (train or val)
are dropped as likely copies of the concept; the ``n_soft`` most similar of the rest are soft positives;
the next ``n_hard`` are hard negatives; ``n_easy`` more are drawn at random (seeded) from what is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from unipers.data.images import PhotoError, is_image_file, open_rgb

CACHE_DIRNAME = ".unipers_clip_cache"


@dataclass
class PoolEmbeddings:
    """Unit-norm float16 embeddings of a pool, row i for ``files[i]`` (paths relative to the pool)."""

    root: Path
    files: list[str]
    emb: np.ndarray  # (n, d) float16
    ok: np.ndarray  # (n,) bool; False for unreadable files (their row is zero)
    cache_file: Path | None = None
    reused: int = 0
    embedded: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Selection:
    """Row indices into the pool, best first, and the similarity of every row to the concept."""

    soft: list[int]
    hard: list[int]
    easy: list[int]
    near_duplicates: list[int]
    sims: np.ndarray  # (n,) cosine to the concept mean
    max_pos_sims: np.ndarray  # (n,) highest cosine to any single concept photo


def list_pool(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every image under ``root``, sorted; hidden entries skipped."""
    out: list[tuple[str, int, int]] = []
    stack, seen = [Path(root)], {os.path.realpath(root)}
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=True):
                    real = os.path.realpath(e.path)
                    if real not in seen:  # symlinked folders are followed once (no loops)
                        seen.add(real)
                        stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=True) and is_image_file(Path(e.name)):
                    st = e.stat()
                    out.append((Path(e.path).relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def clip_fingerprint(clip_path: Path | str) -> str:
    """A short id of the CLIP checkpoint: its configs plus name, size and head/tail bytes of each weight
    file (cheap for multi-GB checkpoints, and changes whenever the weights are replaced)."""
    clip_path = Path(clip_path)
    h = hashlib.sha256()
    for p in sorted(clip_path.iterdir(), key=lambda p: p.name):
        if not p.is_file():
            continue
        if p.suffix == ".json":
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        elif p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


class PoolEmbedder:
    """A local CLIP vision tower (`unipers.models.embedders.ClipEmbedder`, vision only) streaming a pool's
    files; ``embed_*`` return unit-norm float16 rows."""

    def __init__(self, clip_path: Path | str, device: str | None = None, batch_size: int = 32, num_workers: int = 0):
        import torch

        from unipers.models.embedders import ClipEmbedder

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = ClipEmbedder.load(clip_path, self.device, key="--clip", metric="retrieval", text=False)
        self.processor = self.clip.image_processor
        self.batch_size, self.num_workers = batch_size, num_workers
        sides = [getattr(d, k, None) if not isinstance(d, dict) else d.get(k)
                 for d in (self.processor.crop_size, self.processor.size) if d
                 for k in ("height", "width", "shortest_edge")]
        self.draft = 2 * max([v for v in sides if isinstance(v, int)] or [224])  # JPEG decode size
        self.forward_calls = 0

    def embed_pixels(self, pixel_values) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.clip.image_features(pixel_values.to(self.device)).float()
        self.forward_calls += 1
        out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy().astype(np.float16)

    def embed_images(self, images: Sequence) -> np.ndarray:
        """Embed in-memory PIL images (the concept's photos)."""
        rows = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            rows.append(self.embed_pixels(px))
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float16)

    @property
    def dim(self) -> int:
        return self.clip.dim

    def embed_files(self, paths: Sequence[Path], desc: str = "embedding pool",
                    quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Stream files through a DataLoader; returns (float16 embeddings, ok mask)."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        emb = np.zeros((len(paths), self.dim), np.float16)
        ok_all = np.zeros(len(paths), bool)
        loader = DataLoader(_PoolFiles(paths, self.processor, self.draft), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=_collate_pool)
        start = 0
        with tqdm(total=len(paths), desc=desc, unit="img", disable=quiet or not paths) as bar:
            for px, ok in loader:
                if px is not None:
                    emb[start:start + len(ok)][ok] = self.embed_pixels(px)
                ok_all[start:start + len(ok)] = ok
                start += len(ok)
                bar.update(len(ok))
        return emb, ok_all


class _PoolFiles:
    """Map-style dataset over image files (module level so DataLoader workers can pickle it)."""

    def __init__(self, paths: Sequence[Path], processor, draft: int):
        self.paths, self.processor, self.draft = paths, processor, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = open_rgb(self.paths[i], draft=self.draft)
        except PhotoError:
            return None  # unreadable: flagged, its row stays zero
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]


def _collate_pool(batch):
    import torch

    ok = np.array([b is not None for b in batch])
    good = [b for b in batch if b is not None]
    return (torch.stack(good) if good else None), ok


def _cache_writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _load_cache(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("files", "sizes", "mtimes", "emb", "ok")}
    except (OSError, KeyError, ValueError):
        return None  # missing or damaged cache: recompute


def _save_cache(path: Path, files, sizes, mtimes, emb, ok) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, files=np.array(files, dtype=str), sizes=np.asarray(sizes, np.int64),
             mtimes=np.asarray(mtimes, np.int64), emb=emb, ok=ok)
    os.replace(tmp, path)  # concurrent jobs on one pool: readers never see a half-written cache


def embed_pool(pool: Path | str, embedder: PoolEmbedder, fingerprint: str, *, fallback_cache_dir: Path | None = None,
               quiet: bool = False, checkpoint_every: int = 20000) -> PoolEmbeddings:
    """Embeddings for every image under ``pool``, reusing and updating the cache (saved every
    ``checkpoint_every`` new images too, so a killed job over a huge pool keeps its progress)."""
    pool = Path(pool).absolute()
    listing = list_pool(pool)
    if not listing:
        raise FileNotFoundError(f"no images in the negative pool {pool}")
    primary = pool / CACHE_DIRNAME / f"{fingerprint}.npz"
    fallback = None
    if fallback_cache_dir is not None:
        pool_id = hashlib.sha256(str(pool).encode()).hexdigest()[:12]
        fallback = Path(fallback_cache_dir) / f"{pool.name}-{pool_id}-{fingerprint}.npz"
    cached = None
    for candidate in (primary, fallback):
        if candidate is not None and candidate.exists() and (cached := _load_cache(candidate)) is not None:
            break
    index, n_cached = {}, 0
    if cached is not None and cached["emb"].shape[1:] == (embedder.dim,):
        n_cached = len(cached["files"])
        rows = zip(cached["files"].tolist(), cached["sizes"].tolist(), cached["mtimes"].tolist())
        index = {f: (s, m, i) for i, (f, s, m) in enumerate(rows)}
    files = [f for f, _, _ in listing]
    emb = np.zeros((len(files), embedder.dim), np.float16)
    ok = np.zeros(len(files), bool)
    todo = []
    for row, (f, size, mtime) in enumerate(listing):
        hit = index.get(f)
        if hit is not None and hit[:2] == (size, mtime):
            emb[row], ok[row] = cached["emb"][hit[2]], cached["ok"][hit[2]]
        else:
            todo.append(row)
    del cached, index
    result = PoolEmbeddings(pool, files, emb, ok, reused=len(files) - len(todo), embedded=len(todo))
    target = primary if _cache_writable(primary.parent) else fallback
    if target is None:
        result.notes.append(f"pool folder {pool} is read-only and no fallback cache folder was given: "
                            "embeddings not cached")
    elif target is fallback:
        result.notes.append(f"pool folder {pool} is read-only: caching embeddings in {target}")
    sizes = np.array([s for _, s, _ in listing], np.int64)
    mtimes = np.array([m for _, _, m in listing], np.int64)

    def save(rows: np.ndarray | None = None) -> None:  # None: every row, without copying the matrix
        nonlocal target
        if target is None:
            return
        sel = slice(None) if rows is None else rows
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _save_cache(target, files if rows is None else [files[i] for i in rows], sizes[sel], mtimes[sel],
                        emb[sel], ok[sel])
        except OSError as e:
            result.notes.append(f"could not write the embedding cache {target}: {e}")
            target = None

    done = np.ones(len(files), bool)
    done[todo] = False
    for a in range(0, len(todo), checkpoint_every):
        rows = todo[a:a + checkpoint_every]
        n_parts = -(-len(todo) // checkpoint_every)
        desc = "embedding pool" + (f" ({a // checkpoint_every + 1}/{n_parts})" if n_parts > 1 else "")
        emb[rows], ok[rows] = embedder.embed_files([pool / files[r] for r in rows], desc=desc, quiet=quiet)
        done[rows] = True
        if a + checkpoint_every < len(todo):
            save(np.flatnonzero(done))  # a job killed mid-pool resumes from here
    if todo or n_cached != len(files) or (target is not None and not target.exists()):  # added/modified/removed
        save()
    result.cache_file = target
    if not ok.all():
        result.notes.append(f"{int((~ok).sum())} pool file(s) could not be read and were left out")
    return result


def select_from_pool(pool_emb: np.ndarray, ok: np.ndarray, train_emb: np.ndarray, positive_emb: np.ndarray, *,
                     n_soft: int, n_hard: int, n_easy: int, near_duplicate: float, seed: int) -> Selection:
    """Choose soft positives, hard and easy negatives (see the module docstring). Deterministic."""
    n = len(pool_emb)
    mean = train_emb.astype(np.float32).mean(0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    pos = positive_emb.astype(np.float32)
    sims, max_pos = np.empty(n, np.float32), np.full(n, -1.0, np.float32)
    for a in range(0, n, 65536):  # chunks: no float32 copy of the whole matrix
        chunk = pool_emb[a:a + 65536].astype(np.float32)
        sims[a:a + len(chunk)] = chunk @ mean
        if len(pos):
            max_pos[a:a + len(chunk)] = (chunk @ pos.T).max(1)
    near = ok & (max_pos > near_duplicate)
    cand = np.flatnonzero(ok & ~near)
    k = min(n_soft + n_hard, len(cand))
    top = cand[np.argpartition(-sims[cand], k - 1)[:k]] if k else cand[:0]
    top = sorted(top.tolist(), key=lambda i: (-float(sims[i]), i))  # ties broken by file order
    soft, hard = top[:n_soft], top[n_soft:]
    taken = np.zeros(n, bool)
    taken[top] = True
    rest = np.flatnonzero(ok & ~near & ~taken)
    picks = random.Random(seed).sample(range(len(rest)), min(n_easy, len(rest)))
    easy = [int(rest[p]) for p in picks]
    near_idx = sorted(np.flatnonzero(near).tolist(), key=lambda i: (-float(max_pos[i]), i))
    return Selection(soft, hard, easy, near_idx, sims, max_pos)


def similarity_to_slots(sims: Sequence[float], num_slots: int, lo: float | None = None,
                        hi: float | None = None) -> list[int]:
    """Map similarity linearly from [lo, hi] to [1, num_slots] generation slots (Yo'Chameleon's soft
    positives: the closer an image is to the concept, the more of the concept's tokens its prompt uses).
    ``lo`` / ``hi`` default to the smallest / largest of ``sims``; values outside are clipped."""
    if not len(sims):
        return []
    lo = min(sims) if lo is None else lo
    hi = max(sims) if hi is None else hi
    if hi <= lo:
        return [num_slots if s >= hi else 1 for s in sims]
    out = []
    for s in sims:
        t = (min(max(s, lo), hi) - lo) / (hi - lo)
        out.append(1 + int(np.floor(t * (num_slots - 1) + 0.5)))
    return out


def retrieval_summary(pool: PoolEmbeddings, clip_path: Path, fingerprint: str, sel: Selection, **settings) -> dict:
    """The deterministic part of a retrieval, for concept.json (cache statistics go in the report)."""
    return {
        "pool": str(pool.root),
        "clip": str(Path(clip_path).absolute()),
        "clip_fingerprint": fingerprint,
        "pool_size": len(pool.files),
        "unreadable": [pool.files[i] for i in np.flatnonzero(~pool.ok).tolist()],
        "near_duplicates": [{"file": pool.files[i], "similarity": round(float(sel.max_pos_sims[i]), 4)}
                            for i in sel.near_duplicates],
        **json.loads(json.dumps(settings)),
    }


@dataclass
class Retrieved:
    """What ``prepare`` needs from retrieval: files to copy, a summary for concept.json, report notes."""

    negatives: list = field(default_factory=list)  # (path, "hard" | "easy", similarity)
    soft: list = field(default_factory=list)  # (path, similarity, gen_slots)
    summary: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def retrieve_for_concept(train_images: Sequence, positive_images: Sequence, pool: Path | str | None,
                         clip_path: Path | str | None, *, seed: int, options, out_dir: Path) -> Retrieved:
    """Embed the pool (cached) and the concept photos, select negatives and soft positives.

    Without a pool or a CLIP path nothing is retrieved and ``summary`` says why (``{"skipped": ...}``).
    ``options`` is a ``PrepareOptions``."""
    if pool is None or clip_path is None:
        why = ("no --negatives pool given" if pool is None and clip_path is None else
               "--negatives given without --clip (no CLIP model to rank the pool)" if clip_path is None else
               "--clip given without --negatives (no pool to retrieve from)")
        return Retrieved(summary={"skipped": why},
                         notes=[f"retrieval skipped: {why}; positives only (no negatives, no soft positives)"])
    pool, clip_path = Path(pool), Path(clip_path)
    if not pool.is_dir():
        raise NotADirectoryError(f"negative pool is not a folder: {pool}")
    if not (clip_path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {clip_path} (expected a save_pretrained folder with config.json)")
    fp = clip_fingerprint(clip_path)
    embedder = PoolEmbedder(clip_path, device=options.device, batch_size=options.batch_size,
                            num_workers=options.num_workers)
    fallback = options.clip_cache or Path(out_dir).parent / CACHE_DIRNAME
    pe = embed_pool(pool, embedder, fp, fallback_cache_dir=fallback, quiet=options.quiet)
    # Concept rows go through float16 like the cached pool rows, so a cached and a fresh run agree.
    train_emb = embedder.embed_images(list(train_images))
    pos_emb = embedder.embed_images(list(positive_images))
    sel = select_from_pool(pe.emb, pe.ok, train_emb, pos_emb, n_soft=options.n_soft, n_hard=options.n_hard,
                           n_easy=options.n_easy, near_duplicate=options.near_duplicate, seed=seed)
    lo, hi = options.soft_range or (None, None)
    soft_sims = [round(float(sel.sims[i]), 4) for i in sel.soft]
    slots = similarity_to_slots(soft_sims, options.num_gen_slots, lo, hi)
    out = Retrieved(
        negatives=[(pool / pe.files[i], "hard", round(float(sel.sims[i]), 4)) for i in sel.hard]
        + [(pool / pe.files[i], "easy", round(float(sel.sims[i]), 4)) for i in sel.easy],
        soft=[(pool / pe.files[i], s, k) for i, s, k in zip(sel.soft, soft_sims, slots)],
        notes=list(pe.notes))
    out.summary = retrieval_summary(
        pe, clip_path, fp, sel, n_hard=len(sel.hard), n_easy=len(sel.easy), n_soft=len(sel.soft),
        near_duplicate_threshold=options.near_duplicate,
        soft_range=[min(soft_sims), max(soft_sims)] if options.soft_range is None and soft_sims else options.soft_range,
        num_gen_slots=options.num_gen_slots)
    cache = f"cache {pe.cache_file}" if pe.cache_file else "not cached"
    out.notes.insert(0, f"pool: {len(pe.files)} images, {pe.reused} embeddings reused, {pe.embedded} computed "
                        f"({cache})")
    return out
