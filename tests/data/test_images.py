"""Photo validation: every odd format becomes RGB, bad files are named, duplicates found."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from unipers.data.images import GREY, PhotoError, list_image_files, load_photo, load_photos, to_rgb
from synthetic import shape_image, write_photos


def rgb_at(photo, xy):
    return photo.image.getpixel(xy)


def test_rgba_is_composited_on_grey(tmp_path):
    img = Image.new("RGBA", (100, 100), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 50, 100))  # left half fully transparent (colour must not leak)
    img.save(tmp_path / "a.png")
    p = load_photo(tmp_path / "a.png")
    assert p.image.mode == "RGB"
    assert rgb_at(p, (10, 10)) == GREY
    assert rgb_at(p, (90, 10)) == (255, 0, 0)


def test_palette_with_and_without_transparency(tmp_path):
    base = Image.new("RGB", (80, 80), (0, 200, 0))
    base.paste((200, 0, 0), (0, 0, 40, 80))
    pal = base.quantize(colors=4)
    pal.save(tmp_path / "p.png")
    assert load_photo(tmp_path / "p.png").image.getpixel((70, 5)) == (0, 200, 0)
    red_index = pal.getpixel((5, 5))
    pal.save(tmp_path / "pt.png", transparency=red_index)
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    p = load_photo(tmp_path / "pt.png")
    assert p.image.getpixel((5, 5)) == GREY and p.image.getpixel((70, 5)) == (0, 200, 0)


def test_grayscale_l_and_la(tmp_path):
    Image.new("L", (70, 70), 77).save(tmp_path / "l.png")
    assert load_photo(tmp_path / "l.png").image.getpixel((1, 1)) == (77, 77, 77)
    la = Image.new("LA", (70, 70), (200, 255))
    la.paste((0, 0), (0, 0, 10, 70))
    la.save(tmp_path / "la.png")
    p = load_photo(tmp_path / "la.png")
    assert p.image.getpixel((50, 5)) == (200, 200, 200) and p.image.getpixel((5, 5)) == GREY


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (70, 70), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = load_photo(tmp_path / "c.jpg").image.getpixel((30, 30))
    assert r > 200 and g < 50 and b < 50


def test_16bit_is_scaled_not_saturated(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (80, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    a = np.asarray(load_photo(tmp_path / "deep.png").image)
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    assert abs(int(a[0, 64, 0]) - 129) <= 2  # mid-grey stays mid-grey
    assert 110 < a.mean() < 145  # a plain convert("L") would clip almost everything to 255
    mid = to_rgb(Image.fromarray(np.full((4, 4), 32768, np.int32)))  # mode "I"
    assert mid.getpixel((0, 0)) == (128, 128, 128)


def test_large_is_downscaled(tmp_path):
    shape_image(3, (3000, 2000)).save(tmp_path / "big.png")
    assert load_photo(tmp_path / "big.png").image.size == (1024, 683)
    assert load_photo(tmp_path / "big.png", max_side=512).image.size == (512, 341)


def test_tiny_is_refused_and_named(tmp_path):
    write_photos(tmp_path, 2)
    shape_image(5, (50, 40)).save(tmp_path / "tiny.png")
    with pytest.raises(PhotoError, match=r"tiny\.png.*too small \(50x40"):
        load_photos(tmp_path)
    got = load_photos(tmp_path, skip_bad=True)
    assert len(got.photos) == 2
    assert [(s["file"].endswith("tiny.png"), "too small" in s["reason"]) for s in got.skipped] == [(True, True)]


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_and_text_file_are_named(tmp_path):
    write_photos(tmp_path, 2)
    _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(PhotoError, match=r"cut\.jpg.*truncated"):
        load_photos(tmp_path)
    (tmp_path / "cut.jpg").unlink()
    (tmp_path / "notes.jpg").write_text("this is not a photo")
    with pytest.raises(PhotoError, match=r"notes\.jpg.*not a readable image"):
        load_photos(tmp_path)
    _truncated_jpeg(tmp_path / "cut.jpg")
    got = load_photos(tmp_path, skip_bad=True)
    assert sorted(s["file"].rsplit("/", 1)[1] for s in got.skipped) == ["cut.jpg", "notes.jpg"]
    assert len(got.photos) == 2


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PhotoError, match=r"cut\.png"):
        load_photo(tmp_path / "cut.png")


def test_exif_orientation_is_applied(tmp_path):
    img = shape_image(7, (200, 100))
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (200, 100)
    assert load_photo(tmp_path / "rot.jpg").image.size == (100, 200)


def test_exact_duplicates_keep_first(tmp_path):
    img = shape_image(11)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    img.save(tmp_path / "c.bmp")  # same pixels, another format: still a duplicate (pixel hash)
    shape_image(12).save(tmp_path / "d.png")
    got = load_photos(tmp_path)
    assert [p.path.name for p in got.photos] == ["a.png", "d.png"]
    assert [(d["file"].rsplit("/", 1)[1], d["same_as"].rsplit("/", 1)[1]) for d in got.duplicates] == [
        ("b.png", "a.png"), ("c.bmp", "a.png")]


def test_empty_folder_and_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhotoError, match=r"empty.*no image files"):
        load_photos(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    (tmp_path / "empty" / ".DS_Store").write_text("x")
    with pytest.raises(PhotoError, match=r"empty.*1 non-image files ignored"):
        load_photos(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_photos(tmp_path / "missing")


def test_listing_is_sorted_and_skips_hidden(tmp_path):
    for n in ("b.png", "a.JPG", ".hidden.png", "x.txt"):
        (tmp_path / n).write_bytes(b"")
    images, others = list_image_files(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.png"] and [p.name for p in others] == ["x.txt"]
