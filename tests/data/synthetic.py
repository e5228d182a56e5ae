"""Synthetic test images: distinct coloured shapes, so tests need no image files of their own."""

import random


def shape_image(seed: int, size=(96, 80)):
    """A distinct test image: random background and a random coloured ellipse or rectangle."""
    from PIL import Image, ImageDraw

    r = random.Random(seed)
    img = Image.new("RGB", size, tuple(r.randrange(256) for _ in range(3)))
    box = (r.randrange(size[0] // 3), r.randrange(size[1] // 3), size[0] // 2 + r.randrange(size[0] // 2),
           size[1] // 2 + r.randrange(size[1] // 2))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=tuple(r.randrange(256) for _ in range(3)))
    return img


def write_photos(folder, n: int, start: int = 0, size=(96, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:02d}.png" for i in range(n)]
    for i, p in enumerate(paths):
        shape_image(1000 + start + i, size).save(p)
    return paths


def write_pool(folder, n: int = 40):
    """n coloured shapes, a third of them in a sub-folder."""
    for i in range(n):
        sub = folder / "sub" if i % 3 == 0 else folder
        sub.mkdir(parents=True, exist_ok=True)
        shape_image(i, (64, 64)).save(sub / f"pool_{i:03d}.png")
    return folder
