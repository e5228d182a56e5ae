"""Synthetic test data: distinct coloured shapes (so tests need no image files of their own), and small
Yo'LLaVA / Yo'Chameleon datasets in their published layouts."""

import json
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


def write_photos(folder, n: int, start: int = 0, size=(96, 80), pattern: str = "photo_{:02d}.png"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / pattern.format(i) for i in range(n)]
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


def write_yollava(root, concepts=(("bo", 4, 2), ("mam", 3, 2)), n_negative: int = 2, qa: bool = True):
    """A Yo'LLaVA folder as published: ``ROOT/train/<c>/<i>.png`` (+ ``negative_example/``),
    ``ROOT/test/<c>/<i>.png``, Yo'LLaVA's ``yollava-visual-qa.json`` (keyed by concept, image paths as
    ``./yollava-data/test/<c>/<i>.png``, ``<sks>``) and RAP's ``yollava-text-only-qa.json`` (keyed by
    concept, ``option``, bare ``sks``). Returns {concept: test photo paths}."""
    tests = {}
    for k, (c, n_train, n_test) in enumerate(concepts):
        write_photos(root / "train" / c, n_train, start=100 * k, pattern="{}.png")
        write_photos(root / "train" / c / "negative_example", n_negative, start=100 * k + 50, pattern="neg{}.png")
        tests[c] = write_photos(root / "test" / c, n_test, start=100 * k + 20, pattern="{}.png") if n_test else []
    if qa:
        visual = {c: {f"./yollava-data/test/{c}/{i}.png": {
            "question": f"What is next to <sks> in photo {i}?", "options": {"A": "A ball", "B": "A cup"},
            "correct_answer": "A"} for i in range(len(tests[c]))} for c, *_ in concepts}
        text = {c: {str(i): {"question": f"Is sks a dog or a cat ({i})?", "option": {"A": "Dog", "B": "Cat"},
                             "correct_answer": "A"} for i in range(2)} for c, *_ in concepts}
        (root / "yollava-visual-qa.json").write_text(json.dumps(visual, indent=4))
        (root / "yollava-text-only-qa.json").write_text(json.dumps(text, indent=4))
    return tests


LATENTS = "".join(f"<reserved{16201 + i}>" for i in range(16))


def yochameleon_records(positives, negatives, soft=(), author_root="/mnt/localssd/code/data/yochameleon-data"):
    """Yo'Chameleon training records as published: image paths from the authors' machine (``author_root``
    + the path inside the data folder), ``<sks>`` in understanding turns, the prefix
    ``<reserved16200> is <latents>.`` in generation prompts (soft positives: 4 latent tokens)."""
    records = []
    for rel in positives:
        records.append({"image": [f"{author_root}/{rel}"], "conversations": [
            {"from": "human", "value": "<image>\nCan you see <sks> in this photo? Answer with a single word."},
            {"from": "bot", "value": "Yes"}]})
        records.append({"image": [f"{author_root}/{rel}"], "conversations": [
            {"from": "human", "value": f"<reserved16200> is {LATENTS}. A photo of <reserved16200>."},
            {"from": "bot", "value": "<image>"}]})
    for rel in negatives:
        records.append({"image": [f"{author_root}/{rel}"], "conversations": [
            {"from": "human", "value": "<image>\nCan you see <sks> in this photo? Answer with a single word."},
            {"from": "bot", "value": "No"}]})
    for rel in soft:
        records.append({"image": [f"{author_root}/{rel}"], "conversations": [
            {"from": "human", "value": f"<reserved16200> is {LATENTS[:4 * len('<reserved16201>')]}. "
                                       "A photo of <reserved16200>."},
            {"from": "bot", "value": "<image>"}]})
    records.append({"image": [], "conversations": [
        {"from": "human", "value": f"<sks> is {LATENTS}. What colour is <sks>?"},
        {"from": "bot", "value": f"{LATENTS.replace('162', '163')}<sks> is orange."}]})
    return records


def write_yochameleon(folder, n_pos: int = 4, n_neg: int = 3, n_soft: int = 2):
    """``folder/yochameleon-data/train/bo/...`` images and ``folder/bo.json`` referring to them by the
    authors' absolute paths. Returns (json path, data folder)."""
    data = folder / "yochameleon-data"
    write_photos(data / "train" / "bo", n_pos, start=500, pattern="{}.png")
    write_photos(data / "train" / "bo" / "negative_example", n_neg, start=550, pattern="n{}.png")
    write_photos(data / "train" / "bo" / "soft", n_soft, start=580, pattern="s{}.png")
    records = yochameleon_records([f"train/bo/{i}.png" for i in range(n_pos)],
                                  [f"train/bo/negative_example/n{i}.png" for i in range(n_neg)],
                                  [f"train/bo/soft/s{i}.png" for i in range(n_soft)])
    path = folder / "bo.json"
    path.write_text(json.dumps(records, indent=2))
    return path, data
