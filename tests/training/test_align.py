"""Align stage: the pair datasets (folder and tar shards), the AlignModule's allow-list, what it saves, and
that personalize loads the connector it writes."""

from __future__ import annotations

import io
import json
import tarfile

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from unipers.concepts.io import ConceptFileError
from unipers.config import load_config
from unipers.data.pairs import CaptionFolderDataset, TarShardDataset, build_align_data, expand_shards, pair_collate
from unipers.models.connector import read_connector_metadata
from unipers.models.unified import UnifiedModel
from unipers.models.decoder_delta import apply_decoder_delta, decoder_delta_path
from unipers.training.align import AlignModule
from unipers.training.schedule import warmup_cosine
from unipers.training.state import CheckpointError

SIZE = 32  # the tiny decoder's image size


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def model(tiny_dirs):
    return UnifiedModel.from_config(load_config([], []))


def make_module(model, **kwargs):
    args = dict(lr=1e-3, weight_decay=0.01, warmup_steps=2, max_steps=6, seed=0)
    return AlignModule(model, **{**args, **kwargs})


def fixed_batch(align_pairs, n=4):
    ds = CaptionFolderDataset(align_pairs["folder"], align_pairs["captions"], SIZE)
    return pair_collate([ds[i] for i in range(0, 3 * n, 3)])


def manual_steps(module, batch, steps):
    optimizer = module.configure_optimizers()["optimizer"]
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        module.shared_step(batch, torch.Generator().manual_seed(step)).backward()
        optimizer.step()


def trainable_count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- data -----------------------------------------------------------------------------------------------
def test_folder_and_shards_yield_the_same_pairs(align_pairs):
    folder = {it["key"]: it for it in CaptionFolderDataset(align_pairs["folder"], align_pairs["captions"], SIZE)}
    shards = {it["key"]: it for it in TarShardDataset(align_pairs["shards"], SIZE, shuffle_buffer=4)}
    assert set(folder) == set(shards) == set(align_pairs["pairs"])
    for key, it in folder.items():
        assert it["caption"] == shards[key]["caption"] == align_pairs["pairs"][key]
        assert it["pixels"].shape == (3, SIZE, SIZE) and -1 <= it["pixels"].min() <= it["pixels"].max() <= 1
        assert torch.equal(it["pixels"], shards[key]["pixels"])
    pattern = str(align_pairs["root"] / "shards" / "pairs-{000..003}.tar")
    assert expand_shards(pattern) == align_pairs["shards"]
    for kind, source in (("folder", align_pairs["folder"]), ("shards", pattern)):
        batch = next(iter(build_align_data(kind, source, image_size=SIZE, batch_size=5, world_size=1, rank=0)))
        assert batch["pixels"].shape == (5, 3, SIZE, SIZE) and len(batch["captions"]) == len(batch["keys"]) == 5


def test_shards_split_over_ranks_and_workers(align_pairs):
    seen = []
    for rank in range(2):
        ds = TarShardDataset(align_pairs["shards"], SIZE, rank=rank, world_size=2, seed=3, shuffle_buffer=2)
        seen += [it["key"] for it in DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(seen) == len(set(seen)) and set(seen) == set(align_pairs["pairs"])  # no overlap, full coverage
    ds = TarShardDataset(align_pairs["shards"], SIZE, seed=3)
    for epoch in range(3):  # a new shard order per epoch, always a partition over (rank, worker)
        parts = [s for r in range(2) for w in range(2) for s in ds.shards_for(epoch, r, 2, w, 2)]
        assert sorted(parts) == sorted(align_pairs["shards"])
    assert len({tuple(ds.shards_for(epoch, 0, 1)) for epoch in range(3)}) > 1
    endless = iter(TarShardDataset(align_pairs["shards"], SIZE, repeat=True, shuffle_buffer=5))
    keys = [next(endless)["key"] for _ in range(2 * len(align_pairs["pairs"]))]
    assert sorted(keys) == sorted(list(align_pairs["pairs"]) * 2)  # two whole epochs


def test_unreadable_pairs_are_skipped_and_counted(align_pairs, tmp_path, caplog):
    good = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 24), (10, 200, 10)).save(good, format="JPEG")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        add_tar_member(tar, "a.jpg", good.getvalue())
        add_tar_member(tar, "a.txt", b"a green field")
        add_tar_member(tar, "b.png", b"\x89PNG not really")  # corrupt image
        add_tar_member(tar, "b.txt", b"broken")
        add_tar_member(tar, "c.jpg", good.getvalue())  # no caption
        add_tar_member(tar, "d.jpg", good.getvalue())
        add_tar_member(tar, "d.json", b'{"caption": 3}')  # caption not a string
        add_tar_member(tar, "e.txt", b"no image")
    with tarfile.open(bad) as tar:
        cut = tar.getmember("d.jpg").offset_data + 10
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(bad.read_bytes()[:cut])  # ends inside d.jpg
    ds = TarShardDataset([str(bad), str(truncated)], SIZE, shuffle_buffer=0)
    items = list(ds)
    assert [it["key"] for it in items] == ["a", "a"]
    assert items[0]["pixels"].shape == (3, SIZE, SIZE)
    assert dict(ds.skipped) == {"bad_image": 2, "no_caption": 2, "bad_caption": 1, "no_image": 1, "bad_shard": 1}
    assert "truncated.tar" in caplog.text


def test_caption_folder_errors_name_the_file_and_line(align_pairs, tmp_path):
    lines = align_pairs["captions"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        CaptionFolderDataset(align_pairs["folder"], bad, SIZE)
    bad.write_text(lines[0] + '\n{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        CaptionFolderDataset(align_pairs["folder"], bad, SIZE)
    bad.write_text(lines[0] + "\n" + json.dumps({"image": "images/gone.png", "caption": "c"}) + "\n")
    with pytest.raises(FileNotFoundError, match="bad.jsonl:2.*gone.png"):
        CaptionFolderDataset(align_pairs["folder"], bad, SIZE)


def test_cached_latents_stand_in_for_the_images(model, align_pairs, tmp_path):
    """A folder's latents are encoded once (`latent_cache(..., root=folder)`, one file under
    ``<folder>/cache/``); a loader over them gives the loss the images give, and never reads an image."""
    import shutil

    from unipers.data.collate import latent_cache

    folder = tmp_path / "pairs"
    shutil.copytree(align_pairs["folder"], folder)
    paths = CaptionFolderDataset(folder, folder / "captions.jsonl", SIZE).image_paths
    latents = latent_cache(model, paths, root=folder)
    assert [f.name for f in (folder / "cache").iterdir()] == [f"latents-{model.decoder_fingerprint}.safetensors"]
    shutil.rmtree(folder / "images")  # training from the cache reads no image
    cached = build_align_data("folder", folder, image_size=SIZE, batch_size=4, rank=0, world_size=1, latents=latents)
    plain = build_align_data("folder", align_pairs["folder"], image_size=SIZE, batch_size=4, rank=0, world_size=1)
    module = make_module(model)
    for a, b in zip(cached, plain):
        assert "pixels" not in a and a["keys"] == b["keys"] and a["captions"] == b["captions"]
        with torch.no_grad():
            from_cache = module.shared_step(a, torch.Generator().manual_seed(1))
            from_images = module.shared_step(b, torch.Generator().manual_seed(1))
        assert torch.allclose(from_cache, from_images, rtol=1e-4)
    reloaded = latent_cache(model, paths, root=folder)  # the images are gone: only the file can answer
    assert reloaded.keys() == latents.keys() and all(torch.equal(reloaded[k], latents[k]) for k in latents)
    with pytest.raises(KeyError, match="no cached latents"):
        CaptionFolderDataset(folder, folder / "captions.jsonl", SIZE, latents={})
    with pytest.raises(ValueError, match="for kind='folder'"):
        build_align_data("shards", align_pairs["shards"], image_size=SIZE, batch_size=2, latents=latents)


def test_latent_cache_fills_in_batches_and_keeps_what_an_interrupted_encode_finished(model, align_pairs, tmp_path,
                                                                                      monkeypatch):
    """``data.cache_batch_size`` images per VAE batch, the file saved as it fills: a killed encode resumes
    where it stopped, and gives what an uninterrupted one gives."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    from unipers.config import ConfigError
    from unipers.data import collate

    folder = shutil.copytree(align_pairs["folder"], tmp_path / "pairs")
    paths = CaptionFolderDataset(folder, folder / "captions.jsonl", SIZE).image_paths
    real, batches = model.decoder.encode_images, []

    def spy(pixels):
        batches.append(len(pixels))
        if len(batches) == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return real(pixels)

    monkeypatch.setattr(collate, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(collate, "SAVE_STRETCH", 0.0)  # a save after every batch, however fast the machine
    monkeypatch.setattr(model.decoder, "encode_images", spy)
    with pytest.raises(KeyboardInterrupt):
        collate.latent_cache(model, paths, root=folder, batch_size=4)
    file = folder / "cache" / f"latents-{model.decoder_fingerprint}.safetensors"
    assert batches == [4, 4, 4] and len(load_file(str(file))) == 8  # the two finished batches
    batches.clear()
    latents = collate.latent_cache(model, paths, root=folder, batch_size=4)
    assert batches == [4]  # only the batch that was lost
    monkeypatch.setattr(model.decoder, "encode_images", real)
    again = shutil.copytree(align_pairs["folder"], tmp_path / "again")
    twin = {p: str(again / Path(p).relative_to(folder)) for p in paths}
    whole = collate.latent_cache(model, list(twin.values()), root=again)  # one uninterrupted encode
    assert [latents[p].allclose(whole[twin[p]], atol=1e-5) for p in paths] == [True] * 12
    assert load_config([], ["data.cache_batch_size=8"]).data.cache_batch_size == 8
    with pytest.raises(ConfigError, match="data.cache_batch_size"):
        load_config([], ["data.cache_batch_size=0"])


# ---- training -------------------------------------------------------------------------------------------
def test_align_trains_only_the_connector_and_checkpoints_only_it(model, align_pairs, tmp_path):
    backbone = {k: v.clone() for k, v in model.backbone.model.state_dict().items()}
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    connector = {k: v.clone() for k, v in model.connector.state_dict().items()}
    module = make_module(model)
    modes = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            m = pl_module.model
            modes.append((m.backbone.model.training, m.decoder.training, m.connector.training))

    def trainer(**kw):
        return L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **kw)

    loader = build_align_data("folder", align_pairs["folder"], image_size=SIZE, batch_size=2, rank=0, world_size=1)
    fit = trainer(callbacks=[Modes()])
    fit.fit(module, loader)
    assert fit.global_step == 6 and set(modes) == {(False, False, True)}  # frozen parts stay in eval
    assert {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]} == \
        {id(p) for p in model.connector.parameters()}
    assert any(not torch.equal(v, model.connector.state_dict()[k]) for k, v in connector.items())
    assert all(torch.equal(v, model.backbone.model.state_dict()[k]) for k, v in backbone.items())
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder.items())

    ckpt = tmp_path / "last.ckpt"
    fit.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert set(state["state_dict"]) == set(module.trainable_names) == {f"model.connector.{k}" for k in connector}
    assert state["hyper_parameters"]["train_decoder"] == "none"
    with pytest.raises(CheckpointError, match="lacks 64 trained tensor"):  # strict about what is trained
        make_module(UnifiedModel.from_config(load_config([], [])), train_decoder="lora").on_load_checkpoint(state)
    # Resume into a fresh model: the frozen bases come from their folders, the connector from the checkpoint.
    resumed = make_module(UnifiedModel.from_config(load_config([], [])))
    trainer().fit(resumed, loader, ckpt_path=ckpt)
    assert all(torch.equal(v, resumed.model.connector.state_dict()[k]) for k, v in model.connector.state_dict().items())


@pytest.mark.parametrize("mode", ["none", "lora", "blocks"])
def test_trainable_parameters_are_counted_exactly(model, mode):
    unet = model.decoder.unet
    expected = sum(p.numel() for p in model.connector.parameters())
    if mode == "lora":  # rank * (in + out) for every attention projection
        targets = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
                   and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
        assert len(targets) == 32  # 4 transformer blocks (down, mid, 2 up) x 2 attentions x 4 projections
        expected += sum(4 * (m.in_features + m.out_features) for m in targets)
    elif mode == "blocks":
        expected += sum(p.numel() for block in (unet.mid_block, unet.conv_out) for p in block.parameters())
    module = make_module(model, train_decoder=mode, lora_rank=4, unfreeze_blocks=["mid_block", "conv_out"])
    assert trainable_count(module) == expected
    assert sum(p.numel() for n, p in module.named_parameters() if n in module.trainable_names) == expected
    if mode == "lora":
        assert all(n.endswith((".lora_A.default.weight", ".lora_B.default.weight"))  # peft's adapters
                   for n in module.trainable_names if ".decoder." in n)
    params = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert params == {id(p) for p in module.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="no submodule 'mid'"):
        make_module(UnifiedModel.from_config(load_config([], [])), train_decoder="blocks", unfreeze_blocks=["mid"])


def test_loss_goes_down_on_a_fixed_batch(model, align_pairs):
    module = make_module(model, lr=3e-2, warmup_steps=0, max_steps=10)
    batch = fixed_batch(align_pairs, n=2)
    batch["latents"] = model.decoder.encode_images(batch["pixels"])  # encoded once, as a latent cache would
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(10):  # fixed noise and timesteps: the same objective every step
        optimizer.zero_grad(set_to_none=True)
        loss = module.shared_step(batch, torch.Generator().manual_seed(0))
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses)


def test_caption_dropout_blanks_a_seeded_share(model):
    module = make_module(model, caption_dropout=0.5)
    seen = []

    def capture(texts, mode):
        seen.append((list(texts), mode))
        raise StopIteration  # the captions are all this test needs

    model.encode_batch = capture
    for _ in range(2):
        with pytest.raises(StopIteration):
            module.shared_step({"captions": [f"caption {i}" for i in range(16)]}, torch.Generator().manual_seed(1))
    (first, mode), (second, _) = seen
    assert mode == "plain" and first == second and 0 < first.count("") < 16


def test_warmup_cosine_schedule():
    lr = [warmup_cosine(s, 12, ramp=4, delay=4) for s in range(14)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0] and lr[4] == 1.0 and lr[12] == lr[13] == 0.0
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))
    under = [warmup_cosine(s, 12, ramp=4, floor=0.1) for s in range(12)]  # the ramp over a decay from step 0
    assert under[0] == 0.25 and under[3] < 1.0 and abs(min(under) - 0.1) < 0.02
    assert [warmup_cosine(s, 12, ramp=3, delay=2, floor=1.0) for s in (0, 1, 2, 11)] == [1 / 3, 2 / 3, 1.0, 1.0]


# ---- outputs --------------------------------------------------------------------------------------------
def test_align_writes_a_connector_that_personalize_then_loads(model, align_pairs, tmp_path, other_backbone_dir):
    module = make_module(model)
    manual_steps(module, fixed_batch(align_pairs, n=2), 1)  # differ from a fresh seed-0 connector
    path = module.save_connector(tmp_path / "aligned" / "connector.safetensors")
    assert not decoder_delta_path(path).exists()  # the decoder was not trained
    meta = read_connector_metadata(path)
    assert meta["stage"] == "align" and meta["backbone_fingerprint"] == model.backbone.base_fingerprint
    assert meta["decoder_fingerprint"] == model.decoder_fingerprint and "unipers_version" in meta

    loaded = UnifiedModel.from_config(load_config([], [f"connector.path={path}"]))
    assert not any(p.requires_grad for p in loaded.connector.parameters())  # frozen while personalizing
    ids, mask = loaded.encode_batch(["a blue triangle on a table"], mode="gen")
    with torch.no_grad():
        ours, theirs = model.condition(ids, mask), loaded.condition(ids, mask)
    assert torch.equal(ours.embeds, theirs.embeds) and torch.equal(ours.pooled, theirs.pooled)

    with pytest.raises(ConceptFileError, match="backbone"):
        UnifiedModel.from_config(load_config([], [f"connector.path={path}", f"backbone.path={other_backbone_dir}"]))


@pytest.mark.parametrize("mode", ["lora", "blocks"])
def test_decoder_delta_reproduces_the_trained_decoder(model, align_pairs, tmp_path, mode):
    module = make_module(model, lr=1e-2, train_decoder=mode, lora_rank=4)
    batch = fixed_batch(align_pairs, n=2)
    manual_steps(module, batch, 1)
    path = module.save_connector(tmp_path / "connector.safetensors")
    from safetensors.torch import load_file

    delta = load_file(str(decoder_delta_path(path)))
    trained = {n[len("model.decoder."):].replace(".default.weight", "")  # peft's names -> the delta's
               for n in module.trainable_names if n.startswith("model.decoder.")}
    assert set(delta) == trained  # only the trained decoder tensors

    stock = UnifiedModel.from_config(load_config([])).decoder.state_dict()
    # from_config finds the delta beside the connector and applies it.
    fresh = UnifiedModel.from_config(load_config([], [f"connector.path={path}"]))
    changed = {k for k, v in fresh.decoder.state_dict().items() if not torch.equal(v, stock[k])}
    assert changed and all(k.startswith("unet.mid_block." if mode == "blocks" else "unet.") for k in changed)
    ids, mask = model.encode_batch(batch["captions"], mode="plain")
    latents = model.decoder.encode_images(batch["pixels"])
    with torch.no_grad():
        ours = model.diffusion_loss(ids, mask, latents, generator=torch.Generator().manual_seed(9))
        theirs = fresh.diffusion_loss(ids, mask, latents, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # LoRA merged into the weights: rounding only
    with pytest.raises(ConceptFileError, match="already applied"):
        apply_decoder_delta(fresh.decoder, decoder_delta_path(path))
