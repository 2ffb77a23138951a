"""Cutting cells out of a field: as the whole-field pipeline masks them, and as a person crops a box."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

MASK_GROW = 0.03                 # grow each cell's mask by this fraction of a diameter (keep the rim)


def masked_crop(rgb: np.ndarray, cell, diameter: float) -> np.ndarray | None:
    """One cell as the network sees it before the resize: the tight box around its mask (grown by
    MASK_GROW diameters to keep the rim), pixels outside the mask black, like the NIH crops.
    None for an empty mask. Also what `cut-cells --mode mask` writes."""
    grow = max(1, int(round(MASK_GROW * diameter)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    m = cv2.dilate(cell.mask.astype(np.uint8), kernel) > 0
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return None
    by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    x0, y0 = cell.box[0], cell.box[1]
    return np.ascontiguousarray(rgb[y0 + by0:y0 + by1, x0 + bx0:x0 + bx1] * m[by0:by1, bx0:bx1, None])


def cell_crops(rgb: np.ndarray, cells, diameter: float, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each cell's masked crop, resized like a cell image."""
    out = np.zeros((len(cells), size, size, 3), np.uint8)
    for i, c in enumerate(cells):
        crop = masked_crop(rgb, c, diameter)
        if crop is not None:
            # the same resize as every other cell image (imaging.resize_uint8: Pillow bilinear)
            out[i] = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    return out


def box_crops(rgb: np.ndarray, cells, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each cell's box as it is, background included (how a person crops a
    cell, and what the robust model classifies best), resized like a cell image."""
    out = np.zeros((len(cells), size, size, 3), np.uint8)
    for i, c in enumerate(cells):
        x0, y0, x1, y1 = c.box
        if x1 > x0 and y1 > y0:
            out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1])).resize((size, size),
                                                                                              Image.BILINEAR))
    return out


def box_crop(img: Image.Image, box, scale: float = 1.0) -> Image.Image:
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * scale, (y1 - y0) / 2 * scale
    return img.crop((max(0, round(cx - hw)), max(0, round(cy - hh)),
                     min(img.width, round(cx + hw)), min(img.height, round(cy + hh))))
