"""Whole thin-smear fields: find every red cell, classify it, count, report parasitemia.

    from malaria_detect.predict import Predictor
    from malaria_detect.smear import analyze_fields
    report = analyze_fields(Predictor.load(), ["field1.jpg", "slide_A/"])   # the smear --json dict

Each field takes the one path of a cell, for each of its cells:

    field ─► segment (segment.py: boxes + masks) ─► crop each cell's box, pixels outside its mask
          set to black (like the NIH training crops) ─► the Predictor, in batches (same record,
          temperature, threshold, not-a-cell score) ─► counts, parasitemia + 95 % Wilson interval

Cells flagged "not a cell" and cells whose score is not finite are counted apart and left out of
the parasitemia. A folder of fields is one sample: its counts are pooled in `summary`.
NumPy + Pillow + OpenCV + ONNX Runtime; no torch.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .predict import Predictor, iter_image_paths, tally
from .preprocess import ImageError, csv_safe, open_rgb
from .segment import SegmentationError, segment_cells

FIELD_MAX_PIXELS = 100_000_000   # a whole field may be large; it is tiled by segment.py
MASK_GROW = 0.03                 # grow each cell's mask by this fraction of a diameter (keep the rim)
MIN_FIELD_SIDE = 256             # a field photo is larger; smaller images are single cells or thumbnails
ALL_OOD_NOTE = ("all {n} cells found were flagged 'not a cell', so there is no parasitemia: the stain or "
                "microscope may differ from the training data; calibrate the model on a few dozen of your "
                "labelled cells with 'malaria-detect adapt' and use it with --model")
WHO_MIN_CELLS = 500              # WHO: count at least 500-2,000 red cells on a thin film
CSV_FIELDS = ["image", "cell", "x0", "y0", "x1", "y1", "label", "p_parasitized", "ood", "border"]


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95 % Wilson score interval of a binomial proportion k / n (None when n = 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


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
            # the same resize as every other cell image (preprocess.resize_uint8: Pillow bilinear)
            out[i] = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
    return out


@dataclass
class SmearOptions:
    cell_diameter: float | None = None   # pixels; None = estimate from each field
    batch_size: int = 128
    rbc_per_ul: float | None = None      # red cells per microlitre, for parasites/uL


def field_threshold(record) -> float:
    """The threshold for cells of whole fields: `extra.field_threshold` when the model has one (chosen
    on validation fields, where only 1-2 % of cells are infected: see scripts/field_threshold.py),
    else the cell threshold."""
    return float(record.extra.get("field_threshold", record.threshold))


def counts(cells: list[dict], positive: str) -> dict:
    """Counts and parasitemia of one field's cells (`positive`: the model's positive class name), by
    the one counting rule (`predict.tally`): not-a-cell and unclassified cells are left out."""
    t = tally(((c["label"], c["ood"]) for c in cells), positive)
    return _with_ci({"n_cells": t["n"], "n_classified": t["n_classified"], "n_parasitized": t["n_positive"],
                     "n_not_a_cell": t["n_not_a_cell"], "n_unclassified": t["n_unlabelled"]})


def _with_ci(c: dict) -> dict:
    k, n = c["n_parasitized"], c["n_classified"]
    return c | {"parasitemia": k / n if n else None, "parasitemia_ci95": wilson(k, n)}


def pooled(fields: list[dict]) -> dict:
    """The counts of several fields added up (one sample), with their parasitemia and interval."""
    keys = ("n_cells", "n_classified", "n_parasitized", "n_not_a_cell", "n_unclassified")
    return _with_ci({k: sum(f[k] for f in fields) for k in keys})


def analyze_field(pred: Predictor, src, name: str | None = None, opts: SmearOptions | None = None) -> dict:
    """One field -> its JSON record (see the smear command). Never raises for a bad image: the
    record then has `error` and zero counts."""
    opts = opts or SmearOptions()
    name = name if name is not None else str(src)
    rec = {"image": name, "width": None, "height": None, "cells": []}
    t0 = time.perf_counter()
    try:
        img = open_rgb(src, FIELD_MAX_PIXELS, max_side=None)
    except ImageError as e:
        return failed_field(name, str(e), opts)
    rgb = np.asarray(img)
    rec["width"], rec["height"] = img.width, img.height
    if min(img.size) < MIN_FIELD_SIDE:
        return _finish(rec | {"note": f"the image is only {img.width}x{img.height} pixels: too small to be a field "
                                      f"of cells (a single-cell image? use 'predict' for single cells)"},
                       opts, pred.record.positive)
    try:
        cells, diameter = segment_cells(rgb, opts.cell_diameter)
    except SegmentationError as e:
        return _finish(rec | {"note": f"no cells found: {e}"}, opts, pred.record.positive)
    rec["cell_diameter_px"] = round(diameter, 1)
    if cells:
        x = cell_crops(rgb, cells, diameter, pred.record.input_size)
        z, _, s = pred.run(x, opts.batch_size)
        p, labels, ood = pred.record.decide(z, s, threshold=field_threshold(pred.record))
        for c, pi, li, oi, si in zip(cells, p, labels, ood, s):
            finite = bool(np.isfinite(pi) and np.isfinite(si))
            rec["cells"].append({"box": list(c.box), "label": str(li) if finite else None,
                                 "p_parasitized": round(float(pi), 6) if finite else None,
                                 "ood": bool(oi) if finite else False, "border": c.border})
    else:
        rec["note"] = "no red cells found in this image"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(rec, opts, pred.record.positive)


def failed_field(name: str, error: str, opts: SmearOptions | None = None) -> dict:
    """The record of a field that could not be read: its error, zero counts, no parasitemia."""
    return _finish({"image": name, "width": None, "height": None, "cells": [], "error": error},
                   opts or SmearOptions(), positive="")  # no cells, so no class name is needed


def _finish(rec: dict, opts: SmearOptions, positive: str) -> dict:
    rec.update(counts(rec["cells"], positive))
    if rec["n_cells"] == 0 and "note" not in rec and "error" not in rec:
        rec["note"] = "no red cells found in this image"
    elif rec["parasitemia"] is None and rec["n_not_a_cell"] and "error" not in rec:
        rec["note"] = ALL_OOD_NOTE.format(n=rec["n_not_a_cell"])
    if opts.rbc_per_ul and rec["parasitemia"] is not None:
        rec["parasites_per_ul"] = round(rec["parasitemia"] * opts.rbc_per_ul)
    return rec


def summarize(fields: list[dict], opts: SmearOptions | None = None) -> dict:
    """Counts pooled over all fields (one sample), with the WHO note when too few cells were counted."""
    opts = opts or SmearOptions()
    s = pooled(fields)
    s["n_fields"] = len(fields)
    s["n_errors"] = sum("error" in f for f in fields)
    if opts.rbc_per_ul and s["parasitemia"] is not None:
        s["parasites_per_ul"] = round(s["parasitemia"] * opts.rbc_per_ul)
    if s["n_classified"] < WHO_MIN_CELLS:
        s["note"] = (f"only {s['n_classified']} red cells classified: WHO guidance is to count at least "
                     f"{WHO_MIN_CELLS}-2,000 on a thin film; photograph more fields for a reliable estimate")
    if s["parasitemia"] is None:
        s["note"] = ALL_OOD_NOTE.format(n=s["n_not_a_cell"]) if s["n_not_a_cell"] else \
            "no red cell could be classified, so there is no parasitemia"
    return s


def analyze_fields(pred: Predictor, paths: Iterable, opts: SmearOptions | None = None, progress=None,
                   on_field=None) -> dict:
    """Files and folders (recursively) -> {"fields": [...], "summary": {...}} (the smear --json format).
    `on_field(index, path, record)` is called after each field (e.g. to draw its overlay)."""
    opts = opts or SmearOptions()
    fields = []
    for i, path in enumerate(iter_image_paths(paths)):
        rec = analyze_field(pred, path, str(path), opts)
        if on_field:
            on_field(i, path, rec)
        fields.append(rec)
        if progress is not None:
            progress.update(1)
    return {"fields": fields, "summary": summarize(fields, opts),
            "model": {"file": pred.path.name, "threshold": field_threshold(pred.record),
                      "class_names": list(pred.record.class_names)}}


def write_csv(report: dict, path) -> None:
    """One row per cell (strings only in CSV)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for fld in report["fields"]:
            for i, c in enumerate(fld["cells"]):
                w.writerow({"image": csv_safe(fld["image"]), "cell": i, "x0": c["box"][0], "y0": c["box"][1],
                            "x1": c["box"][2], "y1": c["box"][3], "label": c["label"] or "",
                            "p_parasitized": "" if c["p_parasitized"] is None else f"{c['p_parasitized']:.6f}",
                            "ood": str(c["ood"]).lower(), "border": str(c["border"]).lower()})


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_overlay(src, rec: dict, positive: str) -> Image.Image:
    """The field with every cell drawn (uninfected thin green, parasitized (`positive`, the model's
    positive class name) bold red with its probability, not-a-cell grey) and the counts in a header band."""
    img = src if isinstance(src, Image.Image) else open_rgb(src, FIELD_MAX_PIXELS, max_side=None)
    scale = max(1.0, img.width / 1280)
    head = int(40 * scale)
    out = Image.new("RGB", (img.width, img.height + head), (255, 255, 255))
    out.paste(img, (0, head))
    d = ImageDraw.Draw(out)
    big = _font(int(20 * scale))
    for c in rec["cells"]:
        x0, y0, x1, y1 = c["box"]
        box = (x0, y0 + head, x1 - 1, y1 - 1 + head)
        if c["ood"] or c["label"] is None:
            d.rectangle(box, outline=(150, 150, 150), width=max(1, int(scale)))
        elif c["label"] == positive:
            d.rectangle(box, outline=(220, 0, 0), width=max(3, int(4 * scale)))
            d.text((x0 + 2, y0 + head - int(18 * scale)), f"{c['p_parasitized']:.2f}", fill=(220, 0, 0), font=big,
                   stroke_width=2, stroke_fill=(255, 255, 255))
        else:
            d.rectangle(box, outline=(0, 150, 60), width=max(1, int(scale)))
    pm = rec.get("parasitemia")
    ci = rec.get("parasitemia_ci95")
    text = (f"{Path(rec['image']).name}: {rec['n_cells']} cells, {rec['n_parasitized']} parasitized, "
            f"{rec['n_not_a_cell']} not a cell — parasitemia "
            + (f"{pm:.2%} (95% CI {ci[0]:.2%}–{ci[1]:.2%})" if pm is not None else "n/a"))
    d.text((int(8 * scale), int(10 * scale)), text, fill=(0, 0, 0), font=big)
    return out
