"""Images that are not a single red-cell crop, for measuring the not-a-cell (ood) flag:
scikit-image's sample photos and crops of them, noise, solid colours, a screenshot-like image,
a 'smear field' tiled from several cells, and (with `fields_dir`) real whole smear fields and
crops of them that hold several cells (2.5-4 cell diameters across)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "horse",
           "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel")


def non_cell_images(cells_dir: str | Path | None = None,
                    fields_dir: str | Path | None = None) -> dict[str, Image.Image]:
    from skimage import data

    rng = np.random.default_rng(0)
    out = {}
    for name in SKIMAGE:
        arr = getattr(data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr).convert("RGB")
        out[name] = img
        w, h = img.size
        s = min(w, h) // 3
        out[name + "_crop"] = img.crop((w // 4, h // 4, w // 4 + s, h // 4 + s))
    for i in range(4):
        out[f"noise{i}"] = Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8))
    for c in [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0), (40, 200, 60), (20, 40, 220)]:
        out[f"solid{c}"] = Image.new("RGB", (100, 100), c)
    shot = Image.new("RGB", (400, 260), "white")
    d = ImageDraw.Draw(shot)
    for i in range(10):
        d.text((10, 10 + 24 * i), f"Settings  row {i}  value {i * 37}", fill="black")
        d.rectangle((300, 10 + 24 * i, 390, 28 + 24 * i), outline="blue")
    out["screenshot"] = shot
    if cells_dir:  # a smear-like field: many cells on a pale background
        cells = sorted(Path(cells_dir).rglob("*.webp"))[:16]
        field = Image.new("RGB", (4 * 150, 4 * 150), (235, 225, 230))
        for i, p in enumerate(cells):
            c = Image.open(p).convert("RGB").resize((140, 140))
            field.paste(c, (150 * (i % 4) + 5, 150 * (i // 4) + 5))
        out["smear_field"] = field
    if fields_dir:  # real fields (another lab) and windows of them holding several cells
        for p in sorted(Path(fields_dir).glob("*.JPG")):
            f = Image.open(p).convert("RGB")
            out[p.stem] = f
            out.update(field_windows(f, p.stem, (180, 180, 220, 260), rng))
    return out


def field_windows(field: Image.Image, stem: str, sides, rng) -> dict[str, Image.Image]:
    """Square windows of a field at random places, one per side length: `{stem}_window{k}`."""
    out = {}
    for k, side in enumerate(sides):
        x, y = rng.integers(0, field.width - side), rng.integers(0, field.height - side)
        out[f"{stem}_window{k}"] = field.crop((x, y, x + side, y + side))
    return out
