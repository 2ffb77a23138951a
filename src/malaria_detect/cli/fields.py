"""Commands on whole microscope fields: smear, cut-cells."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..counting import TARGET_CELLS
from ..imaging import FIELD_MAX_PIXELS
from . import options as O

SMEAR_HELP = ("Find the red cells, white cells and platelets of whole thin-smear field images (files and folders; a "
              "folder of fields is one sample), classify each red cell with the model (with the parasite's stage, "
              "for a model that names stages), and report counts and parasitemia with a 95 percent Wilson interval "
              "per field and pooled, and white cells, platelets and parasitized cells by stage beside them. Cells "
              "flagged 'not a cell' are counted apart and left out of the parasitemia. Exit status: 0 with a "
              "parasitemia; 1 when a field could not be read, or when no red cell at all could be classified "
              "(after the report was written).")
EVAL_HELP = ("Analyse annotated fields (or read a smear --json report) and print the field-level figures by the "
             "rules of the acceptance checks' scorer (../shared/tools/score_smear.py): red-cell detection recall, "
             "precision and F1 (IoU >= 0.5; precision over boxes off the image border), infected-cell recall and "
             "precision (IoU >= 0.3), false parasitized calls per 1,000 classified red cells, white cells and "
             "platelets called parasitized, parasitemia MAE. Annotated fields not among the inputs count as "
             "missing.")
CUT_HELP = ("Cut the boxed cells of annotated whole fields into Parasitized/ and Uninfected/ folders (+ patients.csv: "
            "file,field), as a person crops them (box) and as the whole-field pipeline masks them (mask): data for "
            "train, evaluate and adapt.")


def add_parsers(sub) -> dict:
    p = sub.add_parser("smear", help="whole smear fields: find every red cell, classify it, parasitemia",
                       description=SMEAR_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH", help="field images (jpg, png, tif, ...) or folders of them")
    O.add_model(p, "ONNX model (e.g. one made by adapt)", "anylab")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write {fields: [{image, width, height, cells: [{kind, box, label, p_parasitized, ood, "
                        "stage, p_stage, p_cell_head}], n_cells, n_parasitized, n_white_cells, n_platelets, "
                        "n_by_stage, parasitemia, parasitemia_ci95, ...}], summary: {...}}")
    p.add_argument("--csv", default=None, metavar="CELLS.csv", help="one row per object: image,cell,x0,y0,x1,y1,"
                                                                     "label,p_parasitized,ood,border,kind,stage,p_stage,"
                                                                     "p_cell_head (the second opinion's, where asked)")
    p.add_argument("--coco", default=None, metavar="OUT.json",
                   help="also write the objects as COCO detection JSON (boxes [x, y, w, h]; categories red cell, "
                        "parasitized red cell by stage, white cell, platelet, other; scores): for CVAT, Label Studio, "
                        "QuPath, FiftyOne, and evaluate-fields --annotations")
    p.add_argument("--report", default=None, metavar="REPORT.html|.pdf",
                   help="also write a report to print or file: one page per sample (counts, parasitemia and its "
                        "interval, stages, white cells, the stopping rule, the gallery of parasitized cells); HTML "
                        "(the browser's Save as PDF gives clean pages), or a PDF when the name ends in .pdf (the "
                        "[pdf] extra)")
    p.add_argument("--operator", default=None, metavar="NAME", help="who ran the analysis, for --report")
    p.add_argument("--db", default=None, metavar="FILE.sqlite3",
                   help="the samples database the report is saved in (default: MALARIA_DETECT_DB, else "
                        "samples.sqlite3 in your data directory); `malaria-detect samples` reads it")
    p.add_argument("--no-db", action="store_true", help="do not save this analysis in the samples database")
    p.add_argument("--overlays", default=None, metavar="DIR",
                   help="write each field with its cells drawn (parasitized bold red with p) and the counts")
    p.add_argument("--cell-diameter", type=float, default=None, metavar="PX",
                   help="typical red-cell diameter in pixels, for the classical segmenter (which it then selects; "
                        "default: the detector, which finds the scale itself)")
    p.add_argument("--sample", default=None, metavar="ID",
                   help="the sample (slide, patient) the fields belong to (default: each folder given is one "
                        "sample, named after it; a file given alone belongs to its folder's sample); the report "
                        "pools each sample (`samples`) and all fields (`summary`)")
    p.add_argument("--target-cells", type=int, default=TARGET_CELLS, metavar="N",
                   help=f"the stopping rule: red cells to classify in the sample (default {TARGET_CELLS:,}, the WHO "
                        "thin-film count); the report says whether they were reached and about how many more fields "
                        "like these it takes")
    p.add_argument("--rbc-per-ul", type=float, default=None, metavar="N",
                   help="red cells per microlitre of blood (e.g. 5000000): also report parasites/uL")
    p.add_argument("--batch-size", type=O.positive_int, default=128, help="cells per network batch (default 128)")
    p.add_argument("--detector", default=None, metavar="DETECTOR.onnx",
                   help="how the objects are found: 'bundled' (the default: the learned detector of red cells, white "
                        "cells and platelets; README has its figures per lab), a file made by export-detector, or "
                        "'classical' (the colour segmenter; the default when --cell-diameter is given)")
    p.add_argument("--max-field-pixels", type=O.positive_int, default=FIELD_MAX_PIXELS, metavar="N",
                   help=f"largest field decoded, width x height (default {FIELD_MAX_PIXELS:,}, as the server's "
                        "MALARIA_DETECT_MAX_FIELD_PIXELS); larger fields get an error")
    O.add_ray(p, ", one field per task", "one row per field (counts + the whole record as JSON)")

    p = sub.add_parser("cut-cells", help="labelled cell images cut from annotated fields (IML_Malaria JSON)",
                       description=CUT_HELP)
    p.add_argument("--fields", required=True, help="folder of field images")
    p.add_argument("--annotations", required=True, help="JSON list of {image_name, objects: [{type, bbox}]}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--only", nargs="*", default=None, metavar="PREFIX", help="only fields whose name starts so")
    p.add_argument("--mode", nargs="+", default=["box", "mask"], choices=["box", "mask"])
    p.add_argument("--max-uninfected-per-field", type=int, default=0, help="subsample uninfected cells (0 = all)")

    p = sub.add_parser("evaluate-fields", help="score whole-field analysis against your annotated fields",
                       description=EVAL_HELP)
    p.add_argument("paths", nargs="*", metavar="PATH", help="field images or folders to analyse (not with --result)")
    p.add_argument("--annotations", required=True, metavar="ANN.json",
                   help="annotated fields: COCO detection JSON, or [{image_name, objects: [{type, bbox: {x, y, "
                        "w, h}}]}] (IML / TXL-PBC)")
    p.add_argument("--result", default=None, metavar="SMEAR.json", help="score this smear --json report instead")
    O.add_model(p, "ONNX model (e.g. one made by adapt)", "anylab")
    p.add_argument("--cell-diameter", type=float, default=None, metavar="PX",
                   help="typical red-cell diameter in pixels, for the classical segmenter (which it then selects; "
                        "default: the detector, which finds the scale itself)")
    p.add_argument("--detector", default=None, metavar="DETECTOR.onnx", help="as smear's --detector")
    O.add_json_flag(p, "print the figures as one JSON object")
    return {"smear": cmd_smear, "cut-cells": cmd_cut_cells, "evaluate-fields": cmd_evaluate_fields}


def check_pdf(path: str | None) -> None:
    """A .pdf report needs fpdf2: said before any work is done."""
    if path and path.lower().endswith(".pdf"):
        from ..fields.pdfreport import new_pdf

        new_pdf()


def _report(a, opts, model: str) -> dict:
    """The smear report: from a Ray actor pool, or in this process (with overlays and a progress bar)."""
    if a.ray:
        from ..scale import analyze_fields_ray

        return analyze_fields_ray(a.paths, address=a.ray, model=model, opts=opts, num_cpus=a.ray_cpus,
                                  parquet=a.parquet)
    from ..cells.predictor import Predictor
    from ..fields.analysis import analyze_fields
    from ..fields.overlay import draw_overlay
    from ..imaging import iter_image_paths

    pred = Predictor.load(model)
    paths = list(iter_image_paths(a.paths))
    if not paths:
        raise SystemExit("error: no images found in " + " ".join(a.paths))

    def overlay(i, path, rec):
        if a.overlays and "error" not in rec:
            out = Path(a.overlays) / f"{i:04d}_{path.stem}_overlay.png"
            draw_overlay(path, rec, pred.record.positive).save(out)
            rec["overlay"] = str(out)

    with O.progress_bar(len(paths), "fields", "field") as bar:
        return analyze_fields(pred, paths, opts, progress=bar, on_field=overlay)


def cmd_smear(a):
    from ..counting import FieldReport, Summary
    from ..fields.analysis import SmearOptions
    from ..fields.report import write_csv
    from ..modelfile import bundled_field_model_path

    if a.cell_diameter is not None and not (math.isfinite(a.cell_diameter) and 6 <= a.cell_diameter <= 2000):
        raise SystemExit("error: --cell-diameter must be between 6 and 2000 pixels")
    O.check_ray(a, "--overlays")
    _check_detector(a)
    for out in (a.json, a.csv, a.coco, a.report):
        if out and not Path(out).resolve().parent.is_dir():
            raise SystemExit(f"error: the folder of {out} does not exist")
    check_pdf(a.report)
    if a.overlays:
        if Path(a.overlays).exists() and not Path(a.overlays).is_dir():
            raise SystemExit(f"error: --overlays {a.overlays} is a file, not a folder")
        Path(a.overlays).mkdir(parents=True, exist_ok=True)
    if a.target_cells < 1:
        raise SystemExit("error: --target-cells must be at least 1")
    if a.sample is not None:
        from ..store import StoreError, check_sample_id

        try:
            a.sample = check_sample_id(a.sample)
        except StoreError as e:
            raise SystemExit(f"error: --sample: {e}") from None
    opts = SmearOptions(cell_diameter=a.cell_diameter, batch_size=a.batch_size, rbc_per_ul=a.rbc_per_ul,
                        target_cells=a.target_cells, sample=a.sample,
                        max_pixels=a.max_field_pixels, detector=a.detector)
    report = _report(a, opts, a.model or str(bundled_field_model_path()))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.coco:
        from ..data.coco import to_coco

        Path(a.coco).write_text(json.dumps(to_coco(report), indent=1))
    if a.report:
        from ..fields.htmlreport import write_report

        write_report(report, a.report, a.operator)
    saved = None
    if not a.no_db:
        from ..store import Store, StoreError

        try:
            with Store(a.db) as db:
                db.save_report(report)
                saved = db.path
        except StoreError as e:
            print(f"warning: {e}", file=sys.stderr)
    if a.csv:
        write_csv(report, a.csv)
    for f in report["fields"]:
        print(FieldReport.of(f).format())
    samples = report.get("samples") or []
    if len(samples) > 1:  # each sample apart, then all together
        for one in samples:
            rs = [f for f in report["fields"] if f.get("sample") == one["sample"]]
            print(f"\nsample {one['sample']}: " + Summary.of(rs, a.rbc_per_ul, a.target_cells).format())
    s = Summary.of(report["fields"], a.rbc_per_ul, a.target_cells)
    print("\n" + ("all samples, " if len(samples) > 1 else f"sample {samples[0]['sample']}, " if samples else "")
          + s.format()
          + (f"\nJSON written to {a.json}" if a.json else "") + (f"\nCSV written to {a.csv}" if a.csv else "")
          + (f"\nCOCO written to {a.coco}" if a.coco else "") + (f"\nreport written to {a.report}" if a.report else "")
          + (f"\nsaved in {saved} (malaria-detect samples list)" if saved else "")
          + (f"\noverlays written to {a.overlays}" if a.overlays else ""))
    return 1 if s.n_errors or s.counts.n_classified == 0 else 0


def cmd_cut_cells(a):
    from ..data.cutcells import cut_cells

    with O.progress_bar(None, "fields", "field") as bar:
        r = cut_cells(a.fields, a.annotations, a.out, a.only, tuple(a.mode), a.max_uninfected_per_field,
                      progress=bar)
    print(f"{r['fields']} fields -> {r['Parasitized']} Parasitized and {r['Uninfected']} Uninfected cell images "
          f"in {a.out} (patients.csv: file,field)")
    for e in r["errors"]:
        print(f"  warning: {e}")
    return 0


def _check_detector(a) -> None:
    """--detector: left out, the bundled detector (the classical segmenter with --cell-diameter);
    'classical' (None from here on); or a file that is there, not with --cell-diameter (the detector finds
    the scale itself)."""
    if a.detector is None:
        a.detector = "bundled" if a.cell_diameter is None else None
    if a.detector in ("classical", "", None):
        a.detector = None
        return
    from ..modelfile import detector_path

    if a.cell_diameter is not None:
        raise SystemExit("error: --cell-diameter goes with the classical segmenter; the detector finds the scale "
                         "itself (leave out one of them)")
    if not detector_path(a.detector).is_file():
        raise SystemExit(f"error: --detector {a.detector}: no such file (give 'bundled' or an export-detector file)")


def cmd_evaluate_fields(a):
    from ..evaluation.fieldscore import format_scores, format_stages, load_annotations, score_fields, stage_scores

    _check_detector(a)
    annotations = load_annotations(a.annotations)
    if a.result:
        if a.paths:
            raise SystemExit("error: give field images or --result, not both")
        report = json.loads(Path(a.result).read_text())
    else:
        if not a.paths:
            raise SystemExit("error: give the field images (files or folders), or --result SMEAR.json")
        from ..cells.predictor import Predictor
        from ..fields.analysis import SmearOptions, analyze_fields
        from ..modelfile import bundled_field_model_path

        pred = Predictor.load(a.model or str(bundled_field_model_path()))
        with O.progress_bar(None, "fields", "field", quiet=a.json) as bar:
            report = analyze_fields(pred, a.paths, SmearOptions(cell_diameter=a.cell_diameter, detector=a.detector),
                                    progress=bar)
    positive = report.get("model", {}).get("class_names", ["", "Parasitized"])[1] if isinstance(report, dict) \
        else "Parasitized"
    s = score_fields(report, annotations, positive)
    stages = stage_scores(report, annotations, positive)
    if a.json:
        print(json.dumps(s | {"stages": stages}))
    else:
        print(format_scores(s))
        print(format_stages(stages))
        if s["missing"]:
            print(f"note: {s['missing']} annotated fields were not analysed (not among the inputs, or unreadable)")
    return 0
