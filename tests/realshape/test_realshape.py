"""unipers' real commands at real width: personalize, ask, recognize, generate, eval and export on a random
Anole-7B (1 decoder layer, 65,536-token vocabulary, 1,024 image tokens) and SD1.5 (512 px) built offline.

The tests share one session's folders and one training run, the README's (`readme_run` in conftest.py):
training is the expensive part. Each command runs in its own process, in the README run's folder, with the
run's own config, as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.realshape

HIDDEN, VOCAB = 4096, 65536


@pytest.fixture(scope="module")
def trained(readme_run):
    """The README run's <bo>: (concept file, run folder, base digests before it, scratch folder)."""
    work, before = readme_run
    run = work / "runs" / "bo"
    return run / "concepts" / "last.safetensors", run, before, work


def test_the_folders_have_the_published_shapes(rs_dirs):
    from transformers import AutoProcessor, ChameleonConfig

    cfg = ChameleonConfig.from_pretrained(rs_dirs[0])
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (VOCAB, HIDDEN, 11008)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (32, 32, 1)
    assert cfg.vq_config.resolution == 512 and cfg.vq_config.num_embeddings == 8192
    proc = AutoProcessor.from_pretrained(rs_dirs[0], local_files_only=True)
    tok = proc.tokenizer
    assert len(tok) == VOCAB and proc.image_seq_length == 1024
    assert proc.image_processor.crop_size == {"height": 512, "width": 512}
    assert tok.sep_token == "<reserved08706>" and tok.sep_token_id == 8710
    assert (proc.image_token_id, proc.image_start_token_id, proc.image_end_token_id) == (8711, 8197, 8196)
    assert sum(name.startswith("IMGIMG") for name in tok.get_vocab()) == 8192
    assert tok("<image>", add_special_tokens=False).input_ids == [8711]
    unet = json.loads((rs_dirs[1] / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["sample_size"] == 64 and unet["attention_head_dim"] == 8 and unet["layers_per_block"] == 1


def test_personalize_trains_only_the_concept_rows(trained, rs_dirs, rs_base_digests):
    from safetensors import safe_open

    concept, run, before, _ = trained
    assert concept.is_file()
    # The default layout: identifier + 8 shared + 4 und + 4 gen input rows, and the identifier's head row.
    with safe_open(concept, "pt") as f:
        rows = sum(f.get_slice(k).get_shape()[0] for k in f.keys())
        widths = {f.get_slice(k).get_shape()[1] for k in f.keys()}
    assert rows == 18 and widths == {HIDDEN}
    assert concept.stat().st_size < 18 * HIDDEN * 4 + 64 * 1024  # KB-sized: float32 rows and a header
    assert rs_base_digests(rs_dirs) == before


def test_ask_recognize_generate(trained, rs_concept, unipers_run, tmp_path):
    concept, run, _, work = trained
    config = ["--config", run / "config.yaml", "--concept", concept]
    code, out, err = unipers_run("ask", *config, "--max-new-tokens", 4, "What is <bo> doing?", cwd=work)
    assert code == 0, err[-2000:]
    assert out.strip()
    photo = sorted((Path(rs_concept) / "images").rglob("*.png"))[0]
    code, out, err = unipers_run("recognize", *config, "--image", photo, cwd=work)
    assert code == 0, err[-2000:]
    assert photo.name in out
    # 512 px, the decoder's own size: 2 DDIM steps with guidance (UNet batch 2) and one 512 px VAE decode.
    code, out, err = unipers_run("generate", *config, "--steps", 2, "--out", tmp_path / "gen",
                                 "A photo of <bo> on a beach.", cwd=work)
    assert code == 0, err[-2000:]
    from PIL import Image

    pngs = sorted((tmp_path / "gen").glob("*.png"))
    assert pngs and Image.open(pngs[0]).size == (512, 512)


def test_eval_without_generation(trained, rs_concept, unipers_run, tmp_path):
    concept, run, _, work = trained
    code, out, err = unipers_run("eval", "--config", run / "config.yaml", "--concept", concept, "--data", rs_concept,
                                 "--out", tmp_path / "eval", "--no-generation",
                                 # one baseline on the untrained base, and the file at its init rows: both
                                 # ways of changing the model under eval, at real width (all five cost minutes)
                                 "--set", "eval.baselines=[class,token]", cwd=work)
    assert code == 0, err[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [b["method"] for b in metrics["results"]] == ["personal", "class", "token"]
    assert "recognition/pos" in metrics["results"][-1]["concepts"]["bo"]


def test_bfloat16_step_moves_only_concept_rows(rs_dirs):
    """In bf16, one AdamW step on a text QA: the concept's rows move, every base tensor stays bit-identical."""
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.backbone import ARBackbone
    from unipers.models.padding import pad_batch

    bb = ARBackbone.from_pretrained(rs_dirs[0], dtype="bfloat16")
    bb.add_concept("bo", "dog")
    trainable = [p for p in bb.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 18 * HIDDEN
    assert not any(p.requires_grad for p in bb.model.parameters())
    embed, head = bb.model.get_input_embeddings().weight, bb.model.lm_head.weight
    saved = {"embed": embed.clone(), "head": head.clone()}
    rows = [p.detach().clone() for p in trainable]
    enc = PromptBuilder.for_backbone(bb).encode_qa("Is <bo> a dog?", "Yes, <bo> is a dog.")
    ids, mask = pad_batch([enc.ids], bb.tokenizer.pad_token_id)
    labels, _ = pad_batch([enc.labels], 0, labels=True)
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    loss = bb.understanding_loss(ids, mask, labels)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert torch.equal(embed, saved["embed"]) and torch.equal(head, saved["head"])
    assert any(not torch.equal(a, p) for a, p in zip(rows, trainable))


def test_export_logits_equal_the_spliced_model(trained, rs_dirs, unipers_run, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    from unipers.concepts.io import load_concepts
    from unipers.concepts.prompts import PromptBuilder
    from unipers.models.backbone import DTYPES, ARBackbone

    out = tmp_path / "merged"
    code, _, err = unipers_run("export", "--backbone", rs_dirs[0], "--concept", trained[0], "--out", out)
    assert code == 0, err[-2000:]
    saved = json.loads((out / "config.json").read_text())
    saved = DTYPES[saved.get("dtype") or saved.get("torch_dtype") or "float32"]
    bb = ARBackbone.from_pretrained(rs_dirs[0], dtype="float32")
    load_concepts(bb.bank, trained[0], base_fingerprint=bb.base_fingerprint, vocabulary=bb.vocabulary)
    with torch.no_grad():
        for p in bb.bank.parameters():  # the merged file holds the rows in its own dtype: compare like for like
            p.copy_(p.to(saved).float())
        ids = torch.tensor([PromptBuilder.for_backbone(bb).encode("Is <bo> on the sofa?", mode="und")])
        spliced = bb.full_logits(ids)
        identifier = bb.bank.info["bo"].first_id
        del bb
        merged = ChameleonForConditionalGeneration.from_pretrained(out, dtype=torch.float32, local_files_only=True)
        logits = merged(input_ids=ids).logits
    assert logits.shape == spliced.shape and logits.shape[-1] == VOCAB + 17
    # The base vocabulary and <bo> itself; slot rows are never outputs (zero head rows, suppressed on export).
    keep = identifier + 1
    assert torch.allclose(logits[..., :keep], spliced[..., :keep], atol=1e-4, rtol=1e-4)


def test_slurm_concept_array_dry_run_with_the_real_configs(trained, unipers_run):
    """docs/slurm.md's concept array with the real configs and eval after training, checked and printed:
    the sbatch file names the array and every task's train and eval; nothing is written or queued."""
    _, run, _, work = trained
    (work / "concepts.txt").write_text("data/bo\n")
    code, out, err = unipers_run("slurm", "submit", "personalize", "backbone/anole-7b", "decoder/sd15",
                                 "slurm/cluster", f"connector.path={work / 'runs' / 'align' / 'connector.safetensors'}",
                                 "slurm.concepts_per_task=4", "--concepts", "concepts.txt", "--eval", "--no-generation",
                                 "run_dir=runs/array", "--dry-run", cwd=work)
    assert code == 0, err[-2000:]
    assert "#SBATCH --array=0-0" in out and "unipers.cli eval" in out and "--no-generation" in out
    assert not (work / "runs" / "array").exists()
