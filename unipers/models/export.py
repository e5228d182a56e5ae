"""Merge concept files into a plain Hugging Face checkpoint, for people who want a standalone model.

    unipers export --backbone PATH --concept bo.safetensors [--concept mam.safetensors] --out merged/

The vocabulary is resized and the concept rows copied in; the tokenizer gets one added token per row
(``<bo>``, ``<bo_s0>``..., ``<bo_u0>``..., ``<bo_g0>``...) at exactly the ids the spliced model uses, so the
merged model's logits equal the spliced model's. Rows that were never trained as outputs (slot rows when
``head_rows=identifier``) are zero in the head and listed in ``generation_config.suppress_tokens``.
``unipers_prompts.json`` gives each concept's understanding and generation prefix as text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

GROUP_TAG = {"shared": "s", "und": "u", "gen": "g"}
SHARD_SIZE = "2GB"
"""Shards of the written checkpoint. transformers' default (50GB) puts a 7B model in one file, and the
safetensors releases before zero-copy saving (the pins allow them) hold a whole shard in memory while
writing it: small shards bound that to 2 GB."""
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def token_names(info) -> list[str]:
    """Added-token strings for one concept, in id order."""
    names = [f"<{info.name}>"]
    for group, tag in GROUP_TAG.items():
        names += [f"<{info.name}_{tag}{i}>" for i in range(info.layout.count(group))]
    return names


def base_dtype(path: str | Path) -> str:
    """The dtype a HF checkpoint folder was saved in: config.json's ``dtype`` (``torch_dtype`` before
    transformers 5), else the dtype most of its safetensors bytes are in (read from the headers alone);
    float32 when neither says."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        value = str(config.get(key) or "").removeprefix("torch.")
        if value in SAFETENSORS_DTYPES.values():
            return value
    sizes: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, spec in header.items():
            dtype = SAFETENSORS_DTYPES.get(spec.get("dtype")) if name != "__metadata__" else None
            if dtype:
                start, end = spec["data_offsets"]
                sizes[dtype] = sizes.get(dtype, 0) + end - start
    return max(sizes, key=sizes.get) if sizes else "float32"


@contextlib.contextmanager
def _merged_view(model, embed, head, config, generation_config):
    """`model` with the merged tables, config and generation config in place of its own while the block
    runs; its own are back after it, however it ends. No copy of the model: only the two tables are new."""
    import torch

    embed_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    saved = (embed_mod.weight, embed_mod.num_embeddings, head_mod.weight, head_mod.out_features, model.config,
             model.generation_config)
    try:
        embed_mod.weight = torch.nn.Parameter(embed, requires_grad=False)
        embed_mod.num_embeddings = embed.shape[0]
        head_mod.weight = torch.nn.Parameter(head, requires_grad=False)
        head_mod.out_features = head.shape[0]
        model.config, model.generation_config = config, generation_config
        yield model
    finally:
        (embed_mod.weight, embed_mod.num_embeddings, head_mod.weight, head_mod.out_features, model.config,
         model.generation_config) = saved


def export_merged(backbone, out_dir: str | Path, *, overwrite: bool = False, inputs=(),
                  max_shard_size: str = SHARD_SIZE) -> Path:
    """Write `backbone` (an ARBackbone with concepts loaded) as a standalone HF model + processor, in the
    dtype it is loaded in. An existing `out_dir` is replaced only with `overwrite`, only if unipers wrote it,
    and never when it holds one of `inputs` (the base, the concept files) or the working directory.

    The model is written from its own tensors, with merged embedding and head tables swapped in while it
    saves and its own put back after: memory beyond the loaded model is the two tables, not a second model,
    and `backbone` works as before afterwards."""
    import copy

    import torch

    from unipers.concepts.bank import GROUPS
    from unipers.io import atomic_directory, check_output

    check_output(out_dir, overwrite=overwrite, inputs=inputs)  # before the slow part
    bank, V = backbone.bank, backbone.vocab_size
    if len(backbone.tokenizer) != V:
        raise ValueError(
            f"tokenizer has {len(backbone.tokenizer)} tokens but the embedding table {V} rows: "
            "added tokens would not land on the concept ids"
        )
    model = backbone.model
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        raise ValueError("the model ties its head to its embedding table: the concepts' head rows cannot be merged")
    tokenizer = copy.deepcopy(backbone.tokenizer)
    old_embed, old_head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    embed = torch.cat([old_embed, old_embed.new_zeros(bank.num_tokens, old_embed.shape[1])])
    head = torch.cat([old_head, old_head.new_zeros(bank.num_tokens, old_head.shape[1])])
    suppress, prompts = [], {}
    with torch.no_grad():
        for name, info in bank.info.items():
            rows = bank.rows[name]
            for group in GROUPS:
                start, end = info.span(group)
                if start == end:
                    continue
                embed[start:end] = rows.embed[group].to(embed.dtype)
                if group in rows.head:
                    head[start:end] = rows.head[group].to(head.dtype)
                else:
                    suppress += list(range(start, end))  # zero in the head, never generated
            added = token_names(info)
            tokenizer.add_tokens(added, special_tokens=True)
            got = tokenizer.convert_tokens_to_ids(added)
            if got != list(range(info.first_id, info.end_id)):
                raise ValueError(f"tokenizer put {name}'s tokens at {got[0]}.., not at {info.first_id}..")
            slots = {g: "".join(added[s - info.first_id] for s in range(*info.span(g))) for g in GROUP_TAG}
            prompts[name] = {
                "understanding": f"<{name}> is {slots['shared']}{slots['und']}.",
                "generation": f"<{name}> is {slots['shared']}{slots['gen']}.",
                "class_word": info.class_word,
            }
    config, generation_config = copy.deepcopy(model.config), copy.deepcopy(model.generation_config)
    config.get_text_config().vocab_size = V + bank.num_tokens
    config.vocabulary_map = tokenizer.get_vocab()
    if suppress:
        generation_config.suppress_tokens = suppress
    processor = copy.copy(backbone.processor)
    processor.tokenizer = tokenizer
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite, kind="export", inputs=inputs) as tmp:
        with _merged_view(model, embed, head, config, generation_config) as merged:
            merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        del embed, head
        processor.save_pretrained(tmp)
        meta = {"base_fingerprint": backbone.base_fingerprint, "concepts": prompts}
        (tmp / "unipers_prompts.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="local HF Chameleon/Anole folder, or 'tiny'")
    parser.add_argument("--concept", action="append", required=True, help="concept file (repeat for several)")
    parser.add_argument("--out", required=True, help="output folder for the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when an earlier export wrote it")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written model (default: the base's own, from its config.json or weights)")


def main(args: argparse.Namespace) -> int:
    from unipers.concepts.io import load_concepts
    from unipers.models.backbone import ARBackbone
    from unipers.models.tiny import resolve_path

    from unipers.io import check_output

    base = resolve_path(args.backbone, "backbone")
    inputs = [base, *args.concept]
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)  # before loading a 7B base
    # The base's own dtype: a bf16 7B base loaded as float32 would double memory and the written files.
    dtype = args.dtype or base_dtype(base)
    backbone = ARBackbone.from_pretrained(base, dtype=dtype)
    for path in args.concept:
        load_concepts(backbone.bank, path, base_fingerprint=backbone.base_fingerprint, vocabulary=backbone.vocabulary)
    out = export_merged(backbone, args.out, overwrite=args.overwrite, inputs=inputs)
    print(f"merged {', '.join(backbone.bank.names)} into {out} ({dtype})")
    return 0
