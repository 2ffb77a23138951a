"""Does fine-tuning a copy of the base's last stages with the whole-field heads (train-heads
--finetune-epochs) separate parasites from look-alikes better than the heads on frozen features?
Validation fields only: IML PA171770-799 (the validation block), PA171800-829 (the adapt pool, here a
second validation block) and TXL-PBC val.

    .venv/bin/python research/finetune_validation.py MODEL.onnx [MODEL.onnx ...] [--max-fp 0.5]

Each model analyses the fields as `smear` does (imaged area, bundled detector, its kinds and whole-field
head) and is scored by evaluation.fieldscore (= ../shared/tools/score_smear.py) twice: at its own field
threshold, and relabelled (evaluation.operating.relabel) at the lowest threshold that keeps false
parasitized calls on TXL-PBC val at or under --max-fp per 1,000 red cells: infected-cell recall,
precision and parasitemia MAE per IML block. The held-out IML block PA171830-899 is never read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from malaria_detect.cells.predictor import Predictor
from malaria_detect.data.objects import iml_block
from malaria_detect.evaluation.fieldscore import score_fields
from malaria_detect.evaluation.operating import relabel
from malaria_detect.evaluation.operating import validation_fields as validation_fields_of
from malaria_detect.fields.analysis import SmearOptions, analyze_field, field_threshold

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TXL = "TXL-PBC val"
LABS = {"IML val PA171770-799": "PA171770-799", "IML adapt PA171800-829": "PA171800-829"}


def validation_fields() -> dict[str, list[tuple[Path, dict]]]:
    """Each IML block's and TXL-PBC val's (image path, annotation record) pairs, as field-threshold lists them."""
    out = {}
    for lab, block in LABS.items():
        out[lab], out[TXL] = validation_fields_of(DATA, iml_block(block))
    return out


def scores(reports: dict, todo: dict, record, thr: float | None = None) -> dict:
    """Per lab, score_fields of its report as analysed (thr None: at the model's field threshold) or
    relabelled at thr."""
    return {lab: score_fields(rep if thr is None else relabel(rep, thr, record), [r for _, r in todo[lab]],
                              record.positive) for lab, rep in reports.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--max-fp", type=float, default=0.5)
    a = ap.parse_args()
    todo = validation_fields()
    print("| model | threshold | " + " | ".join(f"{lab} recall / precision / MAE" for lab in LABS) +
          " | TXL-PBC val false /1,000 | TXL-PBC white cells called / recall |")
    print("|---|---|" + "---|" * (len(LABS) + 2))
    for m in a.models:
        pred = Predictor.load(m)
        reports = {lab: {"fields": [analyze_field(pred, p, r["image_name"], SmearOptions())
                                    for p, r in tqdm(pairs, desc=f"{Path(m).name}: {lab}", unit="field")]}
                   for lab, pairs in todo.items()}
        rows = [(f"its field threshold {field_threshold(pred.record):.3f}", scores(reports, todo, pred.record))]
        txl_p = sorted({c["p_parasitized"] for f in reports[TXL]["fields"] for c in f["cells"]
                        if c.get("p_parasitized") is not None}, reverse=True)
        best = None
        for p in txl_p[:400]:  # from the most parasite-like TXL-PBC cell down: just above it
            s = scores(reports, todo, pred.record, p + 1e-6)
            if s[TXL]["fp_per_1000"] > a.max_fp:
                break
            best = (p + 1e-6, s)
        rows.append((f"lowest with <= {a.max_fp} /1,000 ({best[0]:.3f})", best[1]) if best else
                    (f"none reaches {a.max_fp} /1,000", None))
        for what, s in rows:
            if s is None:
                print(f"| {Path(m).name} | {what} |")
                continue
            iml = " | ".join(f"{s[lab]['inf_recall']:.3f} / {s[lab]['inf_precision']:.3f} / "
                             f"{s[lab]['parasitemia_mae_pp']:.2f}" for lab in LABS)
            w = s[TXL]
            print(f"| {Path(m).name} | {what} | {iml} | {w['fp_per_1000']:.2f} | {w['wbc_called_parasitized'][0]}/"
                  f"{w['wbc_called_parasitized'][1]} / {w['wbc_recall']:.3f} |")


if __name__ == "__main__":
    main()
