"""`unipers world build` at micro size: every stage runs, a killed build resumes at its stage, and the
result loads through the same config path the demo uses. The decoder side trains in a second process,
which takes the build's settings as arguments (the micro fixture's too)."""

import json

import pytest

from unipers.world.build import WorldRecipe

MICRO = WorldRecipe(steps=dict(tokenizer=2, pretrain=2, vae=2, align=2, classifier=2), n_train=48, n_classifier_held=16)


@pytest.fixture
def micro():
    """The build module; its stages are built with the MICRO recipe (tests patch a stage on the module)."""
    from unipers.world import build

    return build


def test_killed_build_resumes_at_its_stage_and_loads(micro, tmp_path, monkeypatch):
    root = tmp_path / "world"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the backbone stage")

    real, real_align = micro.build_backbone, micro.run_world_align
    monkeypatch.setattr(micro, "build_backbone", killed)
    with pytest.raises(KeyboardInterrupt):
        micro.build_world(root, MICRO, quiet=True)
    assert not (root / "backbone").exists() and not (root / "world.json").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "a half-written stage was left behind"

    monkeypatch.setattr(micro, "build_backbone", real)
    monkeypatch.setattr(micro, "run_world_align", killed)
    with pytest.raises(KeyboardInterrupt):
        micro.build_world(root, MICRO, quiet=True)
    assert (root / "backbone" / "config.json").is_file() and (root / "decoder" / "model_index.json").is_file()
    assert not (root / "align").exists() and not (root / "world.json").exists()
    done = {p: p.stat().st_mtime_ns for p in (root / "backbone" / "model.safetensors",
                                               root / "decoder" / "vae" / "diffusion_pytorch_model.safetensors",
                                               root / "classifier.safetensors")}

    monkeypatch.setattr(micro, "run_world_align", real_align)
    micro.build_world(root, MICRO, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # not trained again
    info = json.loads((root / "world.json").read_text())
    assert set(info["stages"]) == {"backbone", "decoder", "align", "classifier"}
    assert info["held_out_object"] == {"shape": "star", "colour": "purple", "pattern": "striped"}
    assert micro.is_built(root)

    from unipers.inference.session import InferenceSession

    session = InferenceSession.from_config(micro.world_config(root), device="cpu")
    images = session.generate(["A photo of a star."], num_images=2, steps=2).tensors
    assert images.shape == (2, 3, 32, 32)


def test_the_demo_object_is_never_in_the_training_photos(micro):
    objects, images = micro.training_photos(0, MICRO)
    assert micro.demo_object() not in objects
    assert len(objects) == len(images) == MICRO.n_train


def test_world_align_on_cached_latents_ends_where_per_batch_encoding_ends(micro, tmp_path, tiny_dirs):
    """The build aligns on latents encoded once: the world's VAE (no attention) gives an image the same
    latents in a cache chunk of 32 as in a shuffled batch of 32, so the run ends at the same weights as one
    encoding every batch."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from unipers.config import load_config
    from unipers.models.tiny_decoder import build_tiny_decoder
    from unipers.training.run import train

    decoder = build_tiny_decoder(tmp_path / "decoder", seed=0, **MICRO.decoder)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    with open(pairs / "captions.jsonl", "w") as f:
        for i in range(64):
            Image.effect_noise((32, 32), 20 + i).convert("RGB").save(pairs / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": f"picture {i}"}) + "\n")
    ends = {}
    for cache in (True, False):
        run = train(load_config(["base"], [
            "stage=align", f"data.pairs={pairs}", f"decoder.path={decoder}", "trainer.max_steps=3",
            "data.batch_size=32", f"data.cache_latents={str(cache).lower()}", "align.train_decoder=none",
            f"run_dir={tmp_path / f'align-{cache}'}", "trainer.progress_bar=false"]))
        ends[cache] = load_file(run / "connector.safetensors")
    assert len(list((pairs / "cache").glob("latents-*.safetensors"))) == 1
    assert ends[True].keys() == ends[False].keys()
    assert all(torch.equal(ends[True][k], ends[False][k]) for k in ends[True])


def _weights(root):
    from safetensors.torch import load_file

    return {str(f.relative_to(root)): load_file(f) for f in sorted(root.rglob("*.safetensors")) if "cache" not in f.parts}


def test_the_build_uses_its_own_thread_count_whatever_the_process_has(micro, tmp_path):
    """Every stage runs at the recipe's thread count: a process with one thread and one with two build the same bits
    (thread counts split float sums differently), and the process's count is restored."""
    import torch

    before = torch.get_num_threads()
    seen = []
    real = micro.run_world_align

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    micro.run_world_align = spy
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            micro.build_world(tmp_path / f"t{n}", MICRO, quiet=True)
            assert torch.get_num_threads() == n
    finally:
        micro.run_world_align = real
        torch.set_num_threads(before)
    assert seen == [MICRO.threads, MICRO.threads]
    a, b = _weights(tmp_path / "t1"), _weights(tmp_path / "t2")
    assert a.keys() == b.keys() and len(a) >= 5
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    info = json.loads((tmp_path / "t1" / "world.json").read_text())
    assert info["cpu"]["threads"] == MICRO.threads and info["cpu"]["torch_capability"]


def test_a_world_seed_is_another_draw_and_a_built_world_keeps_its_own(micro, tmp_path):
    import torch

    micro.build_world(tmp_path / "w0", MICRO, quiet=True)
    micro.build_world(tmp_path / "w1", MICRO, quiet=True, seed=1)
    assert json.loads((tmp_path / "w1" / "world.json").read_text())["seed"] == 1
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w1")
    backbone = "backbone/model.safetensors"
    assert any(not torch.equal(a[backbone][k], b[backbone][k]) for k in a[backbone])
    assert micro.build_world(tmp_path / "w1", MICRO, quiet=True) == (tmp_path / "w1").absolute()  # reused as it is
    with pytest.raises(FileExistsError, match="seed 1, not 0"):
        micro.build_world(tmp_path / "w1", MICRO, quiet=True, seed=0)


def test_a_part_built_world_of_another_version_is_refused_not_relabelled(micro, tmp_path):
    """An older build's stages are not taken for this version's: the folder is left as it is."""
    root = tmp_path / "old"
    root.mkdir()
    old = json.dumps({"backbone": {"seconds": 1.0}}) + "\n"  # an older build's record: stages only
    (root / "stages.json").write_text(old)
    with pytest.raises(FileExistsError, match="--force"):
        micro.build_world(root, MICRO, quiet=True)
    assert sorted(p.name for p in root.iterdir()) == ["stages.json"]
    assert (root / "stages.json").read_text() == old


def test_force_deletes_only_a_world_folder(micro, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_bytes(b"\\documentclass{article}\n")
    with pytest.raises(FileExistsError, match="not a world folder"):
        micro.build_world(mine, force=True, quiet=True)
    assert (mine / "thesis.tex").read_bytes() == b"\\documentclass{article}\n"
