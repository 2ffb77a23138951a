"""Annotated whole fields (the IML_Malaria format) and how predicted boxes are matched to them."""

from __future__ import annotations

import json
from pathlib import Path

from .folders import DataError

INFECTED_TYPES = {"ring", "trophozoite", "schizont", "gametocyte"}

UNINFECTED_TYPES = {"red blood cell"}


def read_annotations(path: str | Path) -> list[dict]:
    """-> [{"image_name", "boxes": [(x0, y0, x1, y1)], "infected": [bool]}], 'difficult' left out."""
    try:
        recs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the annotations ({e})") from None
    out = []
    for r in recs:
        boxes, inf = [], []
        for o in r.get("objects", []):
            t = o.get("type")
            if t not in INFECTED_TYPES | UNINFECTED_TYPES:
                continue
            b = {k: float(v) for k, v in o["bbox"].items()}
            boxes.append((b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]))
            inf.append(t in INFECTED_TYPES)
        out.append({"image_name": r["image_name"], "boxes": boxes, "infected": inf})
    return out


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_cells(pred_boxes, gt_boxes, gt_infected) -> dict[int, int]:
    """Greedy one-to-one matching, best IoU first -> {pred index: gt index}. A pair counts at IoU >= 0.5,
    or >= 0.3 when the annotated cell is infected (infected boxes are often drawn loosely)."""
    return _greedy_pairs(pred_boxes, gt_boxes, [0.3 if inf else 0.5 for inf in gt_infected])


def _greedy_pairs(pred, gt, thr) -> dict[int, int]:
    """One-to-one greedy matching, best IoU first, of pairs at IoU >= thr (one number, or one per
    annotated box) -> {pred index: gt index}. Boxes 200+ px apart are never compared."""
    thr = [thr] * len(gt) if isinstance(thr, (int, float)) else thr
    pairs = sorted(((v, i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)
                    if abs(p[0] - g[0]) < 200 and abs(p[1] - g[1]) < 200 and (v := _iou(p, g)) >= thr[j]),
                   reverse=True)
    out, used = {}, set()
    for _, i, j in pairs:
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


def _greedy(pred, gt, thr: float) -> tuple[set, set]:
    """One-to-one greedy matching at IoU >= thr -> (matched pred indices, matched gt indices)."""
    m = _greedy_pairs(pred, gt, thr)
    return set(m), set(m.values())
