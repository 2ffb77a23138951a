"""The whole-field operating point of a model, chosen on validation fields of two labs and stored in its
record (`extra.field_threshold`, which `smear` uses instead of the cell threshold).

    malaria-detect field-threshold MODEL.onnx --data ../shared/data [--max-fp 0.5]

Why a second threshold: the cell threshold maximises balanced accuracy on validation cells of which
about half are parasitized. In a field only 1-2 % of red cells are infected, so at that threshold false
positives outnumber true ones. The field threshold is the one that maximises the F1 of infected-cell
detection on an IML validation block (PA171770-799 unless `--iml-block` names another one the model
did not learn from, e.g. PA171800-829 for a model trained with `train-heads --iml-learn PA171690-799`)
among those that call at most `max_fp` false parasitized cells per 1,000 red cells on the malaria-free
TXL-PBC validation fields: a healthy patient's slide must not read positive. Neither the IML held-out
block (PA171830-899) nor any test data is read here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..counting import field_counts
from ..data.annotations import load_annotations
from ..data.objects import IML_VAL, iml_block, iml_number
from ..errors import UsageError
from .fieldscore import score_fields

GRID = np.r_[np.linspace(0.3, 0.99, 70), np.linspace(0.991, 0.999, 9)]
SECOND_OPINION = "field_second_opinion"   # record.extra key (record.second_opinion)
SECOND_OBJECT = np.round(np.arange(0.05, 0.9, 0.05), 2)               # whole-field p from which it is asked
SECOND_CELL = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)            # the cell head's p that calls it parasitized


def relabel(report: dict, thr: float, record) -> dict:
    """The report's red cells labelled at another threshold by the record's rule (record.field_labels: with
    its second opinion, from each cell's `p_cell_head`; exact for a report analysed with
    SmearOptions(cell_head=True)), counted by smear's rule."""
    fields = []
    for f in report["fields"]:
        scored = [c for c in f["cells"] if c.get("p_parasitized") is not None]  # one call a field, not a cell
        labels = iter(record.field_labels([c["p_parasitized"] for c in scored],
                                          [c.get("p_cell_head", np.nan) for c in scored], thr).tolist())
        cells = [c if c.get("p_parasitized") is None else dict(c, label=next(labels)) for c in f["cells"]]
        fields.append(dict(f, cells=cells) | field_counts(cells, record.positive))
    return {"fields": fields, "model": {"class_names": list(record.class_names)}}


def validation_fields(data: str | Path, block: range = IML_VAL) -> tuple[list[tuple[Path, dict]],
                                                                        list[tuple[Path, dict]]]:
    """(the IML block, default PA171770-799; TXL-PBC val): (image path, annotation record) pairs."""
    root = Path(data)
    out = []
    for folder, keep in (("iml-fields", lambda n: iml_number(n) in block),
                         ("txl-pbc", lambda n: n.startswith("val/"))):
        ann = root / folder / "annotations.json"
        if not ann.is_file():
            raise UsageError(f"{ann} is not there: field-threshold needs IML and TXL-PBC validation fields")
        out.append([(root / folder / "images" / r["image_name"], r) for r in load_annotations(ann)
                    if keep(r["image_name"])])
    return out[0], out[1]


def choose_field_threshold(model: str | Path, data: str | Path, detector: str | None = "bundled",
                           max_fp: float = 0.5, progress: bool = True, say=print,
                           iml: str = "PA171770-799", second_opinion: bool = True) -> dict:
    """Analyse the validation fields once, score every threshold of GRID, store the chosen one in the
    model's record, then (`second_opinion`, for a model with a cell head beside its whole-field head, on
    the detector's objects) the second opinion (choose_second_opinion); returns {"threshold", "rule",
    "chosen", "table", "second_opinion"}."""
    from tqdm import tqdm

    from ..cells.predictor import Predictor
    from ..fields.analysis import SmearOptions, analyze_field
    from ..modelfile import write_model_record

    pred = Predictor.load(model)
    # the cell head's p of every red cell, for the second opinion (the detector's box crops only)
    opts = SmearOptions(detector=detector, cell_head=second_opinion and detector is not None)
    try:
        block = iml_block(iml)
    except ValueError as e:
        raise UsageError(f"--iml-block: {e}") from None
    heads = pred.record.extra.get("heads", {}).get("config")
    learnt = heads.get("iml_learn", "PA171690-769") if heads else None  # train-heads' block before it was an option
    if learnt and set(iml_block(learnt)) & set(block):
        raise UsageError(f"--iml-block {iml}: the model learnt from IML {learnt}; choose on fields it did not see")
    block_name = f"PA{block.start}-{str(block.stop - 1)[-3:]}"
    iml, txl = validation_fields(data, block)
    if not iml:
        raise UsageError(f"no IML fields of block {block_name} in {data}")
    reports = []
    for name, pairs in (("IML", iml), ("TXL-PBC", txl)):
        reports.append({"fields": [analyze_field(pred, p, r["image_name"], opts)
                                   for p, r in tqdm(pairs, desc=f"{name} validation fields", unit="field",
                                                    disable=not progress)]})
    alone = replace(pred.record, extra={k: v for k, v in pred.record.extra.items() if k != SECOND_OPINION})
    anns = [r for _, r in iml], [r for _, r in txl]
    table = [_row(reports, anns, alone, float(thr), threshold=float(thr))
             for thr in np.unique(np.r_[pred.record.field_cell_threshold, GRID])]
    ok = [t for t in table if t["txl_fp_per_1000"] <= max_fp]
    if ok:
        best = max(ok, key=lambda t: (t["iml_f1"], -t["threshold"]))
        rule = (f"max F1 of infected-cell detection on IML fields {block_name} ({len(iml)} fields) among thresholds "
                f"with at most {max_fp} false parasitized per 1,000 red cells on TXL-PBC val ({len(txl)} fields)")
    else:
        best = min(table, key=lambda t: (t["txl_fp_per_1000"], -t["iml_f1"]))
        rule = (f"no threshold reached {max_fp} false parasitized per 1,000 on TXL-PBC val: the one with the fewest "
                f"({best['txl_fp_per_1000']:.2f})")
    rec = alone
    rec.extra["field_threshold"] = best["threshold"]
    rec.extra["field_threshold_rule"] = rule + f" (detector: {detector or 'classical segmenter'})"
    rec.extra["field_threshold_validation"] = best
    say(f"field threshold {best['threshold']:.3f}: IML infected recall {best['iml_inf_recall']:.3f}, precision "
        f"{best['iml_inf_precision']:.3f}, MAE {best['iml_mae_pp']:.2f} pp; TXL-PBC {best['txl_fp_per_1000']:.2f} "
        f"false parasitized per 1,000 ({rule})")
    second = choose_second_opinion(reports, anns, rec, best) if opts.cell_head and rec.object_head else None
    if second:
        rec.extra[SECOND_OPINION] = second
        c = second["validation"]
        say(f"second opinion: a red cell at whole-field p >= {second['object']:.2f} (under {best['threshold']:.3f}) "
            f"is parasitized when the cell head's p >= {second['cell']:.3f}: IML infected recall "
            f"{c['iml_inf_recall']:.3f}, precision {c['iml_inf_precision']:.3f}, MAE {c['iml_mae_pp']:.2f} pp; "
            f"TXL-PBC {c['txl_fp_per_1000']:.2f} false parasitized per 1,000")
    elif opts.cell_head and rec.object_head:
        say("second opinion: none helps on these validation fields without more false calls on TXL-PBC; none set")
    write_model_record(model, rec)
    return {"threshold": best["threshold"], "rule": rule, "chosen": best, "table": table, "second_opinion": second}


def _row(reports, anns, record, thr: float, **what) -> dict:
    """One operating point scored on the IML and TXL-PBC validation reports (relabelled by `record`)."""
    si, st = (score_fields(relabel(rep, thr, record), a) for rep, a in zip(reports, anns))
    rec, prec = si["inf_recall"], si["inf_precision"]
    f1 = 0.0 if math.isnan(prec) or rec + prec == 0 else 2 * rec * prec / (rec + prec)
    return what | {"iml_inf_recall": rec, "iml_inf_precision": prec, "iml_f1": f1,
                   "iml_mae_pp": si["parasitemia_mae_pp"], "txl_fp_per_1000": st["fp_per_1000"],
                   "txl_wbc_called": st["wbc_called_parasitized"][0]}


def choose_second_opinion(reports, anns, record, chosen: dict) -> dict | None:
    """The second opinion (record.second_opinion) of the best F1 of infected-cell detection on the IML
    validation fields among those that add no false parasitized call on TXL-PBC val to the field
    threshold's own (`chosen`): a second opinion may find more parasites, never a healthy slide's; of equal
    F1 the one that asks the cell head least (highest `cell`, then `object`). None when none beats the field
    threshold alone. The reports need every red cell's p_cell_head (SmearOptions(cell_head=True))."""
    thr, rows = chosen["threshold"], []
    for obj in SECOND_OBJECT:
        for cell in SECOND_CELL:
            r = replace(record, extra=record.extra | {SECOND_OPINION: {"object": float(obj), "cell": float(cell)}})
            rows.append(_row(reports, anns, r, thr, object=float(obj), cell=float(cell)))
    ok = [r for r in rows if _adds_no_false_call(r, chosen)]
    best = max(ok, key=lambda r: (round(r["iml_f1"], 9), r["cell"], r["object"]), default=None)
    if best is None or best["iml_f1"] <= chosen["iml_f1"]:
        return None
    # the cell head's temperature now: `adapt` may refit it later, the second opinion keeps reading p at this one
    return {"object": best["object"], "cell": best["cell"], "temperature": float(record.temperature),
            "validation": best,
            "rule": "max F1 of infected-cell detection on the IML validation fields among second opinions that "
                    "add no false parasitized call on TXL-PBC val to the field threshold's "
                    f"{chosen['txl_fp_per_1000']:.2f} per 1,000"}


def _adds_no_false_call(row: dict, chosen: dict) -> bool:
    """A second opinion's row adds no false call on TXL-PBC val nor a white cell called parasitized."""
    return row["txl_fp_per_1000"] <= chosen["txl_fp_per_1000"] and row["txl_wbc_called"] <= chosen["txl_wbc_called"]
