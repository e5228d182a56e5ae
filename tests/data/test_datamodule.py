"""ConceptDataModule: dynamic padding, answer-only labels, cached features, mixing, DDP shards, resume."""

import collections

import pytest
from PIL import Image

from unipers.config import load_config
from unipers.data.datamodule import ConceptDataModule
from unipers.data.prepare import prepare_concept
from unipers.data.sampler import MixtureSampler
from unipers.models.unified import UnifiedModel


def photos(folder, colour, n=5):
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (96 + 8 * i, 96), colour)
        im.paste((255 - i * 30, 20 * i, 128), (10 + 5 * i, 20, 50 + 5 * i, 70))
        im.save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    facts = root / "facts.txt"
    facts.write_text("<bo> has a red collar.\n<bo> is 3 years old.\n")
    bo = prepare_concept(photos(root / "bo_photos", (200, 120, 40)), "bo", root / "bo", class_word="dog", facts=facts)
    mam = prepare_concept(photos(root / "mam_photos", (40, 80, 200)), "mam", root / "mam", class_word="cat")
    return [bo, mam]


@pytest.fixture(scope="module")
def model(tiny_dirs):
    m = UnifiedModel.from_config(load_config([], ["bank.num_shared=2", "bank.num_und=2", "bank.num_gen=2"]))
    m.add_concept("bo", "dog")
    m.add_concept("mam", "cat")
    return m


def datamodule(prepared, model, **kw):
    dm = ConceptDataModule(prepared, batch_size=kw.pop("batch_size", 6), seed=kw.pop("seed", 0), **kw)
    dm.attach(model)
    return dm


def test_batches_are_dynamically_padded_with_answer_only_labels(prepared, model):
    dm = datamodule(prepared, model)
    tok = model.backbone.tokenizer
    seen_tasks = set()
    for batch, _ in zip(dm.train_dataloader(), range(6)):
        und = batch.get("und")
        if und is None:
            continue
        lengths = und["attention_mask"].sum(1)
        assert und["ids"].shape[1] == lengths.max()  # padded to this batch's longest, not a fixed length
        for row in range(len(lengths)):
            answer = und["labels"][row][und["labels"][row] != -100].tolist()
            assert answer[-1] == tok.eos_token_id
            ids = und["ids"][row][: lengths[row]].tolist()
            assert ids[-len(answer):] == answer and ids[-len(answer) - 1] == tok.sep_token_id
        seen_tasks.update(und["task"])
        if "gen" in batch:
            gen = batch["gen"]
            d = model.decoder
            assert gen["latents"].shape[1:] == (d.latent_channels, d.latent_size, d.latent_size)
    assert "recognition" in seen_tasks


def test_each_row_carries_its_concept(prepared, model):
    dm = datamodule(prepared, model, task_weights={"qa": 1.0, "caption": 1.0})
    batch = next(iter(dm.train_dataloader()))
    rows = [r for r in dm.train_records if r.sample.task in ("qa", "caption")]
    assert {r.sample.concept for r in rows} == {"bo", "mam"}
    info = model.bank.info
    for ids, concept in zip(batch["und"]["ids"], batch["concepts"]):
        assert info[concept].first_id in ids.tolist()


def test_image_features_are_cached_on_disk_and_reused(prepared, model, monkeypatch):
    datamodule(prepared, model)
    assert list((prepared[0] / "cache").glob("image_tokens-*.safetensors"))
    assert list((prepared[0] / "cache").glob("latents-*.safetensors"))

    def boom(*a, **k):
        raise AssertionError("re-encoded an image that was cached")

    monkeypatch.setattr(model.backbone, "encode_images", boom)
    monkeypatch.setattr(model.decoder, "encode_images", boom)
    datamodule(prepared, model)  # a second run reads the caches


def copy_concept(prepared, tmp_path):
    """A private copy of a prepared folder, without its caches: tests below change its photos."""
    import shutil

    return shutil.copytree(prepared, tmp_path / prepared.name, ignore=shutil.ignore_patterns("cache"))


def count_encodes(model, monkeypatch) -> collections.Counter:
    """Rows each frozen encoder encodes from now on: {"backbone": n, "decoder": n}."""
    counts = collections.Counter()
    for name, part in (("backbone", model.backbone), ("decoder", model.decoder)):
        def spy(pixels, *a, _real=part.encode_images, _name=name, **k):
            counts[_name] += len(pixels)
            return _real(pixels, *a, **k)

        monkeypatch.setattr(part, "encode_images", spy)
    return counts


def stored(folder, kind):
    from safetensors.torch import load_file

    return load_file(str(next((folder / "cache").glob(f"{kind}-*.safetensors"))))


def test_a_photo_replaced_under_its_name_is_encoded_again_and_only_it(prepared, model, monkeypatch, tmp_path):
    from unipers.data.collate import _decoder_pixels, _load_rgb
    from unipers.errors import UnipersError

    bo = copy_concept(prepared[0], tmp_path)
    datamodule([bo], model)
    before = {kind: stored(bo, kind) for kind in ("image_tokens", "latents")}
    photo, rel = bo / "images" / "train_001.png", "images/train_001.png"
    assert all(rel in entries for entries in before.values())
    with Image.open(photo) as im:
        size = im.size
    Image.new("RGB", size, (10, 200, 30)).save(photo)  # same path, other bytes
    counts = count_encodes(model, monkeypatch)
    dm = datamodule([bo], model)
    assert counts == {"backbone": 1, "decoder": 1}  # that photo only, once per cache
    after = {kind: stored(bo, kind) for kind in before}
    for kind, entries in after.items():
        assert entries.keys() == before[kind].keys()
        assert all(entries[k].equal(before[kind][k]) for k in entries if k != rel)  # the others are kept as is
    assert not after["latents"][rel].equal(before["latents"][rel])
    bb, dec = model.backbone, model.decoder
    pixels = bb.processor.image_processor(images=[_load_rgb(str(photo))], return_tensors="pt").pixel_values
    assert dm.collator.image_tokens[str(photo)].equal(bb.encode_images(pixels)[0])  # the new photo's tokens
    want = dec.encode_images(_decoder_pixels(str(photo), dec.image_size)[None])[0]
    assert after["latents"][rel].allclose(want, atol=1e-5) and dm.collator.latents[str(photo)].allclose(want, atol=1e-5)
    seen = dict(counts)
    datamodule([bo], model)
    assert counts == seen  # a third run encodes nothing

    photo.write_bytes(b"not a png")  # a photo corrupted on disk: one line naming it, not a stale entry
    with pytest.raises(UnipersError, match="train_001.png: cannot read image"):
        datamodule([bo], model)


def nan_entry(file):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        meta, entries = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    entries[next(iter(entries))][..., 0] = float("nan")
    save_file(entries, str(file), metadata=meta)


def foreign_keys(file):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        meta, entries = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["unipers.feature_cache"])
    info["sources"]["images/elsewhere.png"] = info["sources"].pop(next(iter(entries)))
    save_file(entries, str(file), metadata={"unipers.feature_cache": json.dumps(info)})


def path_keyed(file):  # the layout written before entries carried their photo's hash
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(file)), str(file))


CORRUPTIONS = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "garbage": lambda f: f.write_bytes(b"\x00" * 64),
    "nan entry": nan_entry,
    "foreign keys": foreign_keys,
    "older format": path_keyed,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_a_cache_file_that_fails_its_checks_is_rebuilt(prepared, model, monkeypatch, tmp_path, caplog, corrupt):
    bo = copy_concept(prepared[0], tmp_path)
    first = datamodule([bo], model).collator.latents
    file = next((bo / "cache").glob("latents-*.safetensors"))
    CORRUPTIONS[corrupt](file)
    counts = count_encodes(model, monkeypatch)
    again = datamodule([bo], model).collator.latents
    assert counts == {"decoder": len(first)}  # every latent again; the image-token file was fine
    assert "rebuilding it" in caplog.text and file.name in caplog.text
    assert again.keys() == first.keys() and all(again[k].allclose(first[k], atol=1e-5) for k in first)
    datamodule([bo], model)
    assert counts == {"decoder": len(first)}  # the rebuilt file is trusted


def test_seeded_and_deterministic(prepared, model):
    def first_batches(seed):
        dm = datamodule(prepared, model, seed=seed)
        return [b["concepts"] for b, _ in zip(dm.train_dataloader(), range(4))]

    assert first_batches(0) == first_batches(0)
    assert first_batches(0) != first_batches(1)


def test_mixing_ratios_are_followed():
    tasks = ["recognition"] * 50 + ["qa"] * 5 + ["generation"] * 20
    s = MixtureSampler(tasks, {"recognition": 0.5, "qa": 0.25, "generation": 0.25, "caption": 1.0},
                       num_samples=4000, seed=3)
    counts = collections.Counter(tasks[i] for i in s)
    assert abs(counts["recognition"] / 4000 - 0.5) < 0.03
    assert abs(counts["qa"] / 4000 - 0.25) < 0.03  # the small task is cycled, not starved
    with pytest.raises(ValueError, match="unknown task"):
        MixtureSampler(tasks, {"recogniton": 1.0})
    with pytest.raises(ValueError, match="no task has both"):
        MixtureSampler(tasks, {"caption": 1.0})


def test_ddp_ranks_split_one_epoch():
    tasks = ["qa", "recognition"] * 21
    weights = {"qa": 1.0, "recognition": 1.0}
    one = list(MixtureSampler(tasks, weights, seed=5))
    ranks = [list(MixtureSampler(tasks, weights, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 21
    assert [x for pair in zip(*ranks) for x in pair] == one


def test_sampler_and_loader_resume_exactly(prepared, model):
    dm = datamodule(prepared, model, batch_size=2)
    loader = dm.train_dataloader()
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = loader.state_dict()
    expected = [next(it)["concepts"] for _ in range(3)]
    resumed = datamodule(prepared, model, batch_size=2).train_dataloader()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2)["concepts"] for _ in range(3)] == expected


def test_missing_or_unprepared_folder(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not a prepared concept folder"):
        ConceptDataModule([tmp_path])
    with pytest.raises(ValueError, match="no concept folders"):
        ConceptDataModule([])


def test_augmented_views_add_cached_crops_of_training_images_only(prepared, model, monkeypatch):
    from safetensors.torch import load_file

    from unipers.data.augment import ViewSpec

    plain = datamodule(prepared, model)
    dm = datamodule(prepared, model, augment=ViewSpec(views=3))
    count = collections.Counter
    before, after = count(r.sample.task for r in plain.train_records), count(r.sample.task for r in dm.train_records)
    for task in ("recognition", "caption"):
        assert after[task] == 4 * before[task]  # the photo + 3 views
    assert after["qa"] == before["qa"] and after["generation"] == before["generation"]
    assert len(dm.val_records) == len(plain.val_records) and all(r.view == 0 for r in dm.val_records)
    assert len({r.uid for r in dm.train_records}) == len(dm.train_records)

    tokens = dm.collator.image_tokens
    rec = [r for r in dm.train_records if r.sample.task == "recognition"]
    first = rec[0]
    views = [r for r in rec if r.sample is first.sample]
    assert [r.view for r in views] == [0, 1, 2, 3]
    assert views[0].image_key == str(first.root / first.sample.image)  # view 0 is the photo itself
    originals = tokens[views[0].image_key]
    assert any(not tokens[v.image_key].equal(originals) for v in views[1:])  # views are other images
    stored = load_file(str(next((prepared[0] / "cache").glob("image_tokens-*.safetensors"))))
    assert any("#rrc" in k for k in stored) and not any("#" in k and "/val_" in k for k in stored)

    def boom(*a, **k):
        raise AssertionError("re-encoded a cached view")

    monkeypatch.setattr(model.backbone, "encode_images", boom)
    again = datamodule(prepared, model, augment=ViewSpec(views=3))  # same views, read from the cache
    assert all(again.collator.image_tokens[r.image_key].equal(tokens[r.image_key]) for r in views)


def test_augment_config_is_read_and_checked_at_load():
    from unipers.config import ConfigError
    from unipers.data.augment import ViewSpec

    cfg = load_config([], ["data.augment.views=8", "data.augment.scale=[0.5,1.0]", "data.augment.flip=false"])
    assert ViewSpec.from_config(cfg.data.augment) == ViewSpec(views=8, scale=(0.5, 1.0), flip=False)
    with pytest.raises(ConfigError, match="data.augment.scale"):  # at load time, before any data is read
        load_config([], ["data.augment.scale=[0.0,1.0]"])
    with pytest.raises(ConfigError, match="data.augment.view"):
        load_config([], ["data.augment.view=3"])
