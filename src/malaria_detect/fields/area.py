"""The imaged area of a field photo: the part that shows the smear, without the black (or white)
surround of a round field stop, a phone held to the eyepiece, a scanner's border or a transparent PNG
area (composited onto black when decoded). Cells outside it do not exist.

    area = imaged_area(rgb)          # (H, W) bool, True where the smear is
    rgb2 = fill_outside(rgb, area)   # the surround painted with the field's own background colour

How: pixels that are nearly black (every channel below DARK) or nearly white (every channel above
BRIGHT), in regions connected to the image's edge and larger than MIN_SURROUND of the image, are the
surround; a small opening removes single dark pixels first. Dark objects inside the smear (a stained
nucleus) are not connected to the edge through dark pixels, and Giemsa stains are never this dark in
all three channels, so they stay inside. NumPy + OpenCV.
"""

from __future__ import annotations

import cv2
import numpy as np

DARK, BRIGHT = 28, 252      # channel levels of the surround (uint8)
MIN_SURROUND = 0.001        # a surround region covers at least this share of the image
WORK_PIXELS = 500_000       # the mask is found on a copy of about this many pixels


def imaged_area(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: True where the image shows the smear (see the module's docstring)."""
    H, W = rgb.shape[:2]
    s = min(1.0, (WORK_PIXELS / (H * W)) ** 0.5)
    small = cv2.resize(rgb, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA) \
        if s < 1 else rgb
    outside = np.zeros(small.shape[:2], bool)
    # a blown-out (white) background is the field's own: only a white surround around a darker one counts
    sub = small[::4, ::4].reshape(-1, 3).astype(np.int32)
    lum = sub.sum(-1)
    background = np.median(sub[lum >= np.median(lum)], axis=0)
    r, g, b = small[..., 0], small[..., 1], small[..., 2]  # channel-wise: numpy's max(-1) over 3 is slow
    candidates = [np.maximum(np.maximum(r, g), b) < DARK] + \
        ([np.minimum(np.minimum(r, g), b) > BRIGHT] if background.min() <= BRIGHT else [])
    for cand in candidates:
        cand = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        big = [k for k in edge if k and stats[k, cv2.CC_STAT_AREA] >= MIN_SURROUND * cand.size]
        outside |= np.isin(lab, big)
    if not outside.any():
        return np.ones((H, W), bool)
    # the rim of the stop is soft: grow the surround by a few pixels of the copy
    outside = cv2.dilate(outside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if s < 1:
        outside = cv2.resize(outside.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0
    return ~outside


def fill_outside(rgb: np.ndarray, area: np.ndarray) -> np.ndarray:
    """A copy of the field with everything outside `area` set to its background colour (the median
    of the brightest half of the imaged pixels), so that segmentation sees no object there."""
    inside = rgb[area][::7]
    lum = inside.sum(-1)
    bg = np.median(inside[lum >= np.median(lum)], axis=0).astype(np.uint8) if len(inside) else \
        np.array([255, 255, 255], np.uint8)
    out = rgb.copy()
    out[~area] = bg
    return out
