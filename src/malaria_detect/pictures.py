"""The pictures the samples database keeps of its fields (store.py): each field as a JPEG of at most
PICTURE_MAX_SIDE pixels a side, so a sample can be reviewed and printed after its files are gone; and the
field's own file, used only while it is still the photo that was analysed (its sha256 and size)."""

from __future__ import annotations

from pathlib import Path

PICTURE_MAX_SIDE = 1600


def picture_entry(img) -> tuple[bytes, int, int]:
    """A field's picture as save_report takes it: (JPEG, width, height)."""
    return picture_of({}, img)


def field_picture(img) -> bytes:
    """A field's picture as the database keeps it: JPEG (quality 85), at most PICTURE_MAX_SIDE a side."""
    import io

    from PIL import Image

    img = img.convert("RGB")
    if max(img.size) > PICTURE_MAX_SIDE:
        k = PICTURE_MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def picture_of(field: dict, img=None) -> tuple[bytes, int, int] | None:
    """(JPEG, width, height) of a field's picture: of `img` (PIL; a tuple is already one), else of its image
    file when that is readable."""
    if isinstance(img, tuple):
        return img
    if img is None:
        img = open_field_file(field)
        if img is None:
            return None
    jpeg = field_picture(img)
    k = min(1.0, PICTURE_MAX_SIDE / max(img.size))
    return jpeg, max(1, round(img.width * k)), max(1, round(img.height * k))


def file_sha256(path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def open_field_file(field: dict):
    """The field's image file (PIL), when it is readable and, if the record holds its sha256, still the
    same file (a file of that name elsewhere, or changed since, is not the photo that was analysed)."""
    from .imaging import FIELD_MAX_PIXELS, ImageError, open_rgb

    want = field.get("file_sha256")
    if want and file_sha256(field["image"]) != want:
        return None
    try:
        img = open_rgb(field["image"], FIELD_MAX_PIXELS, max_side=None)
    except (ImageError, OSError, ValueError):
        return None
    return img if (img.width, img.height) == (field.get("width"), field.get("height")) else None
