"""Whole fields per lab: `smear` scored by the acceptance checks' rules on each lab's held-out fields,
the baseline table the any-lab model is measured against.

    .venv/bin/python benchmarks/fields_by_lab.py [--model M ...] [--detector bundled [--no-classical]] [--eyepiece]
        [--limit N] [--json OUT.json]

Labs and their fields (IML: held out, never trained or tuned on; TXL-PBC val chose the bundled detector's
checkpoint and the anylab model's field threshold, so its rows are validation figures):
- IML_Malaria (Lahore, P. vivax, 1280x960): block PA1718 fields 30-99 (PA171830-899; PA171800-829 is
  the adapt pool, not reported here);
- TXL-PBC val, by source (image size): BCCD 640x480, BCD 416x416, PBC ~360x363, Raabin-WBC 575x575; all
  malaria-free, so every parasitized call is false.

- eyepiece-style (`--eyepiece`): the same IML fields as a phone at the eyepiece takes them, black outside a
  round field stop (a centred circle of diameter 1.1 x the field's height), scored on the annotated cells
  whose centre lies inside the stop.

Life stages (IML rows): of the infected cells found and called parasitized (matched at IoU >= 0.3), the
share whose stage is right, per stage, and the balanced accuracy over ring / trophozoite / gametocyte
(schizonts are too few to score).

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

import numpy as np
from PIL import Image, ImageDraw

from malaria_detect.cells.predictor import Predictor
from malaria_detect.data.annotations import box_of
from malaria_detect.evaluation.fieldscore import STAGES, load_annotations, score_fields, stage_scores
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


def eyepiece(path: Path, rec: dict) -> tuple[Image.Image, dict]:
    """The field black outside a centred round field stop, and its annotations inside the stop."""
    img = Image.open(path).convert("RGB")
    W, H = img.size
    r = 0.55 * H
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).ellipse((W / 2 - r, H / 2 - r, W / 2 + r, H / 2 + r), fill=255)
    out = Image.composite(img, Image.new("RGB", img.size, (0, 0, 0)), mask)
    inside = [o for o in rec.get("objects", [])
              if np.hypot((box_of(o)[0] + box_of(o)[2]) / 2 - W / 2, (box_of(o)[1] + box_of(o)[3]) / 2 - H / 2) < r]
    return out, dict(rec, objects=inside)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=[str(bundled_field_model_path())])
    ap.add_argument("--detector", nargs="*", default=[], help="learned detectors (export-detector) to compare with "
                                                              "the classical segmenter, each with every model")
    ap.add_argument("--limit", type=int, default=None, help="at most this many fields per lab (quick runs)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--eyepiece", action="store_true", help="also the IML fields masked to a round field stop")
    ap.add_argument("--no-classical", action="store_true", help="only the given --detector(s), not the classical "
                                                                "segmenter beside them")
    a = ap.parse_args()
    rows = []
    for model in a.model:
        pred = Predictor.load(model)
        for det in ([] if a.no_classical and a.detector else [None]) + a.detector:
            opts = SmearOptions(detector=det)
            todo = labs(a.limit)
            if a.eyepiece:
                todo["IML PA171830-899 eyepiece"] = todo["IML PA171830-899"]
            for lab, (recs, folder) in todo.items():
                t = time.perf_counter()
                if lab.endswith("eyepiece"):
                    masked = [eyepiece(folder / r["image_name"], r) for r in recs]
                    fields = [analyze_field(pred, img, r["image_name"], opts) for img, r in masked]
                    recs = [r for _, r in masked]
                else:
                    fields = [analyze_field(pred, folder / r["image_name"], r["image_name"], opts) for r in recs]
                dt = time.perf_counter() - t
                s = score_fields({"fields": fields}, recs, pred.record.positive)
                rows.append({"model": Path(model).name, "objects": Path(det).name if det else "classical",
                             "lab": lab, "fields": len(recs), "fields_s": len(recs) / dt, **s,
                             "stages": stage_scores(fields, recs, pred.record.positive)})
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
    staged = [r for r in rows if r["stages"]]
    if staged:
        print("\n| model | objects | lab | " + " | ".join(f"{s} right / found" for s in STAGES) +
              " | balanced accuracy (ring, trophozoite, gametocyte) |")
        print("|---|---|---|" + "---|" * (len(STAGES) + 1))
        for r in staged:
            st = r["stages"]
            ba = "" if st["balanced_accuracy"] is None else f"{st['balanced_accuracy']:.3f}"
            print(f"| {r['model']} | {r['objects']} | {r['lab']} | " +
                  " | ".join(f"{k}/{n}" for k, n in st["per_stage"].values()) + f" | {ba} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
