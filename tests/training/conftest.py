"""Fixtures for the training tests: a tiny image–caption set written as a folder + captions JSONL and as
WebDataset-format tar shards of the same pairs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

ALIGN_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
ALIGN_SHAPES = ("circle", "square", "triangle")


def _shape_image(colour, shape: str, size: int = 32):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (245, 245, 245))
    draw, box = ImageDraw.Draw(im), (6, 6, size - 7, size - 7)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, 5), (5, size - 6), (size - 6, size - 6)], fill=colour)
    return im


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def align_pairs(tmp_path_factory) -> dict:
    """12 pairs ("a red circle", ...): {"folder", "captions", "shards" (4 tars of 3), "pairs": {key: caption}}."""
    root = tmp_path_factory.mktemp("align_pairs")
    folder = root / "pairs"
    (folder / "images").mkdir(parents=True)
    pairs: dict[str, tuple[bytes, str]] = {}
    lines = []
    for i, (name, rgb) in enumerate(ALIGN_COLOURS.items()):
        for j, shape in enumerate(ALIGN_SHAPES):
            key = f"images/{name}_{shape}"
            buf = io.BytesIO()
            _shape_image(rgb, shape).save(buf, format="PNG")
            (folder / f"{key}.png").write_bytes(buf.getvalue())
            caption = f"a {name} {shape}"
            pairs[key] = (buf.getvalue(), caption)
            lines.append(json.dumps({"image": f"{key}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    shards = []
    items = list(pairs.items())
    for s in range(4):
        path = root / "shards" / f"pairs-{s:03d}.tar"
        path.parent.mkdir(exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for k, (key, (png, caption)) in enumerate(items[s * 3:(s + 1) * 3]):
                _add_tar_member(tar, f"{key}.png", png)
                if k % 2:  # both caption layouts: .txt and .json with a "caption" key
                    _add_tar_member(tar, f"{key}.json", json.dumps({"caption": caption}).encode())
                else:
                    _add_tar_member(tar, f"{key}.txt", caption.encode())
        shards.append(str(path))
    return {"folder": folder, "captions": folder / "captions.jsonl", "shards": shards,
            "pairs": {k: c for k, (_, c) in pairs.items()}, "root": Path(root)}
