"""``unipers tiny``: build the embedded tiny base models, and ``--check`` that training moves only a concept's
rows (the base and every other concept stay bit-identical).

    unipers tiny [--out DIR] [--force] [--check]        # DIR: default $UNIPERS_HOME/tiny
    unipers tiny --preset anole-7b --layers 1 --out DIR   # random weights at a published shape (realshape.py)
    unipers tiny --preset sd15 --out DIR
"""

from __future__ import annotations

import argparse
import os

from unipers.models.realshape import PRESETS  # names only: realshape imports torch inside its builders
from unipers.models.tiny import ensure_tiny
from unipers.paths import cache_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help=f"where to write the presets (default {cache_dir('tiny')})")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--check", action="store_true",
                        help="then train one concept a few steps with both losses and verify only its rows moved")
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="instead of the tiny models: random weights at this published shape, into --out")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --preset: decoder layers of a backbone (default 1), or a UNet's "
                             "layers_per_block (default: as published)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="with --preset: the dtype the weights are saved in")


def check(steps: int = 5, seed: int = 0) -> dict:
    """Load the embedded default through the config path, train `<bo>` with both losses, verify isolation."""
    import torch

    from unipers.config import load_config
    from unipers.models.padding import pad_batch
    from unipers.models.unified import UnifiedModel

    torch.manual_seed(seed)
    model = UnifiedModel.from_config(load_config(["base"]))
    model.add_concept("bo", "dog")
    model.add_concept("mam", "cat")
    frozen = {k: v.clone() for k, v in model.backbone.model.state_dict().items()}
    untouched = {k: v.clone() for k, v in model.bank.rows["mam"].state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    qa = [model.prompts.encode_qa("Is <bo> in the garden?", "Yes, <bo> is in the garden.")] * 2
    ids, mask = pad_batch([e.ids for e in qa], model.backbone.tokenizer.pad_token_id)
    labels, _ = pad_batch([e.labels for e in qa], 0, labels=True)
    gen_ids, gen_mask = model.encode_batch(["A photo of <bo> on a beach."] * 2, mode="gen")
    d = model.decoder
    latents = torch.randn(2, d.latent_channels, d.latent_size, d.latent_size)
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        und = model.understanding_loss(ids, mask, labels)
        dif = model.diffusion_loss(gen_ids, gen_mask, latents, generator=torch.Generator().manual_seed(step))
        (und + dif).backward()
        opt.step()
        losses.append((und.item(), dif.item()))
    base_same = all(torch.equal(v, model.backbone.model.state_dict()[k]) for k, v in frozen.items())
    mam_same = all(torch.equal(v, model.bank.rows["mam"].state_dict()[k]) for k, v in untouched.items())
    if not (base_same and mam_same):
        raise RuntimeError(f"isolation broken: base unchanged={base_same}, absent concept unchanged={mam_same}")
    return {"fingerprints": model.fingerprints, "losses": losses,
            "trainable": sum(p.numel() for p in model.trainable_parameters())}


def main_preset(args: argparse.Namespace) -> int:
    from unipers.io import atomic_directory
    from unipers.models.realshape import build_realshape

    if not args.out:
        raise ValueError("--preset needs --out DIR (a 7B-wide folder does not go into the tiny cache)")
    if args.check:
        raise ValueError("--check runs on the tiny models; run `unipers train` on a --preset folder instead")
    with atomic_directory(args.out, overwrite=args.force, kind="realshape", flag="--force") as tmp:
        build_realshape(tmp, args.preset, layers=args.layers, dtype=args.dtype)
    print(f"{args.preset} (random weights, layers={args.layers or 'default'}, {args.dtype}): {args.out}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.preset:
        return main_preset(args)
    ar_dir, dec_dir = ensure_tiny(args.out, force=args.force)
    print(f"tiny backbone: {ar_dir}\ntiny decoder:  {dec_dir}")
    if args.check:
        if args.out:
            os.environ["UNIPERS_TINY_DIR"] = str(args.out)
        report = check()
        print(f"base fingerprints: {report['fingerprints']}")
        print(f"trainable parameters (2 concepts): {report['trainable']}")
        for i, (und, dif) in enumerate(report["losses"]):
            print(f"step {i}: understanding {und:.4f}  diffusion {dif:.4f}")
        print("check passed: only the trained concept's rows moved; the base and the absent concept are bit-identical")
    return 0
