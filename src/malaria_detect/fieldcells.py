"""Labelled single-cell images cut out of annotated whole fields (the IML_Malaria format).

    malaria-detect cut-cells --fields DIR/images --annotations DIR/annotations.json --out cells/ \
        --only PA1717 [--mode box mask] [--max-uninfected-per-field 30]

writes `cells/Parasitized/*.png`, `cells/Uninfected/*.png` and `cells/patients.csv` (file,field):
a folder that `train`, `evaluate --split all --patients cells/patients.csv` and `adapt` read.

Two ways of cutting a cell, because users meet both:
- `box`: the annotated box as it is, background included (how a person crops a cell by hand);
  infected cells are also cut with a 10 % wider and a 5 % tighter box (more crops of the rare class,
  and the margin a person leaves varies).
- `mask`: the cell as the whole-field pipeline sees it: segmented by `segment.py`, matched to an
  annotated box (IoU >= 0.5, or >= 0.3 for infected boxes), its pixels outside the mask black.

Annotations: a JSON list of {"image_name", "objects": [{"type", "bbox": {"x","y","w","h"}}]};
types `ring`, `trophozoite`, `schizont`, `gametocyte` are infected, `red blood cell` uninfected,
`difficult` is skipped. NumPy + Pillow + OpenCV; no torch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .data import NEGATIVE, POSITIVE, DataError
from .preprocess import ImageError, open_rgb
from .segment import SegmentationError, segment_cells
from .smear import FIELD_MAX_PIXELS, masked_crop

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


def _box_crop(img: Image.Image, box, scale: float = 1.0) -> Image.Image:
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * scale, (y1 - y0) / 2 * scale
    return img.crop((max(0, round(cx - hw)), max(0, round(cy - hh)),
                     min(img.width, round(cx + hw)), min(img.height, round(cy + hh))))


def cut_cells(fields_dir: str | Path, annotations: str | Path, out: str | Path, only: list[str] | None = None,
              modes=("box", "mask"), max_uninfected_per_field: int = 0, seed: int = 0, progress=None) -> dict:
    """Write labelled cell crops of the annotated fields whose name starts with one of `only`."""
    fields_dir, out = Path(fields_dir), Path(out)
    recs = read_annotations(annotations)
    if only:
        recs = [r for r in recs if any(r["image_name"].startswith(p) for p in only)]
    if not recs:
        raise DataError(f"no annotated field matches {only}")
    for d in (POSITIVE, NEGATIVE):  # the class folders that find_images reads
        (out / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, n = [], {POSITIVE: 0, NEGATIVE: 0, "fields": 0, "errors": []}
    for r in recs:
        stem = Path(r["image_name"]).stem
        try:
            img = open_rgb(fields_dir / r["image_name"], FIELD_MAX_PIXELS, max_side=None)
        except ImageError as e:
            n["errors"].append(f"{r['image_name']}: {e}")
            continue
        n["fields"] += 1
        keep = np.ones(len(r["boxes"]), bool)
        unin = np.nonzero(~np.asarray(r["infected"], bool))[0]
        if max_uninfected_per_field and len(unin) > max_uninfected_per_field:
            keep[rng.choice(unin, len(unin) - max_uninfected_per_field, replace=False)] = False
        crops = []  # (image, infected, tag)
        if "box" in modes:
            for j, (b, inf) in enumerate(zip(r["boxes"], r["infected"])):
                if keep[j]:
                    crops.append((_box_crop(img, b), inf, f"{j:03d}_box"))
                    if inf:
                        crops.append((_box_crop(img, b, 1.1), inf, f"{j:03d}_wide"))
                        crops.append((_box_crop(img, b, 0.95), inf, f"{j:03d}_tight"))
        if "mask" in modes:
            rgb = np.asarray(img)
            try:
                cells, diameter = segment_cells(rgb)
            except SegmentationError as e:
                n["errors"].append(f"{r['image_name']}: {e}")
                cells, diameter = [], 0.0
            for i, j in match_cells([c.box for c in cells], r["boxes"], r["infected"]).items():
                if keep[j]:
                    crop = masked_crop(rgb, cells[i], diameter)
                    if crop is not None:
                        crops.append((Image.fromarray(crop), r["infected"][j], f"{j:03d}_mask"))
        for im, inf, tag in crops:
            if im.width < 4 or im.height < 4:
                continue
            cls = POSITIVE if inf else NEGATIVE
            name = f"{stem}_{tag}.png"
            im.save(out / cls / name, compress_level=1)
            rows.append((f"{cls}/{name}", stem))
            n[cls] += 1
        if progress is not None:
            progress.update(1)
    with open(out / "patients.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient"])
        w.writerows(rows)
    return n


def _greedy(pred, gt, thr: float) -> tuple[set, set]:
    """One-to-one greedy matching at IoU >= thr -> (matched pred indices, matched gt indices)."""
    m = _greedy_pairs(pred, gt, thr)
    return set(m), set(m.values())


def score_fields(report: dict, recs: list[dict], positive: str | None = None) -> dict:
    """Score a smear report against annotated fields (read_annotations), with the matching rules of
    the whole-field benchmark: cells one-to-one at IoU >= 0.5 (precision over predicted boxes that do
    not touch the image border: the labels miss border cells); infected cells: predicted Parasitized
    boxes vs infected boxes at IoU >= 0.3; parasitemia: per field, infected / boxed cells vs the
    report's fraction, mean absolute error in percentage points. A cell is called infected when its
    label is `positive`: by default the report's model's positive class (the smear report names its
    model's class names), else the class folder name `Parasitized`."""
    positive = positive or report.get("model", {}).get("class_names", [NEGATIVE, POSITIVE])[1]
    by_name = {Path(f["image"]).name: f for f in report["fields"]}
    tp = n_gt = n_in = tp_in = 0
    itp_g = itp_p = n_gt_inf = n_pred_inf = 0
    errs, missing = [], 0
    for r in recs:
        f = by_name.get(r["image_name"])
        if f is None:
            missing += 1
            continue
        W, H = f.get("width") or 0, f.get("height") or 0
        gt = r["boxes"]
        gt_inf = [b for b, i in zip(gt, r["infected"]) if i]
        pred = [tuple(map(float, c["box"])) for c in f["cells"]]
        pred_inf = [tuple(map(float, c["box"])) for c in f["cells"] if c.get("label") == positive]
        mp, mg = _greedy(pred, gt, 0.5)
        inner = [i for i, p in enumerate(pred) if p[0] > 2 and p[1] > 2 and p[2] < W - 2 and p[3] < H - 2]
        tp += len(mg)
        n_gt += len(gt)
        n_in += len(inner)
        tp_in += sum(i in mp for i in inner)
        ip, ig = _greedy(pred_inf, gt_inf, 0.3)
        itp_g += len(ig)
        itp_p += len(ip)
        n_gt_inf += len(gt_inf)
        n_pred_inf += len(pred_inf)
        truth = 100.0 * len(gt_inf) / max(1, len(gt))
        est = f.get("parasitemia")
        est = 100.0 * (est if est is not None else len(pred_inf) / max(1, len(pred)))
        errs.append(abs(est - truth))
    R, P = tp / max(1, n_gt), tp_in / max(1, n_in)
    return {"fields": len(errs), "missing": missing, "det_recall": R, "det_precision": P,
            "det_f1": 2 * P * R / max(1e-9, P + R), "inf_recall": itp_g / max(1, n_gt_inf),
            "inf_precision": itp_p / max(1, n_pred_inf), "n_infected_true": n_gt_inf,
            "n_infected_called": n_pred_inf, "parasitemia_mae_pp": sum(errs) / max(1, len(errs))}
