"""The embedded default: tiny random base models written as ordinary HF / diffusers folders.

    ensure_tiny()                      # (backbone_dir, decoder_dir), built once
    resolve_path("tiny", "backbone")   # a config's path value -> folder

Nothing here contacts a model hub. The tiny Chameleon has its own byte-level BPE tokenizer (trained offline
on a built-in corpus), a processor, and a VQ encoder; the tiny decoder is a Stable-Diffusion-style folder.
Both are saved with ``save_pretrained`` and loaded back through the same ``from_pretrained`` path as real
checkpoints. Builds are deterministic: the same seed gives bit-identical weights, hence the same base
fingerprint, on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from unipers.paths import cache_dir


# Chameleon's own names for its special tokens, so the tiny world exercises the real code paths.
BOS, EOS, PAD, UNK, SEP = "<s>", "</s>", "<pad>", "<unk>", "<reserved08706>"
IMAGE, BOI, EOI = "<image>", "<racm3:break>", "<eoss>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SEP, IMAGE, BOI, EOI]

_CORPUS = """
a an the this that is are was were be has have had do does did not no yes it its in on at of to for with
and or but from by as into over under near behind above below left right top bottom center middle
what which who where when why how many much can could would should will shall may might must
photo image picture scene view shows show showing see seen look looks like there here one two three
dog cat bird mug cup toy person man woman child car bike ball book chair sofa table lamp plant flower
red orange yellow green blue purple pink brown black white gray grey colour color colors striped dotted
plain checkered spotted circle square triangle star heart shape shapes pattern patterns background
small large big little round sitting standing reading running sleeping playing wearing holding library
garden park beach kitchen room street forest snow grass water sky sunny night day old young years
collar hat glasses scarf shirt ball toy favourite favorite likes loves eats food name called named
describe tell me about something know question answer caption generate draw paint create a photo of
Is <bo> in this photo? Yes, it is. No, it is not. Can you see it in this image? What is it doing?
"""


def _tiny_tokenizer(num_image_tokens: int, vocab_size: int, corpus: str = ""):
    """A byte-level BPE with Chameleon's special tokens and IMGIMG...Z image tokens, exactly `vocab_size` long."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    image_names = [image_token_name(i) for i in range(num_image_tokens)]
    text_vocab = vocab_size - num_image_tokens
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS + corpus] * 4, trainer=trainer)
    # BPE stops early when the corpus runs out of merges: fill up with reserved tokens so the text part
    # has a known size and image tokens land at fixed ids.
    missing = text_vocab - tok.get_vocab_size()
    tok.add_tokens([f"<reserved{90000 + i}>" for i in range(missing)])
    tok.add_tokens(image_names)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, sep_token=SEP,
        padding_side="left",
    )


def image_token_name(index: int) -> str:
    """Chameleon names image code k as IMGIMG + digits of k written as letters A-J + Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(index)) + "Z"


def build_tiny_chameleon(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 1024,
    num_image_tokens: int = 128,
    image_size: int = 32,
    seed: int = 0,
    corpus: str = "",
    channel_multiplier: tuple[int, ...] = (1, 1, 2),
) -> Path:
    """Write a random tiny ChameleonForConditionalGeneration + tokenizer + processor to `out_dir`.

    ``corpus``: extra text the BPE tokenizer is trained on (e.g. the tiny world's words).
    ``channel_multiplier``: the VQ encoder's levels; each after the first halves the side, so the default
    (1, 1, 2) gives 8x8 = 64 tokens for a 32 px image and (1, 1, 2, 2) gives 4x4 = 16."""
    import torch
    from transformers import (
        ChameleonConfig,
        ChameleonForConditionalGeneration,
        ChameleonImageProcessor,
        ChameleonProcessor,
    )

    out = Path(out_dir)
    tokenizer = _tiny_tokenizer(num_image_tokens, vocab_size, corpus)
    vocab = tokenizer.get_vocab()
    channel_multiplier = list(channel_multiplier)
    tokens_per_side = image_size // 2 ** (len(channel_multiplier) - 1)
    config = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
        vocabulary_map=vocab,
        vq_config=dict(
            embed_dim=32,
            num_embeddings=num_image_tokens,
            latent_channels=32,
            resolution=image_size,
            base_channels=32,  # GroupNorm(32) needs >= 32
            channel_multiplier=channel_multiplier,
            num_res_blocks=1,
            attn_resolutions=[],
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChameleonForConditionalGeneration(config)
    image_processor = ChameleonImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = ChameleonProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_side**2
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def ensure_tiny(root: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, Path]:
    """Build the embedded default once (atomically) and return (backbone_dir, decoder_dir); `root` defaults
    to the ``tiny`` cache ($UNIPERS_TINY_DIR, else $UNIPERS_HOME/tiny)."""
    from unipers.io import atomic_directory
    from unipers.models.tiny_decoder import build_tiny_decoder

    own = not root  # the cache is unipers' own; a folder the user named is replaced only if unipers wrote it
    root = Path(root) if root else cache_dir("tiny")
    ar_dir, dec_dir = root / "backbone", root / "decoder"
    if force or not (ar_dir / "config.json").is_file():
        with atomic_directory(ar_dir, overwrite=True, cache=own, flag="--force") as tmp:
            build_tiny_chameleon(tmp)
    if force or not (dec_dir / "model_index.json").is_file():
        with atomic_directory(dec_dir, overwrite=True, cache=own, flag="--force") as tmp:
            build_tiny_decoder(tmp, cross_attention_dim=64, pooled_dim=64)
    return ar_dir, dec_dir


def resolve_path(path: str, kind: str) -> Path:
    """Config value -> folder: "tiny" means the embedded preset (built on first use)."""
    if path == "tiny":
        ar_dir, dec_dir = ensure_tiny()
        return ar_dir if kind == "backbone" else dec_dir
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind}.path: no such folder {folder} (use a local checkpoint folder or 'tiny')")
    return folder
