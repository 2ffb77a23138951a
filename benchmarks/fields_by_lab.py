"""Whole fields per lab: `smear` scored by the acceptance checks' rules on each lab's held-out fields,
the baseline table the any-lab model is measured against.

    .venv/bin/python benchmarks/fields_by_lab.py [--model M ...] [--limit N] [--json OUT.json]

Labs and their held-out fields (never trained or tuned on):
- IML_Malaria (Lahore, P. vivax, 1280x960): block PA1718 fields 30-99 (PA171830-899; PA171800-829 is
  the adapt pool, not reported here);
- TXL-PBC val, by source (image size): BCCD 640x480, BCD 416x416, PBC ~360x363, Raabin-WBC 575x575; all
  malaria-free, so every parasitized call is false.

Each model given (default: the bundled whole-field model) runs in the same process on the same fields;
figures from evaluation.fieldscore (= ../shared/tools/score_smear.py): red-cell detection F1, infected-
cell recall and precision, parasitemia MAE, false parasitized per 1,000 classified red cells, white
cells called parasitized, white-cell recall; fields/s end to end (file -> JSON record) on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from malaria_detect.cells.predictor import Predictor
from malaria_detect.evaluation.fieldscore import load_annotations, score_fields
from malaria_detect.fields.analysis import SmearOptions, analyze_field
from malaria_detect.modelfile import bundled_field_model_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TXL_SOURCES = {(640, 480): "BCCD", (416, 416): "BCD", (575, 575): "Raabin-WBC"}  # else PBC (~360 px)


def labs(limit: int | None = None) -> dict[str, tuple[list[dict], Path]]:
    """lab name -> (annotation records, image folder)."""
    out = {}
    iml = [r for r in load_annotations(DATA / "iml-fields" / "annotations.json")
           if r["image_name"].startswith("PA1718") and int(r["image_name"][6:8]) >= 30]
    out["IML PA171830-899"] = (iml[:limit], DATA / "iml-fields" / "images")
    txl = [r for r in load_annotations(DATA / "txl-pbc" / "annotations.json") if r["image_name"].startswith("val/")]
    for r in txl:
        name = "TXL-PBC val " + TXL_SOURCES.get((int(r["width"]), int(r["height"])), "PBC")
        out.setdefault(name, ([], DATA / "txl-pbc" / "images"))[0].append(r)
    return {k: (v[0][:limit], v[1]) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=[str(bundled_field_model_path())])
    ap.add_argument("--detector", nargs="*", default=[], help="learned detectors (export-detector) to compare with "
                                                              "the classical segmenter, each with every model")
    ap.add_argument("--limit", type=int, default=None, help="at most this many fields per lab (quick runs)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    rows = []
    for model in a.model:
        pred = Predictor.load(model)
        for det in [None, *a.detector]:
            opts = SmearOptions(detector=det)
            for lab, (recs, folder) in labs(a.limit).items():
                t = time.perf_counter()
                fields = [analyze_field(pred, folder / r["image_name"], r["image_name"], opts) for r in recs]
                dt = time.perf_counter() - t
                s = score_fields({"fields": fields}, recs, pred.record.positive)
                rows.append({"model": Path(model).name, "objects": Path(det).name if det else "classical",
                             "lab": lab, "fields": len(recs), "fields_s": len(recs) / dt, **s})
    print("| model | objects | lab | fields | red-cell F1 | infected recall | infected precision | MAE (points) "
          "| false parasitized /1,000 | white cells called parasitized | white-cell recall | fields/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wbc = r["wbc_called_parasitized"]
        wr = "" if r["wbc_recall"] is None or not wbc[1] else f"{r['wbc_recall']:.3f}"
        print(f"| {r['model']} | {r['objects']} | {r['lab']} | {r['fields']} | {r['det_f1']:.3f} | "
              f"{r['inf_recall']:.3f} | {r['inf_precision']:.3f} | {r['parasitemia_mae_pp']:.2f} | "
              f"{r['fp_per_1000']:.2f} | "
              f"{wbc[0]}/{wbc[1]} | {wr} | {r['fields_s']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
