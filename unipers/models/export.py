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
import json
from pathlib import Path

GROUP_TAG = {"shared": "s", "und": "u", "gen": "g"}


def token_names(info) -> list[str]:
    """Added-token strings for one concept, in id order."""
    names = [f"<{info.name}>"]
    for group, tag in GROUP_TAG.items():
        names += [f"<{info.name}_{tag}{i}>" for i in range(info.layout.count(group))]
    return names


def export_merged(backbone, out_dir: str | Path, *, overwrite: bool = False, inputs=()) -> Path:
    """Write `backbone` (an ARBackbone with concepts loaded) as a standalone HF model + processor. An existing
    `out_dir` is replaced only with `overwrite`, only if unipers wrote it, and never when it holds one of
    `inputs` (the base, the concept files) or the working directory."""
    import copy

    import torch

    from unipers.concepts.bank import GROUPS
    from unipers.io import atomic_directory

    from unipers.io import check_output

    check_output(out_dir, overwrite=overwrite, inputs=inputs)  # before the copy of the whole model
    bank, V = backbone.bank, backbone.vocab_size
    if len(backbone.tokenizer) != V:
        raise ValueError(
            f"tokenizer has {len(backbone.tokenizer)} tokens but the embedding table {V} rows: "
            "added tokens would not land on the concept ids"
        )
    model = copy.deepcopy(backbone.model)
    tokenizer = copy.deepcopy(backbone.tokenizer)
    model.resize_token_embeddings(V + bank.num_tokens, mean_resizing=False)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
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
                    head[start:end] = 0
                    suppress += list(range(start, end))
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
    model.config.vocabulary_map = tokenizer.get_vocab()
    if suppress:
        model.generation_config.suppress_tokens = suppress
    processor = copy.copy(backbone.processor)
    processor.tokenizer = tokenizer
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite, kind="export", inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        meta = {"base_fingerprint": backbone.base_fingerprint, "concepts": prompts}
        (tmp / "unipers_prompts.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="local HF Chameleon/Anole folder, or 'tiny'")
    parser.add_argument("--concept", action="append", required=True, help="concept file (repeat for several)")
    parser.add_argument("--out", required=True, help="output folder for the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when an earlier export wrote it")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def main(args: argparse.Namespace) -> int:
    from unipers.concepts.io import load_concepts
    from unipers.models.backbone import ARBackbone
    from unipers.models.tiny import resolve_path

    from unipers.io import check_output

    base = resolve_path(args.backbone, "backbone")
    inputs = [base, *args.concept]
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)  # before loading a 7B base
    backbone = ARBackbone.from_pretrained(base, dtype=args.dtype)
    for path in args.concept:
        load_concepts(backbone.bank, path, base_fingerprint=backbone.base_fingerprint, vocabulary=backbone.vocabulary)
    out = export_merged(backbone, args.out, overwrite=args.overwrite, inputs=inputs)
    print(f"merged {', '.join(backbone.bank.names)} into {out}")
    return 0
