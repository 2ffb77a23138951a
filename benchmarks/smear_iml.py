"""Whole-field benchmark on IML_Malaria fields (another lab than NIH): this project's pipeline vs the
classical baseline, side by side in one run, on a block of fields.

    .venv/bin/python benchmarks/smear_iml.py [--block PA1718] [--model M] [--baseline-model M] [--limit N]

Blocks (split by consecutive image numbers, never at random): PA171690-PA171769 trained the robust
classifier, PA171770-PA171799 chose its operating point and tuned the segmentation, **PA1718xx is
held out** and is the block to report on.

Pipeline: `fields.analysis.analyze_field` (fields/segment.py + the Predictor). Baseline (as first tried by a new
user): green channel -> Otsu -> distance transform -> watershed, each region masked on black and
classified by the given (default: bundled) model. Scores: `evaluation.fieldscore.score_fields` (the same rules
as ../shared/tools/score_smear.py). Fields/s is end to end, JPEG file -> JSON record, one process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from malaria_detect.cells.predictor import Predictor
from malaria_detect.counting import field_counts
from malaria_detect.evaluation.fieldscore import load_annotations, score_fields
from malaria_detect.fields.analysis import analyze_field
from malaria_detect.fields.crops import cell_crops
from malaria_detect.fields.segment import Cell
from malaria_detect.imaging import FIELD_MAX_PIXELS, open_rgb

ROOT = Path(__file__).resolve().parents[1]

IML = ROOT.parent / "shared" / "data" / "iml-fields"


def baseline_field(pred: Predictor, path: Path) -> dict:
    """Green channel -> Otsu -> distance transform -> watershed (scikit-image), regions masked on black."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    rgb = np.asarray(open_rgb(path, FIELD_MAX_PIXELS, max_side=None))
    g = rgb[..., 1]
    fg = ndi.binary_fill_holes(g < threshold_otsu(g))
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=20, labels=fg)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    cells = []
    for r in regionprops(labels):
        if r.area < 300:
            continue
        y0, x0, y1, x1 = r.bbox
        cells.append(Cell((x0, y0, x1, y1), r.image, int(r.area), False))
    rec = {"image": str(path), "width": rgb.shape[1], "height": rgb.shape[0], "cells": []}
    if cells:
        z, _, s = pred.run(cell_crops(rgb, cells, 0.0, pred.record.input_size))
        p, labels_, ood = pred.decide(z, s)
        rec["cells"] = [{"box": list(c.box), "label": str(li), "p_parasitized": float(pi), "ood": bool(oi)}
                        for c, pi, li, oi in zip(cells, p, labels_, ood)]
    rec.update(field_counts(rec["cells"], pred.record.positive))
    return rec


def run(name: str, fn, paths) -> tuple[dict, float]:
    t = time.perf_counter()
    fields = [fn(p) for p in paths]
    return {"fields": fields}, len(paths) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", default="PA1718", help="field-name prefix of the block to score (default PA1718)")
    ap.add_argument("--model", default=None, help="model for the pipeline (default: bundled)")
    ap.add_argument("--baseline-model", default=None, help="model for the baseline (default: bundled)")
    ap.add_argument("--start", type=int, default=0, help="skip the first N fields of the block (e.g. 30: the "
                                                          "fields PA171800-829 that adapt may use)")
    ap.add_argument("--limit", type=int, default=0, help="score only N fields of the block")
    ap.add_argument("--json", default=None, help="also write the pipeline's smear JSON here")
    a = ap.parse_args()
    recs = [r for r in load_annotations(IML / "annotations.json") if r["image_name"].startswith(a.block)]
    recs = recs[a.start:a.start + a.limit] if a.limit else recs[a.start:]
    paths = [IML / "images" / r["image_name"] for r in recs]
    pred, base = Predictor.load(a.model), Predictor.load(a.baseline_model)
    rows = []
    rep_b, fps_b = run("baseline", lambda p: baseline_field(base, p), paths)
    rows.append((f"baseline: Otsu + watershed, {Path(base.path).name}", score_fields(rep_b, recs), fps_b))
    rep, fps = run("pipeline", lambda p: analyze_field(pred, p, str(p)), paths)
    rows.append((f"malaria-detect smear, {Path(pred.path).name}", score_fields(rep, recs), fps))
    if a.json:
        Path(a.json).write_text(json.dumps(rep))
    n_inf = rows[0][1]["n_infected_true"]
    n_cells = rows[0][1]["n_red_true"]
    print(f"IML block {a.block}: {len(recs)} fields, {n_cells} boxed cells, {n_inf} infected")
    print("| method | cell recall | cell precision | cell F1 | infected recall | infected precision "
          "| infected called | parasitemia MAE (points) | fields/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s, f in rows:
        print(f"| {name} | {s['det_recall']:.3f} | {s['det_precision']:.3f} | {s['det_f1']:.3f} | "
              f"{s['inf_recall']:.3f} | {s['inf_precision']:.3f} | {s['n_infected_called']} | "
              f"{s['parasitemia_mae_pp']:.2f} | {f:.2f} |")


if __name__ == "__main__":
    main()
