"""The learned object detector on a field: red cells, white cells and platelets, at any magnification.
ONNX Runtime + NumPy + OpenCV; no torch (training: training/detector.py).

    det = Detector.load("detector.onnx")
    boxes, kinds, scores, cell = det.detect(rgb)      # boxes (x0, y0, x1, y1) in the field's pixels

Two passes: the field is first seen with its long side at FRAME pixels; the median red cell found
there gives the field's scale, and if that is far from TARGET_CELL pixels the field is seen again at
the scale that makes its cells TARGET_CELL across (at most MAX_FRAME_PIXELS). Objects are the local
maxima of each kind's heatmap above its threshold, with the box size and offset read at that cell;
of two boxes of any kinds overlapping by more than NMS_IOU the more confident is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from ..data.objects import KINDS
from ..errors import MissingFileError, ModelError

DETECTOR_KEY = "malaria_detect_detector"
FRAME = 512                  # pass 1: the long side, pixels
TARGET_CELL = 48.0           # pass 2: the red-cell size the detector sees best (it trained on 28-80 px)
MAX_FRAME_PIXELS = 4_000_000
THRESHOLDS = {"red cell": 0.3, "white cell": 0.3, "platelet": 0.3}
NMS_IOU = 0.5
STRIDE = 8
MEAN = STD = (0.5, 0.5, 0.5)


def frame_scale(shape, scale: float) -> tuple[int, int]:
    """(width, height) of the field at `scale`, multiples of 16 (the backbone's stride)."""
    h, w = shape[:2]
    return max(16, int(round(w * scale / 16)) * 16), max(16, int(round(h * scale / 16)) * 16)


def decode(heat: np.ndarray, box: np.ndarray, thresholds=THRESHOLDS):
    """(K, h, w) heatmaps and (4, h, w) boxes -> (boxes in frame pixels (n, 4), kind indices, scores)."""
    out_b, out_k, out_s = [], [], []
    for k, kind in enumerate(KINDS):
        hk = heat[k].astype(np.float32)
        peaks = (hk == cv2.dilate(hk, np.ones((3, 3), np.uint8))) & (hk > thresholds[kind])
        ys, xs = np.nonzero(peaks)
        if not len(ys):
            continue
        bw, bh = np.exp(box[0, ys, xs]) * STRIDE, np.exp(box[1, ys, xs]) * STRIDE
        cx, cy = (xs + box[2, ys, xs]) * STRIDE, (ys + box[3, ys, xs]) * STRIDE
        out_b.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1))
        out_k.append(np.full(len(ys), k))
        out_s.append(hk[ys, xs])
    if not out_b:
        return np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, np.float32)
    b, k, s = np.concatenate(out_b), np.concatenate(out_k), np.concatenate(out_s)
    keep = _nms(b, s)
    return b[keep], k[keep], s[keep]


def _nms(b: np.ndarray, s: np.ndarray) -> np.ndarray:
    order = np.argsort(-s)
    b = b[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = np.ones(len(b), bool)
    for i in range(len(b)):
        if not keep[i]:
            continue
        iw = np.clip(np.minimum(b[i, 2], b[i + 1:, 2]) - np.maximum(b[i, 0], b[i + 1:, 0]), 0, None)
        ih = np.clip(np.minimum(b[i, 3], b[i + 1:, 3]) - np.maximum(b[i, 1], b[i + 1:, 1]), 0, None)
        inter = iw * ih
        keep[i + 1:] &= inter / np.maximum(area[i] + area[i + 1:] - inter, 1e-9) <= NMS_IOU
    return np.sort(order[keep])


def _pass(run, rgb: np.ndarray, scale: float):
    size = frame_scale(rgb.shape, scale)
    img = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    heat, box = run(img)
    b, k, s = decode(heat, box)
    sx, sy = rgb.shape[1] / size[0], rgb.shape[0] / size[1]
    return b * np.array([sx, sy, sx, sy], np.float32), k, s


def _median_cell(b: np.ndarray, k: np.ndarray) -> float | None:
    red = b[k == 0]
    return float(np.median(np.sqrt((red[:, 2] - red[:, 0]) * (red[:, 3] - red[:, 1])))) if len(red) else None


def detect_two_pass(run, rgb: np.ndarray):
    """-> (boxes (n, 4) in the field's pixels, kind names, scores, median red-cell size in pixels or None)."""
    H, W = rgb.shape[:2]
    s1 = FRAME / max(H, W)
    b, k, s = _pass(run, rgb, s1)
    cell = _median_cell(b, k)
    if cell:
        s2 = min(TARGET_CELL / cell, (MAX_FRAME_PIXELS / (H * W)) ** 0.5)
        if abs(s2 / s1 - 1) > 0.2:
            b, k, s = _pass(run, rgb, s2)
            cell = _median_cell(b, k)
    b = np.clip(b, 0, [W, H, W, H])
    return b, [KINDS[i] for i in k], s, cell


class Detector:
    """A detector exported by `malaria-detect export-detector`, on ONNX Runtime."""

    def __init__(self, session, record: dict, path: Path):
        self.session, self.record, self.path = session, record, path

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> Detector:
        import onnxruntime as ort

        from ..modelfile import check_weights, detector_path

        path = detector_path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: detector file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"{path}: not a valid ONNX model ({str(e).splitlines()[0] if str(e) else e!r})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if DETECTOR_KEY not in meta:
            raise ModelError(f"{path}: not a malaria-detect detector (no detector record in its metadata)")
        check_weights(path, meta)
        return cls(session, json.loads(meta[DETECTOR_KEY]), path)

    def run(self, img: np.ndarray):
        # (x / 255 - mean) / std, written channel-first into one buffer (as training computed it; fast)
        x = np.empty((1, 3, *img.shape[:2]), np.float32)
        np.divide(img.transpose(2, 0, 1)[None], np.float32(255), out=x, dtype=np.float32)
        x -= np.float32(MEAN[0])
        x /= np.float32(STD[0])
        heat, box = self.session.run(None, {"image": x})
        return heat[0], box[0]

    def detect(self, rgb: np.ndarray):
        return detect_two_pass(self.run, rgb)
