"""Scoring a whole-field report against annotated fields, with the matching rules of the benchmark."""

from __future__ import annotations

from pathlib import Path

from ..data.annotations import _greedy
from ..data.folders import NEGATIVE, POSITIVE


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
