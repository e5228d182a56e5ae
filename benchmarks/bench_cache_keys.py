"""Feature-cache keys: hashing every photo (sha256 of its bytes, on every run) next to encoding it (once).

    python benchmarks/bench_cache_keys.py            # 640x480, 1600x1200, 4000x3000; N=24 each; 3 repeats; ~2 min
    python benchmarks/bench_cache_keys.py --quick    # 640x480 and 4000x3000, N=8, one repeat (~1 min)
    python benchmarks/bench_cache_keys.py --sizes 1024x768 --n 64 --repeats 5 --out /tmp/keys.json

The image-token and latent caches (unipers/data/collate.py) key each entry by the sha256 of its photo's
bytes and check it on every run, so a photo replaced under the same name is encoded again. This measures
what that costs, per photo, for synthetic JPEGs (quality 90; smooth gradients plus noise, so they compress
like camera photos: ~4 MB at 4000x3000) of each size:

- **stat key**: ``os.stat`` (size + mtime_ns), the cheaper key the caches do not use, for reference.
- **sha256 key**: ``collate.file_digests`` over the folder (the page cache is warm: the files were just
  written; a cold read costs what the encoder's own read of the same bytes costs).
- **decode**: ``collate._decoder_pixels`` (PIL decode, resize, centre crop): a floor for any encoder.
- **first run**: ``latent_cache`` / ``image_token_cache`` on a folder with no cache file (hash, decode,
  encode in batches of 32, save), the cost the hash is added to once.
- **later run**: the same call on the unchanged folder (read the file, hash every photo, encode nothing).

The encoders are the embedded tiny presets (32 px VAE and VQ, CPU, ``--threads`` torch threads), which
cost little beyond the decode; a real VAE or VQGAN at 512 px costs 10-100x more per image, so the hash's
share of a first run shown here is an upper bound. Medians over ``--repeats``; a markdown table is printed
and JSON written (default benchmarks/results/cache_keys.json; benchmarks/results/ is not versioned).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))


def write_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = (np.linspace(0, 180, w, dtype=np.float32)[None, :, None]
            + np.linspace(0, 60, h, dtype=np.float32)[:, None, None])
    paths = []
    for i in range(n):
        tint = rng.uniform(0, 60, size=3).astype(np.float32)
        noise = rng.normal(0, 10, size=(h, w, 3)).astype(np.float32)
        arr = np.clip(ramp + tint + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(str(path))
    return paths


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(model, root: Path, size: tuple[int, int], n: int, repeats: int) -> dict:
    import shutil

    from unipers.data.collate import _decoder_pixels, file_digests, image_token_cache, latent_cache

    folder = root / f"{size[0]}x{size[1]}"
    paths = write_photos(folder / "images", n, size)
    caches = {"latents": lambda: latent_cache(model, paths, root=folder),
              "tokens": lambda: image_token_cache(model, paths)}
    rows: dict[str, list[float]] = {"stat key": [], "sha256 key": [], "decode": []}
    for _ in range(repeats):
        rows["stat key"].append(timed(lambda: [os.stat(p) for p in paths]))
        rows["sha256 key"].append(timed(lambda: file_digests(paths)))
        rows["decode"].append(timed(lambda: [_decoder_pixels(p, model.decoder.image_size) for p in paths]))
        for name, call in caches.items():
            for where in (folder / "cache", folder / "images" / "cache"):
                shutil.rmtree(where, ignore_errors=True)
            rows.setdefault(f"{name}: first run", []).append(timed(call))
            rows.setdefault(f"{name}: later run", []).append(timed(call))
    ms = {k: 1e3 * statistics.median(v) / n for k, v in rows.items()}
    kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
    return {"size": f"{size[0]}x{size[1]}", "n": n, "jpeg_kb": round(kb, 1),
            "ms_per_photo": {k: round(v, 3) for k, v in ms.items()},
            "sha256_share_of_first_run": {name: round(ms["sha256 key"] / ms[f"{name}: first run"], 4)
                                          for name in caches}}


def table(results: list[dict]) -> str:
    cols = ["stat key", "sha256 key", "decode", "latents: first run", "latents: later run",
            "tokens: first run", "tokens: later run"]
    out = ["| photo | JPEG KB | " + " | ".join(f"{c} (ms)" for c in cols) + " | sha256 / first run (latents, tokens) |",
           "|---|---:|" + "---:|" * len(cols) + "---:|"]
    for r in results:
        m, share = r["ms_per_photo"], r["sha256_share_of_first_run"]
        out.append(f"| {r['size']} | {r['jpeg_kb']:.0f} | " + " | ".join(f"{m[c]:.2f}" for c in cols)
                   + f" | {100 * share['latents']:.1f}%, {100 * share['tokens']:.1f}% |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two sizes, N=8, one repeat")
    p.add_argument("--sizes", default=None, help="comma-separated WxH (default 640x480,1600x1200,4000x3000)")
    p.add_argument("--n", type=int, default=None, help="photos per size (default 24; quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="repeats (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/cache_keys[_quick].json)")
    a = p.parse_args()
    sizes = a.sizes or ("640x480,4000x3000" if a.quick else "640x480,1600x1200,4000x3000")
    sizes = [tuple(int(x) for x in s.split("x")) for s in sizes.split(",")]
    n, repeats = a.n or (8 if a.quick else 24), a.repeats or (1 if a.quick else 3)

    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-cache-keys-") as tmp:
        root = Path(tmp)
        os.environ["UNIPERS_TINY_DIR"] = str(root / "tiny")  # the embedded presets, built here, not in ~/.cache
        from unipers.config import load_config
        from unipers.models.unified import UnifiedModel

        model = UnifiedModel.from_config(load_config([]))
        results = [measure(model, root, size, n, repeats) for size in sizes]
    print(table(results))
    out = Path(a.out or Path(__file__).parent / "results" / f"cache_keys{'_quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": sys.argv, "threads": a.threads, "repeats": repeats, "results": results,
                               "python": platform.python_version(), "torch": torch.__version__,
                               "machine": platform.machine(), "cpus": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
