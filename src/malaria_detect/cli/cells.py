"""Commands on single-cell images: predict, evaluate, adapt, benchmark."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..tables import csv_safe
from . import options as O

PREDICT_HELP = ("Classify cell images (files, and folders recursively). Every input gets a row: its label and "
                "calibrated p_parasitized, or the reason it could not be read. Exit status: 0 when every input got "
                "an answer; 1 when any input was missing or unreadable (or the model gave no answer for it), after "
                "every row that could be written was written.")
ADAPT_HELP = ("Write a copy of a model calibrated on a small labelled folder of your lab's own cells (Parasitized/ "
              "and Uninfected/ subfolders, at least 20 cells and 5 of each class): temperature, threshold and "
              "not-a-cell threshold are refitted; the network is unchanged. Use the result with --model in "
              "predict, smear and serve. For a model with a whole-field head of its own (the bundled default), "
              "single cells take the refitted values and whole fields keep that head's operating point (only "
              "the not-a-cell threshold is shared).")


def add_parsers(sub) -> dict:
    p = sub.add_parser("predict", help="classify cell images (files and folders, recursively)",
                       description=PREDICT_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    O.add_model(p)
    p.add_argument("--csv", default=None, help="write one row per image: path,label,p_parasitized,ood,error "
                                               "(a model with object heads, as the default, adds kind,stage,"
                                               "p_stage before error; + heatmap with --heatmaps)")
    p.add_argument("--heatmaps", default=None, metavar="DIR",
                   help="write a heatmap overlay PNG per image here; its path goes in the CSV's heatmap column")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations (8x slower)")
    p.add_argument("--batch-size", type=O.positive_int, default=64, help="images per network batch (default 64)")
    p.add_argument("--workers", type=O.positive_int, default=2, help="image-decoding threads")
    O.add_json_flag(p, "print the results and the summary as JSON instead of a table (numbers, true/false and "
                       "null as such)")
    O.add_ray(p, "", "the rows (+ idx, ood_score)")

    p = sub.add_parser("evaluate", help="metrics, CIs and plots on a labelled folder (patient-disjoint)")
    O.add_model(p, checkpoints=True)
    p.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/ subfolders")
    p.add_argument("--split", default="test", choices=["test", "val", "all"],
                   help="test: the model's held-out test patients (default); all: every image (external data)")
    p.add_argument("--out", default=None, help="folder for report.json and PNG plots")
    O.add_json_flag(p)
    p.add_argument("--patients", default=None, help="CSV file,patient for data without NIH file names")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over patients (0 = no CIs)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (ONNX models)")

    p = sub.add_parser("adapt", help="site calibration: refit T, threshold and not-a-cell threshold on your cells",
                       description=ADAPT_HELP)
    p.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/ cell images of your lab")
    p.add_argument("--out", required=True, help="the new model file (.onnx)")
    O.add_model(p, "ONNX model to calibrate")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="choose the threshold reaching this sensitivity on your cells (default: the model's own, "
                        "moved only as far as your cells show it is off)")

    p = sub.add_parser("benchmark", help="latency and throughput: ONNX fp32, ONNX int8, PyTorch")
    O.add_model(p)
    p.add_argument("--int8-model", default=None, help="int8 ONNX model to compare (default: the bundled one)")
    p.add_argument("--checkpoint", default=None, help="torch checkpoint for the PyTorch eager column")
    p.add_argument("--sample", default=None, help="labelled image folder (default: the bundled sample)")
    O.add_json_flag(p)
    return {"predict": cmd_predict, "evaluate": cmd_evaluate, "adapt": cmd_adapt, "benchmark": cmd_benchmark}


def _predictions(a, pred):
    """Every input's Prediction: from a Ray actor pool, or in this process with a progress bar."""
    if a.ray:
        from ..scale import predict_ray

        return predict_ray(a.paths, address=a.ray, model=a.model, batch_size=a.batch_size, tta=a.tta,
                           num_cpus=a.ray_cpus, parquet=a.parquet, progress=not a.json)
    from ..imaging import iter_image_paths

    paths = list(iter_image_paths(a.paths))
    if not paths:
        raise SystemExit("error: no images found in " + " ".join(a.paths))
    with O.progress_bar(len(paths), "predicting", "img", quiet=a.json) as bar:
        return pred.predict(paths, batch_size=a.batch_size, tta=a.tta, heatmaps=bool(a.heatmaps),
                            workers=a.workers, progress=bar)


def _write_heatmaps(a, results, temperature: float) -> list:
    from ..cells.heatmaps import heatmap_overlay

    out = [None] * len(results)
    for i, r in enumerate(results):
        if a.heatmaps and r.cam is not None:
            out[i] = Path(a.heatmaps) / f"{i:05d}_{Path(r.source).stem}_heatmap.png"
            heatmap_overlay(r.source, r.cam, temperature).save(out[i])
    return out


def cmd_predict(a):
    from ..cells.predictor import Predictor
    from ..counting import ImageSummary, plural

    O.check_ray(a, "--heatmaps")
    O.output_folder("--heatmaps", a.heatmaps)
    O.output_file("--csv", a.csv)
    pred = Predictor.load(a.model)  # (with --ray too: its record names the classes in the summary)
    results = _predictions(a, pred)
    heatmaps = _write_heatmaps(a, results, pred.record.temperature)

    def extra(i, empty):
        return {"heatmap": str(heatmaps[i]) if heatmaps[i] else empty} if a.heatmaps else {}

    if a.csv:  # strings only in CSV
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=pred.csv_fields + ["heatmap"] * bool(a.heatmaps))
            w.writeheader()
            objects = bool(pred.record.kind_names)
            w.writerows({k: csv_safe(v) for k, v in (r.row(objects) | extra(i, "")).items()}
                        for i, r in enumerate(results))
    summary = ImageSummary.of(results, pred.record)  # the one counting rule (also smear's)
    if a.json:  # typed: numbers, booleans and null as such
        objects = bool(pred.record.kind_names)
        print(json.dumps({"results": [r.to_dict(objects) | extra(i, None) for i, r in enumerate(results)],
                          "summary": summary.to_dict()}, indent=1))
    else:
        if not a.csv or len(results) <= 20:
            for r in results:
                msg = f"ERROR {r.error}" if r.error else \
                    f"{r.label:<12} p={r.p_parasitized:.3f}" + ("  NOT A CELL?" if r.ood else "")
                print(f"{r.source}\t{msg}")
        print("\n" + summary.format() + (f"\nresults written to {a.csv}" if a.csv else "")
              + (f"\nheatmaps written to {a.heatmaps}" if a.heatmaps else ""))
    bad = summary.counts.n_unclassified
    if bad:
        print(f"error: {bad} of {plural(len(results), 'input')} missing or unreadable (see their rows)",
              file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(a):
    from ..evaluation.evaluate import evaluate, format_report

    r = evaluate(a.model, a.data, a.split, a.out, a.patients, n_boot=a.bootstrap, tta=a.tta,
                 progress=not a.json)
    if a.json:
        print(json.dumps(r))
    else:
        print(format_report(r))
        if a.out:
            print(f"report and plots written to {a.out}")
    return 0


def cmd_adapt(a):
    from ..evaluation.adapt import adapt, format_adapt

    print(format_adapt(adapt(a.data, a.out, a.model, a.target_sensitivity, progress=sys.stderr.isatty())))
    return 0


def cmd_benchmark(a):
    from ..evaluation.speed import format_benchmark, run_benchmark

    r = run_benchmark(a.model, a.int8_model, a.checkpoint, a.sample)
    print(json.dumps(r, indent=1) if a.json else format_benchmark(r))
    return 0
