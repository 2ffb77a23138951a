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
from pathlib import Path

import numpy as np

from ..counting import field_counts
from ..data.annotations import load_annotations
from ..data.objects import IML_VAL, iml_block, iml_number
from ..errors import UsageError
from .fieldscore import score_fields

GRID = np.r_[np.linspace(0.3, 0.99, 70), np.linspace(0.991, 0.999, 9)]


def relabel(report: dict, thr: float, record) -> dict:
    """The report's red cells labelled at another threshold (the record's rule), counted by smear's rule."""
    fields = []
    for f in report["fields"]:
        cells = [c if c.get("p_parasitized") is None else dict(c, label=str(record.labels(c["p_parasitized"], thr)))
                 for c in f["cells"]]
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
                           iml: str = "PA171770-799") -> dict:
    """Analyse the validation fields once, score every threshold of GRID, store the chosen one in the
    model's record; returns {"threshold", "rule", "iml", "txl", "table"}."""
    from tqdm import tqdm

    from ..cells.predictor import Predictor
    from ..fields.analysis import SmearOptions, analyze_field
    from ..modelfile import write_model_record

    pred = Predictor.load(model)
    opts = SmearOptions(detector=detector)
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
    table = []
    for thr in np.unique(np.r_[pred.record.field_cell_threshold, GRID]):
        si = score_fields(relabel(reports[0], float(thr), pred.record), [r for _, r in iml])
        st = score_fields(relabel(reports[1], float(thr), pred.record), [r for _, r in txl])
        rec, prec = si["inf_recall"], si["inf_precision"]
        f1 = 0.0 if math.isnan(prec) or rec + prec == 0 else 2 * rec * prec / (rec + prec)
        table.append({"threshold": float(thr), "iml_inf_recall": rec, "iml_inf_precision": prec, "iml_f1": f1,
                      "iml_mae_pp": si["parasitemia_mae_pp"], "txl_fp_per_1000": st["fp_per_1000"],
                      "txl_wbc_called": st["wbc_called_parasitized"][0]})
    ok = [t for t in table if t["txl_fp_per_1000"] <= max_fp]
    if ok:
        best = max(ok, key=lambda t: (t["iml_f1"], -t["threshold"]))
        rule = (f"max F1 of infected-cell detection on IML fields {block_name} ({len(iml)} fields) among thresholds "
                f"with at most {max_fp} false parasitized per 1,000 red cells on TXL-PBC val ({len(txl)} fields)")
    else:
        best = min(table, key=lambda t: (t["txl_fp_per_1000"], -t["iml_f1"]))
        rule = (f"no threshold reached {max_fp} false parasitized per 1,000 on TXL-PBC val: the one with the fewest "
                f"({best['txl_fp_per_1000']:.2f})")
    rec = pred.record
    rec.extra["field_threshold"] = best["threshold"]
    rec.extra["field_threshold_rule"] = rule + f" (detector: {detector or 'classical segmenter'})"
    rec.extra["field_threshold_validation"] = best
    write_model_record(model, rec)
    say(f"field threshold {best['threshold']:.3f}: IML infected recall {best['iml_inf_recall']:.3f}, precision "
        f"{best['iml_inf_precision']:.3f}, MAE {best['iml_mae_pp']:.2f} pp; TXL-PBC {best['txl_fp_per_1000']:.2f} "
        f"false parasitized per 1,000 ({rule})")
    return {"threshold": best["threshold"], "rule": rule, "chosen": best, "table": table}
