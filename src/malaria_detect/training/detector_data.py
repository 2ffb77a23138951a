"""The detector's training data: annotated fields kept in memory at a bounded scale, random crops at
a random cell scale with flips and rotations, their heatmap and box targets, and the colour jitter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..data.objects import KINDS, LabelledField
from ..fields.detect import STRIDE
from ..imaging import FIELD_MAX_PIXELS, open_rgb
from .augment import lab_stain
from .config import DetConfig
from .models import LITE_MEAN, LITE_STD

STORE_CELL = 80      # fields are kept in memory scaled so that their median red cell is at most this


@dataclass
class Stored:
    rgb: np.ndarray
    boxes: np.ndarray        # (n, 4) at the stored scale
    kinds: np.ndarray        # (n,) index into KINDS
    ignore: np.ndarray       # (m, 4)
    cell: float              # median red-cell size at the stored scale
    labelled: tuple
    border_boxed: bool



def _store(f: LabelledField) -> Stored | None:
    red = [b for b, k in zip(f.boxes, f.kinds) if k == "red cell"]
    if not red:
        return None
    cell = float(np.median([math.sqrt((b[2] - b[0]) * (b[3] - b[1])) for b in red]))
    rgb = np.asarray(open_rgb(f.path, FIELD_MAX_PIXELS, max_side=None))
    s = min(1.0, STORE_CELL / cell)
    if s < 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * s), round(rgb.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return Stored(rgb, np.asarray(f.boxes, np.float32).reshape(-1, 4) * s,
                  np.asarray([KINDS.index(k) for k in f.kinds], np.int64),
                  np.asarray(f.ignore, np.float32).reshape(-1, 4) * s, cell * s, f.labelled, f.border_boxed)



def targets(boxes: np.ndarray, kinds: np.ndarray, ignore: np.ndarray, size: tuple[int, int],
            labelled: tuple, border: float = 0.0):
    """Heatmaps (K, h, w), their weights, box targets (4, h, w) and where they count (h, w), at STRIDE.
    `border`: a band (pixels) along the image's own edges where unboxed cells may be (weight 0)."""
    H, W = size
    h, w = H // STRIDE, W // STRIDE
    heat = np.zeros((len(KINDS), h, w), np.float32)
    weight = np.ones_like(heat)
    for k, kind in enumerate(KINDS):
        if kind not in labelled:
            weight[k] = 0
    box_t = np.zeros((4, h, w), np.float32)
    box_m = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    for (x0, y0, x1, y1), k in zip(boxes, kinds):
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        if not (0 <= cx < w and 0 <= cy < h):
            continue
        bw, bh = max(x1 - x0, 2.0), max(y1 - y0, 2.0)
        sigma = max(0.6, 0.12 * min(bw, bh) / STRIDE)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma))
        ix, iy = int(cx), int(cy)
        g[iy, ix] = 1.0
        heat[k] = np.maximum(heat[k], g)
        box_t[:, iy, ix] = (math.log(bw / STRIDE), math.log(bh / STRIDE), cx - ix, cy - iy)
        box_m[iy, ix] = 1.0
    for x0, y0, x1, y1 in ignore:  # clamped: a box above or left of the crop must not count from the end
        a, b = max(0, int(x0 / STRIDE)), max(0, int(y0 / STRIDE))
        c, d = max(0, int(math.ceil(x1 / STRIDE))), max(0, int(math.ceil(y1 / STRIDE)))
        weight[:, b:d, a:c] = 0
    if border > 0:
        n = int(math.ceil(border / STRIDE))
        for sl in (np.s_[:, :n, :], np.s_[:, -n:, :], np.s_[:, :, :n], np.s_[:, :, -n:]):
            weight[sl] = np.where(heat[sl] >= 1.0, weight[sl], 0)  # keep boxed cells' own peaks
    return heat, weight, box_t, box_m



def sample(st: Stored, cfg: DetConfig, rng: np.random.Generator):
    """One training crop of a stored field at a random cell scale, flipped and rotated, with targets."""
    s = rng.uniform(cfg.cell_min, cfg.cell_max) / st.cell
    s = min(s, 1.0)   # never enlarge past the stored scale: cells from cell_min up to min(cell_max, stored)
    rgb = cv2.resize(st.rgb, (max(1, round(st.rgb.shape[1] * s)), max(1, round(st.rgb.shape[0] * s))),
                     interpolation=cv2.INTER_AREA)
    H, W = rgb.shape[:2]
    c = cfg.crop
    x0 = int(rng.integers(0, max(1, W - c + 1)))
    y0 = int(rng.integers(0, max(1, H - c + 1)))
    crop = np.empty((c, c, 3), np.uint8)
    crop[:] = np.median(rgb[::8, ::8].reshape(-1, 3), axis=0).astype(np.uint8)  # the field's background
    part = rgb[y0:y0 + c, x0:x0 + c]
    crop[:part.shape[0], :part.shape[1]] = part
    boxes = st.boxes * s - np.array([x0, y0, x0, y0], np.float32)
    ignore = st.ignore * s - np.array([x0, y0, x0, y0], np.float32)
    border = 0.0
    if not st.border_boxed:  # the image's own edges inside the crop: unboxed cut cells there
        edge = np.zeros((c, c), bool)
        band = int(0.6 * st.cell * s)
        if x0 < band:
            edge[:, :band - x0] = True
        if y0 < band:
            edge[:band - y0, :] = True
        if x0 + c > W - band:
            edge[:, max(0, W - band - x0):] = True
        if y0 + c > H - band:
            edge[max(0, H - band - y0):, :] = True
        if edge.any():
            ignore = np.concatenate([ignore, _edge_boxes(edge)])
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    crop, boxes, ignore = _rotate(crop, boxes, ignore, k, flip)
    heat, weight, box_t, box_m = targets(boxes, st.kinds, ignore, (c, c), st.labelled, border)
    return crop, heat, weight, box_t, box_m



def _edge_boxes(edge: np.ndarray) -> np.ndarray:
    """The edge band of a crop as boxes (rows and columns that are fully edge)."""
    out = []
    rows, cols = edge.all(1), edge.all(0)
    for mask, horizontal in ((rows, True), (cols, False)):
        idx = np.nonzero(mask)[0]
        if len(idx):
            for run in np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1):
                a, b = int(run[0]), int(run[-1]) + 1
                out.append([0, a, edge.shape[1], b] if horizontal else [a, 0, b, edge.shape[0]])
    return np.asarray(out, np.float32).reshape(-1, 4)



def _rotate(img, boxes, ignore, k: int, flip: bool):
    c = img.shape[0]

    def tf(b):
        b = b.copy()
        if flip:
            b[:, [0, 2]] = c - b[:, [2, 0]]
        for _ in range(k):  # rot90 counter-clockwise: (x, y) -> (y, c - x)
            b = np.stack([b[:, 1], c - b[:, 2], b[:, 3], c - b[:, 0]], 1)
        return b

    if flip:
        img = img[:, ::-1]
    img = np.ascontiguousarray(np.rot90(img, k))
    return img, tf(boxes), tf(ignore)



def to_tensor(batch_uint8: np.ndarray, g: torch.Generator | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W); with `g`, colour and stain jitter for training."""
    x = torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div_(255)
    if g is not None:
        n = x.shape[0]
        pick = torch.rand(n, generator=g) < 0.5
        if pick.any():
            x[pick] = lab_stain(x[pick].contiguous(), g)
        x = (x * torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=g)).clamp_(0, 1)
    mean, std = torch.tensor(LITE_MEAN)[None, :, None, None], torch.tensor(LITE_STD)[None, :, None, None]
    return ((x - mean) / std).contiguous()
