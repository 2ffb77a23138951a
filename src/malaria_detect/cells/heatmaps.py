"""Heatmaps: where the network looked (its class-activation map), drawn over the cell."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..imaging import open_rgb, shrink

HEATMAP_MAX_SIDE = 512  # heatmap overlays are at most this many pixels a side


# matplotlib's 'inferno' at 33 evenly spaced points (RGB 0-255): perceptually uniform, readable in
# greyscale and by colour-blind readers; black = no evidence, pale yellow = strongest. The web page's
# legend (static/style.css, --inferno) uses the same colours.
_INFERNO = np.array([
    0, 0, 4, 4, 3, 18, 11, 7, 36, 21, 11, 55, 33, 12, 74, 47, 10, 91, 61, 9, 101, 74, 12, 107,
    87, 16, 110, 100, 21, 110, 113, 25, 110, 125, 30, 109, 138, 34, 106, 151, 39, 102, 163, 44, 97, 176, 49, 91,
    188, 55, 84, 199, 62, 76, 210, 70, 68, 219, 80, 59, 228, 90, 49, 235, 102, 40, 241, 115, 29, 246, 128, 19,
    249, 142, 9, 251, 157, 7, 252, 172, 17, 251, 188, 33, 249, 203, 53, 245, 219, 76, 242, 234, 105, 243, 246, 138,
    252, 255, 164], np.float32).reshape(33, 3)


def _colormap(v: np.ndarray) -> np.ndarray:
    """Value in [0,1] -> RGB uint8 on the 'inferno' scale (linear between the table's points)."""
    x = np.clip(np.asarray(v, np.float32), 0, 1) * (len(_INFERNO) - 1)
    i = np.minimum(x.astype(np.int64), len(_INFERNO) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * _INFERNO[i] + f * _INFERNO[i + 1] + 0.5).astype(np.uint8)


def cam_to_map(cam: np.ndarray, size: tuple[int, int], temperature: float | None = None) -> np.ndarray:
    """Upsample a raw CAM to (h, w) = size[::-1], as values in [0, 1].

    With `temperature`: only evidence *for* parasitized is coloured, relative to the strongest
    location but never less than a logit contribution of 3 T (p = 0.95), so an uninfected cell with
    a faint positive spot stays cool while a parasitized cell shows where its evidence peaks.
    Without it the map is min-max scaled."""
    c = np.asarray(cam, np.float32)
    if temperature:
        c = np.clip(c, 0, None) / max(float(c.max()), 3.0 * temperature)
    else:
        c = c - c.min()
        c = c / c.max() if c.max() > 0 else c
    img = Image.fromarray(c.astype(np.float32), mode="F").resize(size, Image.BILINEAR)  # no overshoot
    return np.clip(np.asarray(img, np.float32), 0, 1)


def cam_peak_xy(cam: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """Image coordinates (x, y) of the strongest CAM location: the centre of that feature-map cell's
    footprint in an image of `size` = (width, height)."""
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    h, w = cam.shape
    return int((j + 0.5) / w * size[0]), int((i + 0.5) / h * size[1])


def heatmap_overlay(src, cam: np.ndarray, temperature: float | None = None, alpha: float = 0.5,
                    min_size: int = 192, max_size: int = HEATMAP_MAX_SIDE) -> Image.Image:
    """The cell with its class-activation map blended on top (PIL RGB image, at most `max_size`
    pixels a side); the black surround of a segmented cell is left as it is."""
    img = shrink(src if isinstance(src, Image.Image) else open_rgb(src), max_size)
    if min(img.size) < min_size:  # upscale small crops so the overlay is readable, never past max_size
        s = min(min_size / min(img.size), max_size / max(img.size))
        if s > 1:
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
    heat = _colormap(cam_to_map(cam, img.size, temperature)).astype(np.float32)
    base = np.asarray(img, np.float32)
    a = alpha * (base.mean(-1, keepdims=True) > 12)
    out = (1 - a) * base + a * heat
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))
