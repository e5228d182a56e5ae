"""Photo loading and validation for ``unipers prepare``.

    from unipers.data.images import load_photos
    photos = load_photos("photos/bo", max_side=1024, min_side=64, skip_bad=False)

Every photo is fully decoded (``img.load()``, so truncated files fail here and not in training), EXIF
orientation is applied, any mode (RGBA, P, P+transparency, L, LA, CMYK, I;16, I, F, ...) becomes RGB
(transparency is composited on neutral grey; 16-bit data is scaled, not clipped), large photos are
downscaled and tiny ones refused. Duplicates are found by the SHA-256 of the decoded RGB pixels (after
EXIF rotation, before resizing), so the same photo saved twice, or re-saved losslessly in another
format, is caught; the first in sorted order is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from unipers.errors import UnipersError

if TYPE_CHECKING:  # PIL is imported lazily so that ``unipers --help`` stays fast.
    from PIL import Image

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
)
GREY = (128, 128, 128)


class PhotoError(UnipersError, ValueError):
    """A file that cannot be used as a photo; the message names the file."""

    def __init__(self, file: Path | str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason


@dataclass
class Photo:
    """One usable photo: where it came from, its normalized RGB image and its pixel digest."""

    path: Path
    image: "Image.Image"
    digest: str


@dataclass
class PhotoSet:
    """The outcome of loading a folder: kept photos plus everything that was not kept, and why."""

    folder: Path
    photos: list[Photo] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}: bad files (--skip-bad)
    duplicates: list[dict] = field(default_factory=list)  # {"file", "same_as"}
    ignored: list[str] = field(default_factory=list)  # files without an image extension


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) directly in ``folder``, sorted by name; hidden files are skipped."""
    images, others = [], []
    for p in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or not p.is_file():
            continue
        (images if is_image_file(p) else others).append(p)
    return images, others


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    # Another library may have set LOAD_TRUNCATED_IMAGES globally; a truncated photo must still fail.
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _scale_16bit(img: "Image.Image") -> "Image.Image":
    """I;16 / I / F (one channel, more than 8 bits) -> 8-bit L, scaled over the full range."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif img.mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535):
        a = a / 257.0  # 65535 -> 255: a 16-bit image keeps its tones instead of saturating to white
    else:  # 32-bit data of unknown range: stretch min..max
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 1.0)
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: "Image.Image", background: tuple[int, int, int] = GREY) -> "Image.Image":
    """Convert any PIL mode to RGB; transparent pixels are composited on ``background``."""
    from PIL import Image

    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _scale_16bit(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, ...


def open_rgb(path: Path | str, *, max_side: int | None = None, draft: int | None = None) -> "Image.Image":
    """Open, fully decode, EXIF-rotate and convert one image to RGB; raise ``PhotoError`` if unusable.

    ``max_side`` downscales (aspect kept, LANCZOS); ``draft`` lets JPEG decode at reduced size first
    (fast path for embedding large pools, where only ~224 px are needed)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with _strict_decoding(), Image.open(path) as img:
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a malformed EXIF block must not lose the photo; keep it unrotated
                pass
            rgb = to_rgb(img)
            rgb.load()
    except UnidentifiedImageError:
        hint = " (HEIC needs pillow-heif; convert to JPEG/PNG)" if path.suffix.lower() in (".heic", ".heif") else ""
        raise PhotoError(path, f"not a readable image file{hint}") from None
    except Image.DecompressionBombError as e:
        raise PhotoError(path, f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise PhotoError(path, f"corrupt or truncated image ({e})") from None
    if max_side is not None and max(rgb.size) > max_side:
        rgb = downscale(rgb, max_side)
    return rgb


def downscale(img: "Image.Image", max_side: int) -> "Image.Image":
    from PIL import Image

    w, h = img.size
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def pixel_digest(img: "Image.Image") -> str:
    """SHA-256 of the decoded RGB pixels and size: equal for the same photo in any file format."""
    h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def load_photo(path: Path | str, *, max_side: int = 1024, min_side: int = 64) -> Photo:
    """One validated photo; ``PhotoError`` (naming the file) if it is unreadable or too small."""
    img = open_rgb(path)
    digest = pixel_digest(img)
    if min(img.size) < min_side:
        w, h = img.size
        raise PhotoError(path, f"too small ({w}x{h}; need at least {min_side} px on the short side)")
    if max(img.size) > max_side:
        img = downscale(img, max_side)
    return Photo(Path(path), img, digest)


def load_photos(folder: Path | str, *, max_side: int = 1024, min_side: int = 64, skip_bad: bool = False) -> PhotoSet:
    """Load every image file in ``folder`` (not recursive).

    A bad file raises ``PhotoError`` unless ``skip_bad`` (then it is listed in ``skipped``). Raises
    ``FileNotFoundError`` / ``NotADirectoryError`` for a missing folder and ``PhotoError`` naming the
    folder when nothing usable is left."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"photo folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    files, others = list_image_files(folder)
    result = PhotoSet(folder=folder, ignored=[str(p) for p in others])
    seen: dict[str, Path] = {}
    for path in files:
        try:
            photo = load_photo(path, max_side=max_side, min_side=min_side)
        except PhotoError as e:
            if not skip_bad:
                raise PhotoError(e.file, e.reason + " (use --skip-bad to skip such files)") from None
            result.skipped.append({"file": str(path), "reason": e.reason})
            continue
        if photo.digest in seen:
            result.duplicates.append({"file": str(path), "same_as": str(seen[photo.digest])})
            continue
        seen[photo.digest] = path
        result.photos.append(photo)
    if not result.photos:
        what = "no image files" if not files else "no usable photos"
        extra = f" ({len(others)} non-image files ignored)" if others else ""
        raise PhotoError(folder, f"{what} in this folder{extra}")
    return result


def save_png(img: "Image.Image", path: Path) -> None:
    """Deterministic PNG (no metadata, fixed compression) so identical inputs give identical bytes."""
    img.save(path, format="PNG", compress_level=6)
