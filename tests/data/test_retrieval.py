"""CLIP retrieval: hardest negatives really are the top cosine ones, slots are monotone, cache is reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from unipers.data import retrieval
from unipers.data.prepare import PrepareOptions, prepare_concept
from unipers.data.retrieval import PoolEmbedder, embed_pool, select_from_pool, similarity_to_slots
from synthetic import shape_image, write_pool

OPTS = dict(n_soft=4, n_hard=8, n_easy=5, near_duplicate=0.995, quiet=True, batch_size=16)


@pytest.fixture(scope="module")
def embedder(tiny_clip):
    return PoolEmbedder(tiny_clip, device="cpu", batch_size=16)


def independent_embeddings(clip_path, images) -> np.ndarray:
    """Embed with the model and processor directly (not through retrieval.py)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(clip_path).eval()
    px = CLIPImageProcessor.from_pretrained(clip_path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = model(pixel_values=px).image_embeds
    return torch.nn.functional.normalize(e, dim=-1).numpy()


def test_hard_negatives_are_the_top_cosine_ones(tmp_path, photos_dir, pool_dir, tiny_clip):
    from PIL import Image

    out = prepare_concept(photos_dir, "bo", tmp_path / "out", negatives=pool_dir, clip_path=tiny_clip,
                          options=PrepareOptions(**OPTS))
    concept = json.loads((out / "concept.json").read_text())
    src = concept["sources"]
    pool_files = sorted(str(p) for p in pool_dir.rglob("*.png"))
    pool_emb = independent_embeddings(tiny_clip, [Image.open(f).convert("RGB") for f in pool_files])
    train_emb = independent_embeddings(tiny_clip, [Image.open(out / p) for p in concept["train"]])
    mean = train_emb.mean(0)
    sims = dict(zip(pool_files, pool_emb @ (mean / np.linalg.norm(mean))))

    details = concept["negative_details"]
    hard = [src[d["image"]] for d in details if d["kind"] == "hard"]
    easy = [src[d["image"]] for d in details if d["kind"] == "easy"]
    soft = [src[s["image"]] for s in concept["soft_positives"]]
    near = [str(pool_dir / d["file"]) for d in concept["retrieval"]["near_duplicates"]]
    assert (len(soft), len(hard), len(easy)) == (4, 8, 5)
    assert len(set(hard) | set(soft) | set(easy) | set(near)) == len(hard) + len(soft) + len(easy) + len(near)
    rest = [f for f in pool_files if f not in set(hard) | set(soft) | set(near)]
    tol = 2e-3  # float16 cache
    assert min(sims[f] for f in soft) >= max(sims[f] for f in hard) - tol
    assert min(sims[f] for f in hard) >= max(sims[f] for f in rest) - tol
    for d in details:  # the recorded similarity is the recomputed one
        assert d["similarity"] == pytest.approx(sims[src[d["image"]]], abs=tol)
    # hard negatives are listed hardest first, soft positives most similar first
    assert [d["similarity"] for d in details if d["kind"] == "hard"] == sorted(
        (d["similarity"] for d in details if d["kind"] == "hard"), reverse=True)
    slots = [s["gen_slots"] for s in concept["soft_positives"]]
    assert slots == sorted(slots, reverse=True) and slots[0] == 8 and slots[-1] == 1
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    soft_recs = [json.loads(x) for x in manifest if '"soft_positive"' in x]
    assert [(r["gen_slots"], r["similarity"]) for r in soft_recs] == [
        (s["gen_slots"], s["similarity"]) for s in concept["soft_positives"]]
    neg_recs = [json.loads(x) for x in manifest if '"label": false' in x]
    assert {r["split"] for r in neg_recs} == {"train", "val"}
    assert {r["image"] for r in neg_recs if r["split"] == "val"} <= set(concept["val_negatives"])


def test_near_duplicates_of_the_concept_are_not_negatives(tmp_path, photos_dir, pool_dir, tiny_clip):
    import shutil

    shutil.copy(sorted(photos_dir.iterdir())[0], pool_dir / "copy_of_bo.png")  # the user's photo is in the pool
    out = prepare_concept(photos_dir, "bo", tmp_path / "out", negatives=pool_dir, clip_path=tiny_clip,
                          options=PrepareOptions(**OPTS))
    concept = json.loads((out / "concept.json").read_text())
    assert "copy_of_bo.png" in [d["file"] for d in concept["retrieval"]["near_duplicates"]]
    assert not any(v.endswith("copy_of_bo.png") for v in concept["sources"].values())


def test_similarity_to_slots_is_linear_and_monotone():
    sims = [0.9, 0.5, 0.75, 0.6, 0.8]
    assert similarity_to_slots(sims, 8) == [8, 1, 5, 3, 6]  # 1 + round((s - 0.5) / 0.4 * 7)
    grid = np.linspace(0.0, 1.0, 101).tolist()
    s = similarity_to_slots(grid, 8, lo=0.2, hi=0.8)
    assert s == sorted(s) and s[0] == 1 and s[-1] == 8 and s[20] == 1 and s[80] == 8
    assert similarity_to_slots([0.5, 0.5], 4) == [4, 4]
    assert similarity_to_slots([], 8) == []


def test_select_from_pool_is_deterministic_and_disjoint():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(500, 8)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    concept = pool[:3] * 1.0  # three pool rows are the concept's own photos
    ok = np.ones(500, bool)
    ok[7] = False
    kw = dict(n_soft=10, n_hard=20, n_easy=30, near_duplicate=0.99)
    a = select_from_pool(pool, ok, concept, concept, seed=1, **kw)
    b = select_from_pool(pool, ok, concept, concept, seed=1, **kw)
    c = select_from_pool(pool, ok, concept, concept, seed=2, **kw)
    assert (a.soft, a.hard, a.easy) == (b.soft, b.hard, b.easy) and a.easy != c.easy
    assert set(a.near_duplicates) == {0, 1, 2}
    chosen = a.soft + a.hard + a.easy
    assert len(set(chosen)) == 60 and 7 not in chosen and not set(chosen) & {0, 1, 2}
    order = [i for i in np.argsort(-a.sims, kind="stable") if i not in (0, 1, 2, 7)]
    assert a.soft + a.hard == [int(i) for i in order[:30]]


def test_cache_is_reused_then_updated_when_the_pool_changes(tmp_path, embedder):
    pool = write_pool(tmp_path / "pool", 20)
    first = embed_pool(pool, embedder, "fp", quiet=True)
    assert (first.embedded, first.reused) == (20, 0)
    cache = pool / ".unipers_clip_cache" / "fp.npz"
    assert first.cache_file == cache and cache.is_file()
    mtime = cache.stat().st_mtime_ns

    calls = embedder.forward_calls
    second = embed_pool(pool, embedder, "fp", quiet=True)
    assert (second.embedded, second.reused) == (0, 20) and embedder.forward_calls == calls
    assert cache.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.emb, second.emb)

    changed = pool / "pool_001.png"
    shape_image(999, (64, 64)).save(changed)
    os.utime(changed, ns=(mtime + 10**9, mtime + 10**9))
    shape_image(998, (64, 64)).save(pool / "new.png")
    (pool / "pool_002.png").unlink()
    third = embed_pool(pool, embedder, "fp", quiet=True)
    assert (third.embedded, third.reused) == (2, 18) and len(third.files) == 20
    assert "pool_002.png" not in third.files
    row = third.files.index("pool_001.png")
    fresh = embedder.embed_files([changed], quiet=True)[0][0]
    np.testing.assert_array_equal(third.emb[row], fresh)
    assert not np.array_equal(third.emb[row], first.emb[first.files.index("pool_001.png")])
    assert embed_pool(pool, embedder, "fp", quiet=True).embedded == 0  # the update was saved
    assert embed_pool(pool, embedder, "other-clip", quiet=True).embedded == 20  # keyed by CLIP fingerprint


def test_a_killed_embedding_run_keeps_its_progress(tmp_path, embedder, monkeypatch):
    pool = write_pool(tmp_path / "pool", 10)
    real, calls = embedder.embed_files, []

    def dies_on_third_chunk(paths, **kw):
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed
        return real(paths, **kw)

    monkeypatch.setattr(embedder, "embed_files", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed_pool(pool, embedder, "fp", quiet=True, checkpoint_every=4)
    monkeypatch.undo()
    again = embed_pool(pool, embedder, "fp", quiet=True, checkpoint_every=4)
    assert (again.reused, again.embedded) == (8, 2)


def test_read_only_pool_falls_back_to_another_cache(tmp_path, embedder, monkeypatch):
    pool = write_pool(tmp_path / "pool", 6)
    real = retrieval._cache_writable
    inside_pool = lambda d: Path(d) == pool or pool in Path(d).parents  # noqa: E731
    monkeypatch.setattr(retrieval, "_cache_writable", lambda d: False if inside_pool(d) else real(d))
    got = embed_pool(pool, embedder, "fp", fallback_cache_dir=tmp_path / "fallback", quiet=True)
    assert got.cache_file.parent == tmp_path / "fallback" and got.cache_file.is_file()
    assert not (pool / ".unipers_clip_cache" / "fp.npz").exists()
    assert any("read-only" in n for n in got.notes)
    assert embed_pool(pool, embedder, "fp", fallback_cache_dir=tmp_path / "fallback", quiet=True).reused == 6


def test_unreadable_pool_files_are_left_out(tmp_path, embedder):
    pool = write_pool(tmp_path / "pool", 5)
    (pool / "broken.png").write_text("not an image")
    got = embed_pool(pool, embedder, "fp", quiet=True)
    bad = got.files.index("broken.png")
    assert not got.ok[bad] and got.ok.sum() == 5 and any("could not be read" in n for n in got.notes)
    sel = select_from_pool(got.emb, got.ok, got.emb[:2], got.emb[:2], n_soft=2, n_hard=10, n_easy=10,
                           near_duplicate=1.1, seed=0)
    assert bad not in sel.soft + sel.hard + sel.easy


def test_missing_clip_or_pool_is_reported_not_fatal(tmp_path, photos_dir, pool_dir):
    out = prepare_concept(photos_dir, "bo", tmp_path / "out", negatives=pool_dir)
    concept = json.loads((out / "concept.json").read_text())
    assert "without --clip" in concept["retrieval"]["skipped"]
    assert concept["negatives"] == [] and concept["soft_positives"] == []
    assert "retrieval: skipped" in (out / "report.txt").read_text()
