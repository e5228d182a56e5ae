"""`unipers train stage=align` writes a connector (+ decoder LoRA delta) that personalize and inference load."""

import json

import pytest
import torch
from PIL import Image

from unipers.concepts.io import ConceptFileError, read_metadata
from unipers.config import ConfigError, load_config
from unipers.inference import InferenceSession
from unipers.training.run import train

from test_personalize import CONFIGS, FAST


def test_align_then_personalize_then_generate(prepared_concepts, tmp_path, tiny_dirs):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    with open(pairs / "captions.jsonl", "w") as f:
        for i, (colour, caption) in enumerate([((255, 0, 0), "a red square"), ((0, 0, 255), "a blue square")] * 3):
            Image.new("RGB", (40, 40), colour).save(pairs / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": caption}) + "\n")
    align = load_config([CONFIGS / "base.yaml"], ["stage=align", f"data.pairs={pairs}", "trainer.max_steps=3",
                                                  "align.train_decoder=lora", f"run_dir={tmp_path / 'align'}",
                                                  "trainer.progress_bar=false", "data.batch_size=2"])
    run = train(align)
    connector = run / "connector.safetensors"
    assert connector.is_file() and (run / "connector.decoder.safetensors").is_file()
    assert len(list((pairs / "cache").glob("latents-*.safetensors"))) == 1  # data.cache_latents (default)

    personalize = load_config([CONFIGS / "personalize.yaml"], [
        f"data.concepts=[{prepared_concepts[0]}]", f"connector.path={connector}", "trainer.max_steps=2",
        f"run_dir={tmp_path / 'bo'}", *FAST])
    concept = train(personalize) / "concepts" / "last.safetensors"
    meta = read_metadata(concept)

    aligned = InferenceSession.from_config(load_config([], [f"connector.path={connector}"]))
    assert meta["connector_fingerprint"] == aligned.model.connector_fingerprint
    assert meta["decoder_fingerprint"] == aligned.model.decoder_fingerprint  # the LoRA-merged decoder
    aligned.load(concept)
    images = aligned.generate(["<bo> on a beach"], steps=2).tensors
    assert images.shape[0] == 1 and torch.isfinite(images).all()

    stock = InferenceSession.from_config(load_config([]))
    with pytest.raises(ConceptFileError, match="trained with decoder"):
        stock.load(concept)


def test_align_needs_pairs():
    with pytest.raises(ConfigError, match="data.pairs"):
        train(load_config([CONFIGS / "base.yaml"], ["stage=align"]))
