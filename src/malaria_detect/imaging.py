"""Decoding any supported image file to RGB uint8, the one place images are read (`open_rgb`), and
the one image -> array path shared by training and inference (`resize_uint8`, `normalize`).

Pillow + NumPy only: limits checked from the header, EXIF orientation, 16-bit and float images,
transparency, and the listing of image files in folders (`iter_image_paths`).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MalariaDetectError

if TYPE_CHECKING:
    from .record import Record

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}


# Refuse images that declare more pixels than this before decoding them (decompression bombs).
# open_rgb() checks every image's declared size itself, with a clear message. Pillow's own guard
# (Image.MAX_IMAGE_PIXELS, a process-wide setting that belongs to the application) is left as it is:
# an image past it is refused with the same kind of message.
MAX_IMAGE_PIXELS = 40_000_000
# The largest whole field decoded, by the command line and the server alike (smear --max-field-pixels and
# MALARIA_DETECT_MAX_FIELD_PIXELS raise it); fields are segmented in tiles (fields/segment.py).
FIELD_MAX_PIXELS = 40_000_000

# The only formats decoded: other Pillow plugins (DDS, PSD, ICO, ...) are never tried on user files.
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")

# Right after decoding, an image is shrunk to at most this many pixels a side (cells are ~130 px):
# this bounds memory and the heatmap size for any upload. Whole smear fields need their own path.
MAX_SIDE = 512
# The most elongated image the single-cell path takes (long side : short side). NIH cell crops reach
# 2.2 : 1; a 1 x 10,000 strip is no cell photo, and its derived images (heatmaps) would be huge.
CELL_MAX_ASPECT = 8.0

# Bumped whenever open_rgb() can return different pixels for the same file (keys decode caches).
DECODE_VERSION = 2


class ImageError(MalariaDetectError):
    """An input that is not a readable image; the message says why."""


class PixelBudget:
    """Pixels a caller may still decode (the web app: one per request); open_rgb() takes from it."""

    def __init__(self, pixels: int):
        self.total = self.left = pixels

    def take(self, w: int, h: int) -> None:
        if w * h > self.left:
            raise ImageError(f"over the request's pixel budget: {w}x{h} pixels, {self.left:,} of "
                             f"{self.total:,} left; send it in another request")
        self.left -= w * h


def _regular_file(path: Path) -> None:
    """Refuse what is not a regular, non-empty file before opening it (a FIFO would block forever)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file" + (" (a folder)" if stat.S_ISDIR(st.st_mode) else ""))
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale -> 8-bit 'L', scaled, not clipped.

    The bit depth is inferred from the brightest pixel: microscope cameras often store 10, 12 or 14
    bits in a 16-bit container, so the range is the smallest of 2^8, 2^10, ..., 2^16 - 1 that holds
    the data (float images: [0, 1] when they fit, else their own maximum)."""
    a = np.array(im, dtype=np.float32)  # a writable copy (asarray of a float image is read-only)
    top = float(a.max()) if a.size else 0.0
    if im.mode == "F" and top <= 1.0:
        full = 1.0
    else:
        full = next((2.0 ** b - 1 for b in (8, 10, 12, 14, 16) if top <= 2 ** b - 1), top)
    a *= 255.0 / full
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # NIH crops have a black surround
        im = Image.alpha_composite(bg, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def shrink(im: Image.Image, max_side: int | None) -> Image.Image:
    """The image scaled down (aspect kept) so that neither side exceeds max_side; as is if it fits."""
    w, h = im.size
    if not max_side or max(w, h) <= max_side:
        return im
    s = max_side / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR, reducing_gap=2.0)


def _declared_size(src) -> str | None:
    """'WxH' as an image file's header declares it, read by the format's Pillow plugin without
    Pillow's size guard: only called once Pillow has refused the image, to say how large it is."""
    try:
        with open(src, "rb") if isinstance(src, (str, Path)) else contextlib.nullcontext(src) as fp:
            fp.seek(0)
            prefix = fp.read(16)
            for fmt in FORMATS:
                factory, accept = Image.OPEN[fmt]
                if accept is None or accept(prefix) is True:
                    fp.seek(0)
                    w, h = factory(fp, "").size
                    return f"{w}x{h}"
    except Exception:  # only the better message is lost
        return None
    return None


def _array_image(a: np.ndarray) -> Image.Image:
    """An H x W x 3 (RGB) or H x W (grey) uint8 array as a Pillow image."""
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or 0 in a.shape:
        raise ImageError(f"an image array must be H x W x 3 (RGB) or H x W, uint8; got shape {a.shape}, {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def _check_aspect(w: int, h: int, max_aspect: float | None) -> None:
    if max_aspect and max(w, h) > max_aspect * min(w, h):
        raise ImageError(f"a {w}x{h} image is no photo of a single cell (the long side may be at most "
                         f"{max_aspect:g} x the short one)")


def open_rgb(src, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int | None = MAX_SIDE,
             budget: PixelBudget | None = None, max_aspect: float | None = None) -> Image.Image:
    """Open a path, bytes, file object, PIL image or H x W x 3 uint8 array as an RGB image; raises
    ImageError with a clear message.

    The one place images are decoded. The pixel count is checked from the header, before anything
    is decoded, so a small file that declares a huge image (a decompression bomb) is refused without
    allocating it; `budget` (if given) is charged the same count. Only FORMATS are decoded; EXIF
    orientation is applied; 16-bit images are scaled to 8 bits; the result is shrunk to at most
    `max_side` pixels a side. Any decoder failure becomes an ImageError for this image alone."""
    if isinstance(src, np.ndarray):
        src = _array_image(src)
        if src.width * src.height > max_pixels:
            raise ImageError(f"image too large: {src.width}x{src.height} pixels (limit {max_pixels:,})")
    if isinstance(src, Image.Image):  # already decoded (e.g. by the web app)
        _check_aspect(*src.size, max_aspect)
        return shrink(_to_rgb(src), max_side)
    try:
        if isinstance(src, memoryview):
            src = src.tobytes()
        if isinstance(src, (bytes, bytearray)):
            if not src:
                raise ImageError("empty file (0 bytes)")
            src = io.BytesIO(src)
        elif isinstance(src, (str, Path)):
            _regular_file(Path(src))
        with Image.open(src, formats=FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} pixels (limit {max_pixels:,})")
            _check_aspect(w, h, max_aspect)
            if budget is not None:
                budget.take(w, h)
            if max_side and max(w, h) > 2 * max_side:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2 to 1/8 scale (never below max_side)
            ImageOps.exif_transpose(im, in_place=True)
            return shrink(_to_rgb(im), max_side)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # past Pillow's own guard, which may be lower than ours
        size = _declared_size(src)
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise ImageError(f"image too large: {size} pixels (limit {limit:,})" if size else
                         f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image in a supported format (png, jpg, webp, tif, bmp)") from None
    except MemoryError:
        raise ImageError("image too large to decode (out of memory)") from None
    except Exception as e:  # any decoder failure (OSError, SyntaxError, NotImplementedError, struct.error...)
        raise ImageError(f"cannot decode image: {e or type(e).__name__}") from None


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8, the exact resize used in training and at inference."""
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize(batch_uint8: np.ndarray, record: Record) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, scaled with the record's mean/std."""
    return to_float_nchw(batch_uint8, record.mean, record.std)


def to_float_nchw(batch_uint8: np.ndarray, mean, std) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 (x / 255 - mean) / std per channel. Written channel-first
    into one buffer: the same float32 arithmetic as broadcasting over the last axis, ~10x faster."""
    n, h, w, c = batch_uint8.shape
    out = np.empty((n, c, h, w), np.float32)
    np.multiply(batch_uint8.transpose(0, 3, 1, 2), np.float32(1.0 / 255.0), out=out, dtype=np.float32)
    out -= np.asarray(mean, np.float32).reshape(1, c, 1, 1)
    out /= np.asarray(std, np.float32).reshape(1, c, 1, 1)
    return out


def load_uint8(src, size: int) -> np.ndarray:
    return resize_uint8(open_rgb(src), size)


def sample_names(paths: Iterable[str | Path]) -> dict[str, str]:
    """Which sample each listed file belongs to when none is named: the name of the folder argument it was
    found in (a folder of fields is one sample, a slide), else the name of its own folder. Keys are the
    files as iter_image_paths lists them (str)."""
    out = {}
    for p in paths:
        p = Path(p)
        for q in iter_image_paths([p]) if p.is_dir() else [p]:
            name = (p if p.is_dir() else q.parent).resolve().name or "sample"
            out.setdefault(str(q), name)
    return out


def iter_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, folders recursively (image extensions only), in a stable order; each real file
    once, however many arguments reach it (a warning says how many repeats were left out). In a
    folder, anything with an image extension that is not a folder is listed, so that a FIFO or a
    dangling link gets its own error row instead of silently none."""
    seen, repeats = set(), 0
    for p in paths:
        p = Path(p)
        found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and not q.is_dir()) \
            if p.is_dir() else [p]  # a missing or non-image file is reported in its row
        for q in found:
            key = os.path.realpath(q) if q.exists() else str(q)
            if key in seen:
                repeats += 1
                continue
            seen.add(key)
            yield q
    if repeats:
        warnings.warn(f"{repeats} input path{'s' * (repeats != 1)} named a file already listed (the same file "
                      "through another argument or link): each file is counted once", stacklevel=2)
