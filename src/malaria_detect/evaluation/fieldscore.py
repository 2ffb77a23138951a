"""Scoring a whole-field report (the `smear --json` format) against annotated fields, by the rules of
`../shared/tools/score_smear.py` (the acceptance checks' scorer), whose figures it reproduces:

- red-cell detection: predicted red cells (objects without a `kind`, or `kind` "red cell") one to one
  with annotated red cells (infected ones included; white cells, platelets and `difficult` left out)
  at IoU >= 0.5; recall over the annotated cells, precision over predicted boxes that do not touch the
  image border (the labels miss border cells);
- infected cells: red cells called parasitized (and not flagged not-a-cell) one to one with infected
  boxes at IoU >= 0.3; the calls matched to none are false positives, per 1,000 classified red cells;
- white cells and platelets called parasitized: those annotated objects matched by such a call at IoU
  >= 0.3; white-cell recall (when objects carry `kind` "white cell"): annotated white cells matched by
  one at IoU >= 0.3;
- parasitemia: per field, infected / annotated red cells vs the report's parasitemia, mean absolute
  error in percentage points. Fields missing from the report, or with an error, are `missing`.

Annotations: a list of {"image_name", "objects": [{"type", "bbox": {"x", "y", "w", "h"}}]} (the IML
and TXL-PBC files in ../shared/data); fields are matched by file name.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..data.annotations import INFECTED_TYPES, box_of, load_annotations, match, match_pairs

NOT_RED = {"white blood cell", "platelet", "difficult"}
INFECTED = INFECTED_TYPES | {"parasitized"}  # COCO files may say "parasitized" without a stage
__all__ = ["format_scores", "format_stages", "load_annotations", "score_fields", "stage_scores"]


def _is_red(c) -> bool:
    return str(c.get("kind", "red cell")).lower() in ("red cell", "red blood cell", "rbc")


def score_fields(report: dict | list, annotations: list[dict], positive: str = "Parasitized") -> dict:
    """The figures of `score_smear.py RESULT ANNOTATIONS` for a report and annotated fields."""
    fields = report["fields"] if isinstance(report, dict) else report
    by_name = {Path(f["image"]).name: f for f in fields}
    n = dict.fromkeys(("tp", "n_gt", "n_inner", "tp_inner", "itp_g", "itp_p", "n_gt_inf", "n_pred_inf",
                       "classified", "false_pos", "wbc_found", "wbc_pred"), 0)
    other = {"white blood cell": [0, 0], "platelet": [0, 0]}
    errs, missing = [], 0
    for rec in annotations:
        f = by_name.get(Path(rec["image_name"]).name)
        if f is None or f.get("error"):
            missing += 1
            continue
        W, H = f.get("width", 1280), f.get("height", 960)
        objs = rec.get("objects", [])
        gt = [box_of(o) for o in objs if o["type"] not in NOT_RED]
        gt_inf = [box_of(o) for o in objs if o["type"] in INFECTED]
        cells = f.get("cells", [])
        red = [c for c in cells if _is_red(c)]
        pred = [tuple(map(float, c["box"])) for c in red]
        pred_inf = [tuple(map(float, c["box"])) for c in red if c.get("label") == positive and not c.get("ood")]
        n["classified"] += sum(1 for c in red if not c.get("ood") and c.get("label"))
        mp, mg = match(pred, gt, 0.5)
        inner = [i for i, p in enumerate(pred) if p[0] > 2 and p[1] > 2 and p[2] < W - 2 and p[3] < H - 2]
        n["tp"] += len(mg)
        n["n_gt"] += len(gt)
        n["n_inner"] += len(inner)
        n["tp_inner"] += sum(i in mp for i in inner)
        ip, ig = match(pred_inf, gt_inf, 0.3)
        n["itp_g"] += len(ig)
        n["itp_p"] += len(ip)
        n["n_gt_inf"] += len(gt_inf)
        n["n_pred_inf"] += len(pred_inf)
        n["false_pos"] += len(pred_inf) - len(ip)
        for t, cnt in other.items():
            boxes = [box_of(o) for o in objs if o["type"] == t]
            cnt[1] += len(boxes)
            cnt[0] += len(match(pred_inf, boxes, 0.3)[1])
        wbc_boxes = [box_of(o) for o in objs if o["type"] == "white blood cell"]
        wbc_objs = [tuple(map(float, c["box"])) for c in cells if str(c.get("kind", "")).lower() == "white cell"]
        n["wbc_pred"] += len(wbc_objs)
        n["wbc_found"] += len(match(wbc_objs, wbc_boxes, 0.3)[1])
        truth = 100.0 * len(gt_inf) / max(1, len(gt))
        est = f.get("parasitemia")
        est = 100.0 * (est if est is not None else len(pred_inf) / max(1, len(pred)))
        errs.append(abs(est - truth))
    R, P = n["tp"] / max(1, n["n_gt"]), n["tp_inner"] / max(1, n["n_inner"])
    wbc, plt = other["white blood cell"], other["platelet"]
    return {"fields": len(errs), "missing": missing, "det_recall": R, "det_precision": P,
            "det_f1": 2 * P * R / max(1e-9, P + R),
            "inf_recall": n["itp_g"] / n["n_gt_inf"] if n["n_gt_inf"] else math.nan,
            "inf_precision": n["itp_p"] / n["n_pred_inf"] if n["n_pred_inf"] else math.nan,
            "parasitemia_mae_pp": sum(errs) / max(1, len(errs)),
            "fp_per_1000": 1000.0 * n["false_pos"] / max(1, n["classified"]),
            "wbc_called_parasitized": wbc, "platelets_called_parasitized": plt,
            "wbc_recall": n["wbc_found"] / max(1, wbc[1]) if n["wbc_pred"] else None,
            "n_infected_true": n["n_gt_inf"], "n_infected_called": n["n_pred_inf"], "n_red_true": n["n_gt"],
            "n_classified": n["classified"]}


STAGES = ("ring", "trophozoite", "schizont", "gametocyte")


def stage_scores(report: dict | list, annotations: list[dict], positive: str = "Parasitized") -> dict | None:
    """Life stages: of the annotated infected cells found and called parasitized with a stage (matched at
    IoU >= 0.3, the scorer's infected-cell rule), the confusion {true stage: {called stage: n}}, per
    stage (right, matched), and the balanced accuracy over ring / trophozoite / gametocyte (schizonts are
    too few to score); None when no called cell carries a stage."""
    fields = report["fields"] if isinstance(report, dict) else report
    by_name = {Path(f["image"]).name: f for f in fields}
    confusion = {s: dict.fromkeys(STAGES, 0) for s in STAGES}
    for r in annotations:
        f = by_name.get(Path(r["image_name"]).name)
        if f is None or f.get("error"):
            continue
        gt = [(box_of(o), o["type"]) for o in r.get("objects", []) if o["type"] in INFECTED_TYPES]
        called = [c for c in f.get("cells", []) if _is_red(c) and c.get("label") == positive and not c.get("ood")
                  and c.get("stage") in STAGES]
        for i, j in match_pairs([tuple(map(float, c["box"])) for c in called], [g[0] for g in gt], 0.3).items():
            confusion[gt[j][1]][called[i]["stage"]] += 1
    per = {s: (row[s], sum(row.values())) for s, row in confusion.items()}
    if not any(n for _, n in per.values()):
        return None
    scored = [k / n for s, (k, n) in per.items() if s != "schizont" and n]
    return {"confusion": confusion, "per_stage": per,
            "balanced_accuracy": sum(scored) / len(scored) if scored else None}


def format_stages(st: dict | None) -> str:
    if not st:
        return "stages: no called cell carries a stage"
    rows = ", ".join(f"{s} {k}/{n}" for s, (k, n) in st["per_stage"].items())
    ba = st["balanced_accuracy"]
    return f"stages (right/found): {rows}; balanced accuracy {'n/a' if ba is None else f'{ba:.3f}'}"


def format_scores(s: dict) -> str:
    """The scores in score_smear.py's words (its line, without the floors)."""
    wbc, plt = s["wbc_called_parasitized"], s["platelets_called_parasitized"]
    extra = f" wbc_recall={s['wbc_recall']:.3f}" if s["wbc_recall"] is not None else ""
    return (f"smear: det_recall={s['det_recall']:.3f} det_precision={s['det_precision']:.3f} "
            f"det_f1={s['det_f1']:.3f} inf_recall={s['inf_recall']:.3f} inf_precision={s['inf_precision']:.3f} "
            f"parasitemia_mae={s['parasitemia_mae_pp']:.2f}pp fp_per_1000={s['fp_per_1000']:.2f} "
            f"wbc_called_parasitized={wbc[0]}/{wbc[1]} platelets_called_parasitized={plt[0]}/{plt[1]}{extra} "
            f"fields={s['fields']} missing={s['missing']}")
