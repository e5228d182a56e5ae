"""Inference speed, side by side: answers with vs without the KV cache, CFG batched into one UNet call vs two.

    python benchmarks/bench_inference.py                 # tiny + medium CPU configs
    python benchmarks/bench_inference.py --quick         # tiny only, fewer repeats (smoke test)

Both arms of each comparison run on the same model and inputs and must produce the same output (asserted):
the cache and the batching change speed, not results. Writes benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unipers.config import load_config
from unipers.inference import InferenceSession
from unipers.models.tiny import build_tiny_chameleon, ensure_tiny

CONFIGS = {
    "tiny": dict(),  # the embedded default: 64 wide, 2 layers
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, vocab_size=8192),
}


def timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench(name: str, arch: dict, root: Path, repeats: int, new_tokens: int, images: int, steps: int) -> dict:
    backbone = build_tiny_chameleon(root / name, **arch) if arch else ensure_tiny()[0]
    session = InferenceSession.from_config(load_config([], [f"backbone.path={backbone}"]))
    session.model.add_concept("bo", "dog")
    question = "Tell me everything you know about <bo> and the garden it plays in."
    bb = session.backbone
    ids = torch.tensor([session.model.prompts.encode_question(question)])

    def answer(cache):
        return bb.generate(ids, max_new_tokens=new_tokens, use_cache=cache, stop_ids=[-1])  # no early stop

    t_cache, a = timed(lambda: answer(True), repeats)
    t_plain, b = timed(lambda: answer(False), repeats)
    assert torch.equal(a, b), "cached and uncached greedy answers differ"
    n = a.shape[1]
    prompts = [f"<bo> in scene {i}" for i in range(images)]

    def draw(batched):
        return session.generate(prompts, seed=0, steps=steps, guidance=5.0, batched_cfg=batched).tensors

    t_one, x = timed(lambda: draw(True), repeats)
    t_two, y = timed(lambda: draw(False), repeats)
    assert torch.allclose(x, y, atol=1e-4), "batched and two-call CFG images differ"
    return {
        "config": name, "prompt_tokens": ids.shape[1], "new_tokens": n,
        "answer_tokens_per_s": {"kv_cache": n / t_cache, "no_cache": n / t_plain, "speedup": t_plain / t_cache},
        "images_per_s": {"cfg_one_call": images / t_one, "cfg_two_calls": images / t_two, "speedup": t_two / t_one},
        "images": images, "steps": steps, "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["tiny"] if args.quick else list(CONFIGS)
    repeats, new_tokens, images, steps = (2, 32, 2, 5) if args.quick else (5, 96, 4, 20)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(n, CONFIGS[n], Path(tmp), repeats, new_tokens, images, steps) for n in names]
    print("| config | answer tok/s, KV cache | no cache | speed-up | images/s, CFG one call | two calls | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, i = r["answer_tokens_per_s"], r["images_per_s"]
        print(f"| {r['config']} | {a['kv_cache']:.1f} | {a['no_cache']:.1f} | {a['speedup']:.2f}x "
              f"| {i['cfg_one_call']:.2f} | {i['cfg_two_calls']:.2f} | {i['speedup']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "inference", "command": "python benchmarks/bench_inference.py",
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
