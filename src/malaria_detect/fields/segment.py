"""Red-cell segmentation of a whole thin-smear field: classical, OpenCV + NumPy, no torch.

    cells, diameter = segment_cells(rgb)            # rgb: (H, W, 3) uint8

The steps, each in plain view below:
1. **Foreground**: red cells absorb green light, so the (smoothed) green channel is dark on cells
   and bright on the background; Otsu's threshold splits them. Pale cell centres (central pallor)
   are filled as holes, but only holes smaller than a cell, so the background enclosed by a ring
   of touching cells stays background.
2. **Scale**: the typical cell diameter is estimated from the image itself: the median equivalent
   diameter of the compact, isolated components (single cells). `cell_diameter` overrides it.
   The image is then resized so a cell is ~`WORK_DIAMETER` px, which makes every later step
   independent of magnification (and fast on large images).
3. **Splitting touching cells**: the distance transform of the foreground peaks at each cell's
   centre; its local maxima (at least ~0.45 diameters apart) seed a watershed on the distance map.
4. **Filtering**: regions far smaller than a cell (platelets, debris), far larger (clumps that
   could not be split) or dominated by very dark, saturated stain (white-cell nuclei) are left out.
   What is left gets a box and a mask in the original image's pixels.

Images larger than `TILE_PIXELS` are processed in overlapping tiles; a cell belongs to the tile
whose core holds its centre, so cells on tile borders are neither lost nor counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.segmentation import watershed

from ..errors import MalariaDetectError

PEAK_FOOTPRINT, PEAK_MIN, SMOOTH = 0.45, 0.18, 0.06  # in cell diameters (see _split)
DARK = 0.55  # a nucleus pixel has green below this fraction of the field's typical red-cell green (white cells)
BOX_PAD = 0.08   # boxes reach this fraction of a diameter beyond the mask (cell edges are soft)
HOUGH_MIN_DIST, HOUGH_VOTES = 0.6, 15   # circles: centres >= 0.6 diameters apart, accumulator votes
SINGLE_AREA, SINGLE_SOLIDITY = 1.35, 0.92   # a region this small and convex is one cell
CIRCLE_FILL, NMS_IOU = 0.6, 0.45   # a circle must be this full of its region; duplicate boxes
WORK_DIAMETER = 40           # cells are resized to about this many pixels across for segmentation
TILE_PIXELS = 6_000_000      # larger images are segmented in tiles (in original pixels)
# The work per field is bounded whatever the diameter given: pixels after the rescale to WORK_DIAMETER
# (a 1280 x 960 field of 80-px cells is 0.3 MP; 40 MP is a 40 MP field of 40-px cells) and objects kept.
MAX_WORK_PIXELS = 40_000_000
MAX_OBJECTS = 20_000
MIN_AREA, MAX_AREA = 0.25, 2.6   # region area relative to a typical cell's, kept in between


@dataclass
class Cell:
    box: tuple[int, int, int, int]      # x0, y0, x1, y1 in original image pixels (x1, y1 exclusive)
    mask: np.ndarray                    # bool (y1 - y0, x1 - x0): the cell's pixels inside the box
    area: int                           # pixels, original scale
    border: bool                        # touches the image border (often a cut cell)
    kind: str = "red cell"              # or "white cell": a region mostly of nucleus-dark stain


class SegmentationError(MalariaDetectError):
    """The image cannot be segmented (e.g. it holds no cell-like foreground)."""


def foreground(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (bool mask of stained pixels, the background's RGB colour, the stain map as uint8).

    The stain map is each pixel's colour distance from the background colour (the median of the
    brightest half of the image), so it works whatever the stain's hue or the lamp's brightness:
    red cells differ from the background in both."""
    x = cv2.GaussianBlur(rgb, (5, 5), 0).astype(np.float32)
    sub = x[::4, ::4].reshape(-1, 3)                 # statistics from every 16th pixel are plenty
    lum = sub.sum(-1)
    bg = np.median(sub[lum >= np.median(lum)], axis=0)
    x -= bg
    d = cv2.magnitude(cv2.magnitude(x[..., 0], x[..., 1]), x[..., 2])
    d8 = np.clip(d * (255.0 / max(float(np.percentile(d[::4, ::4], 99.5)), 1.0)), 0, 255).astype(np.uint8)
    t, fg = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return fg > 0, bg, d8


def fill_small_holes(fg: np.ndarray, max_hole: float) -> np.ndarray:
    """Fill background holes smaller than `max_hole` pixels (central pallor), keep larger ones."""
    bg = (~fg).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=4)
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < max_hole
    # a hole touching the image border is background, not pallor
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        small[np.unique(edge)] = False
    return fg | small[lab]


def estimate_diameter(fg: np.ndarray) -> float:
    """Median equivalent diameter of compact, isolated components: single cells."""
    filled = fill_small_holes(fg, fg.size)  # fill every enclosed hole: we only want outlines here
    n, lab, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    w, h = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    keep = (areas >= 50) & (areas / np.maximum(w * h, 1) > 0.68) & (np.minimum(w, h) / np.maximum(w, h) > 0.75)
    if keep.sum() < 3:
        return _diameter_from_distance(filled)
    d = 2 * np.sqrt(areas[keep] / np.pi)
    # isolated cells are the common mode; pairs that passed the shape test sit in the upper tail
    return float(np.median(d[d <= np.median(d) * 1.4]))


def _diameter_from_distance(fg: np.ndarray) -> float:
    """Fallback for crowded fields with no isolated cell: the distance transform peaks at each cell's
    centre at about its radius, also where cells touch."""
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    peaks = dist[(dist == cv2.dilate(dist, np.ones((9, 9), np.uint8))) & (dist >= 4)]
    if len(peaks) < 3:
        raise SegmentationError("no cell-like objects found to estimate the cell size (give --cell-diameter)")
    return float(2 * np.median(peaks[peaks >= np.median(peaks)]))


def _split(fg: np.ndarray, diameter: float) -> tuple[np.ndarray, int]:
    """Watershed of the distance transform, seeded at its local maxima -> (labels, count)."""
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    dist = cv2.GaussianBlur(dist, (0, 0), diameter * SMOOTH)
    k = max(3, int(round(diameter * PEAK_FOOTPRINT)) | 1)
    peaks = (dist == cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))) \
        & (dist > diameter * PEAK_MIN)
    n, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    labels = watershed(-dist, markers, mask=fg)
    return labels.astype(np.int32), n


def _circles(stain: np.ndarray, diameter: float) -> np.ndarray:
    """Circle centres (N, 3: x, y, r) of about a cell's size on the stain map (Hough transform)."""
    c = cv2.HoughCircles(stain, cv2.HOUGH_GRADIENT, dp=1, minDist=HOUGH_MIN_DIST * diameter,
                         param1=100, param2=HOUGH_VOTES, minRadius=int(0.35 * diameter),
                         maxRadius=int(0.65 * diameter))
    return np.zeros((0, 3), np.float32) if c is None else c[0]


def _segment_scaled(rgb: np.ndarray, diameter: float) -> list[tuple]:
    """Segment an image already scaled to cells of `diameter` px -> [(x0, y0, x1, y1, mask, area, kind)].

    Watershed regions that look like one cell (not much larger than a typical cell, convex) are
    kept as they are. Larger or concave regions are overlapping cells the watershed could not
    separate: where the Hough transform finds two or more cell-sized circles centred inside such a
    region, each circle (clipped to the region) becomes a cell."""
    fg, bg, stain = foreground(rgb)
    cell_area = np.pi * (diameter / 2) ** 2
    fg = fill_small_holes(fg, 0.5 * cell_area)
    labels, n = _split(fg, diameter)
    circles = _circles(stain, diameter)
    # very dark, saturated stain: white-cell nuclei (parasites are small spots inside a red cell)
    # relative to this field's own red cells, not to the background: stains differ from lab to lab
    # (a dark magenta stain puts whole red cells below any fixed fraction of the background)
    dark = rgb[..., 1] < DARK * float(np.median(rgb[..., 1][fg])) if fg.any() else np.zeros_like(fg)
    ci = np.clip(circles[:, 1].astype(int), 0, labels.shape[0] - 1)
    cj = np.clip(circles[:, 0].astype(int), 0, labels.shape[1] - 1)
    circle_region = labels[ci, cj]
    out, white = [], []
    for lab_id, (ys, xs) in _regions(labels, n).items():
        area = len(ys)
        if area < MIN_AREA * cell_area:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        m = np.zeros((y1 - y0, x1 - x0), bool)
        m[ys - y0, xs - x0] = True
        if dark[ys, xs].mean() > 0.3:  # mostly nucleus-dark: a white cell, never classified as a red cell
            white.append((x0, y0, x1, y1, m, area, "white cell"))
            continue
        single = area <= SINGLE_AREA * cell_area and area >= SINGLE_SOLIDITY * _hull_area(m)
        inside = circles[circle_region == lab_id]
        if single or len(inside) < 2:
            if area <= MAX_AREA * cell_area:
                out.append((x0, y0, x1, y1, m, area, "red cell"))
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        for cx, cy, r in inside:
            cm = m & ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r)
            a = int(cm.sum())
            if a < CIRCLE_FILL * np.pi * r * r:  # mostly background or another region: not a cell
                continue
            cys, cxs = np.nonzero(cm)
            bx0, by0, bx1, by1 = cxs.min(), cys.min(), cxs.max() + 1, cys.max() + 1
            out.append((x0 + bx0, y0 + by0, x0 + bx1, y0 + by1, cm[by0:by1, bx0:bx1], a, "red cell"))
    return _suppress_duplicates(out) + white


def _suppress_duplicates(cells: list[tuple]) -> list[tuple]:
    """Two circles on one cell: of boxes overlapping by more than NMS_IOU, keep the larger cell."""
    cells = sorted(cells, key=lambda c: -c[5])
    if len(cells) < 2:
        return cells
    b = np.array([c[:4] for c in cells], np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    keep = np.ones(len(cells), bool)
    for i in range(len(cells)):  # larger first: a cell survives unless a kept larger one covers it
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= NMS_IOU
    return [c for c, k in zip(cells, keep) if k]


def _hull_area(m: np.ndarray) -> float:
    pts = cv2.findNonZero(m.astype(np.uint8))
    return float(cv2.contourArea(cv2.convexHull(pts))) + 0.5 * cv2.arcLength(cv2.convexHull(pts), True)


def _regions(labels: np.ndarray, n: int) -> dict:
    """label id -> (ys, xs) pixel coordinates, for labels 1..n-1 that are present."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=n + 1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    w = labels.shape[1]
    out = {}
    for i in range(1, n):
        if counts[i] == 0:
            continue
        idx = order[starts[i]:starts[i + 1]]
        out[i] = (idx // w, idx % w)
    return out


def segment_cells(rgb: np.ndarray, cell_diameter: float | None = None) -> tuple[list[Cell], float]:
    """Objects of a field -> (red cells and white cells (`Cell.kind`) in original pixels, the typical red-cell
    diameter in original pixels)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("segment_cells expects an (H, W, 3) uint8 RGB array")
    H, W = rgb.shape[:2]
    if cell_diameter is None:
        # estimate on a copy of at most ~0.6 MP: cells stay 20+ px across at usual magnifications
        s0 = min(1.0, (600_000 / (H * W)) ** 0.5)
        small = cv2.resize(rgb, (max(1, round(W * s0)), max(1, round(H * s0))), interpolation=cv2.INTER_AREA) \
            if s0 < 1 else rgb
        fg0, _, _ = foreground(small)
        if fg0.mean() < 0.01 or fg0.mean() > 0.95:
            raise SegmentationError("no stained cells found (the image is almost uniform)")
        cell_diameter = estimate_diameter(fg0) / s0
    if not 6 <= cell_diameter <= 2000:
        raise SegmentationError(f"implausible cell diameter {cell_diameter:.0f} px")
    s = WORK_DIAMETER / cell_diameter
    if H * W * s * s > MAX_WORK_PIXELS:
        raise SegmentationError(
            f"with red cells {cell_diameter:.0f} px across this {W}x{H} image would be segmented at "
            f"{H * W * s * s / 1e6:.0f} megapixels (limit {MAX_WORK_PIXELS / 1e6:.0f}): the cell diameter is too "
            f"small for this image; give the diameter of a red cell in this image's pixels, or leave it out")
    cells: list[Cell] = []
    tile = int(np.sqrt(TILE_PIXELS))            # tile side, original pixels
    margin = int(2 * cell_diameter)             # overlap so every cell is whole in some tile
    ys = [0] if H <= tile else list(range(0, H, tile))
    xs = [0] if W <= tile else list(range(0, W, tile))
    for ty in ys:
        for tx in xs:
            cy0, cy1, cx0, cx1 = ty, min(H, ty + tile), tx, min(W, tx + tile)       # core
            y0, y1, x0, x1 = max(0, cy0 - margin), min(H, cy1 + margin), max(0, cx0 - margin), min(W, cx1 + margin)
            part = rgb[y0:y1, x0:x1]
            ph, pw = part.shape[:2]
            work = cv2.resize(part, (max(1, round(pw * s)), max(1, round(ph * s))),
                              interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            for bx0, by0, bx1, by1, m, area, kind in _segment_scaled(work, WORK_DIAMETER):
                # back to original pixels: the mask's tight box, then the box with a margin
                tx0, ty0 = x0 + int(np.floor(bx0 / s)), y0 + int(np.floor(by0 / s))
                tx1, ty1 = min(x0 + int(np.ceil(bx1 / s)), x1), min(y0 + int(np.ceil(by1 / s)), y1)
                cx, cy = (tx0 + tx1) / 2, (ty0 + ty1) / 2
                if not (cx0 <= cx < cx1 and cy0 <= cy < cy1):
                    continue  # another tile's core holds this cell
                pad = int(round(BOX_PAD * cell_diameter))
                ox0, oy0, ox1, oy1 = max(0, tx0 - pad), max(0, ty0 - pad), min(W, tx1 + pad), min(H, ty1 + pad)
                mask = np.zeros((oy1 - oy0, ox1 - ox0), bool)
                mask[ty0 - oy0:ty1 - oy0, tx0 - ox0:tx1 - ox0] = cv2.resize(
                    m.astype(np.uint8), (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_NEAREST) > 0
                border = tx0 <= 1 or ty0 <= 1 or tx1 >= W - 1 or ty1 >= H - 1
                cells.append(Cell((int(ox0), int(oy0), int(ox1), int(oy1)), mask, int(area / s / s), bool(border),
                                  kind))
            if len(cells) > MAX_OBJECTS:
                raise SegmentationError(f"more than {MAX_OBJECTS:,} objects in one image: not a field of "
                                        f"red cells {cell_diameter:.0f} px across")
    cells.sort(key=lambda c: (c.box[1], c.box[0]))
    return cells, float(cell_diameter)
