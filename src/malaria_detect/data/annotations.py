"""Annotated whole fields (the IML_Malaria / TXL-PBC format: [{"image_name", "objects": [{"type",
"bbox": {"x", "y", "w", "h"}}]}]) and how predicted boxes are matched to them: one greedy rule, best IoU
first, as ../shared/tools/score_smear.py matches them."""

from __future__ import annotations

import json
from pathlib import Path

from .folders import DataError

INFECTED_TYPES = {"ring", "trophozoite", "schizont", "gametocyte"}
UNINFECTED_TYPES = {"red blood cell"}
WINDOW = 400   # boxes whose top-left corners are this far apart (pixels) are never compared


def load_annotations(path: str | Path) -> list[dict]:
    """The annotated fields of a JSON file: the IML / TXL-PBC format as it is (validated to be a list of
    records), or COCO detection JSON converted to it (data/coco.py)."""
    try:
        recs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the annotations ({e})") from None
    from .coco import from_coco, is_coco

    if is_coco(recs):
        try:
            return from_coco(recs)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: not valid COCO detection JSON ({type(e).__name__}: {e})") from None
    if not isinstance(recs, list) or not all(isinstance(r, dict) and "image_name" in r for r in recs):
        raise DataError(f"{path}: not a list of {{image_name, objects: [{{type, bbox}}]}} records")
    return recs


def box_of(obj: dict) -> tuple[float, float, float, float]:
    """An annotated object's box as (x0, y0, x1, y1)."""
    b = {k: float(v) for k, v in obj["bbox"].items()}
    return b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]


def read_annotations(path: str | Path) -> list[dict]:
    """Red cells only -> [{"image_name", "boxes": [(x0, y0, x1, y1)], "infected": [bool]}]."""
    out = []
    for r in load_annotations(path):
        objs = [o for o in r.get("objects", []) if o.get("type") in INFECTED_TYPES | UNINFECTED_TYPES]
        out.append({"image_name": r["image_name"], "boxes": [box_of(o) for o in objs],
                    "infected": [o["type"] in INFECTED_TYPES for o in objs]})
    return out


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_pairs(pred, gt, thr) -> dict[int, int]:
    """Greedy one-to-one matching, best IoU first, of pairs at IoU >= thr (one number, or one per
    annotated box) -> {pred index: gt index}."""
    thr = [thr] * len(gt) if isinstance(thr, (int, float)) else thr
    pairs = sorted(((v, i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)
                    if abs(p[0] - g[0]) < WINDOW and abs(p[1] - g[1]) < WINDOW and (v := iou(p, g)) >= thr[j]),
                   reverse=True)
    out, used = {}, set()
    for _, i, j in pairs:
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


def match(pred, gt, thr: float) -> tuple[set, set]:
    """The same matching -> (matched pred indices, matched gt indices)."""
    m = match_pairs(pred, gt, thr)
    return set(m), set(m.values())


def match_cells(pred_boxes, gt_boxes, gt_infected) -> dict[int, int]:
    """-> {pred index: gt index}: a pair counts at IoU >= 0.5, or >= 0.3 when the annotated cell is
    infected (infected boxes are often drawn loosely)."""
    return match_pairs(pred_boxes, gt_boxes, [0.3 if inf else 0.5 for inf in gt_infected])
