"""The `malaria-detect` command: thin argument parsing around the modules."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from ..modelfile import NAMES_HELP
from ..tables import csv_safe
from ..training.config import TrainConfig

DESCRIPTION = """\
malaria-detect: is a red blood cell in a Giemsa-stained thin-smear image parasitized or uninfected?
A research and screening aid, not a diagnosis.

Typical use:
  malaria-detect predict cells/ --csv results.csv      classify every image in a folder (no PyTorch needed)
  malaria-detect smear fields/ --json out.json         whole microscope fields: every red cell, parasitemia
  malaria-detect adapt --data my_cells/ --out lab.onnx calibrate to your lab with a few dozen labelled cells
  malaria-detect serve                                 web app and REST API at http://127.0.0.1:8000
  malaria-detect evaluate --data DIR                   honest figures on patients the model never saw
  malaria-detect train --data DIR --out runs/NAME      train your own model (needs the [train] extra)
"""


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {x}")
    return x


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# TrainConfig fields that `cv` sets itself (per fold) or has its own option for
CV_OWN = ("out", "model", "split", "split_file")


def _add_config_options(p, skip=()) -> None:
    """One option per TrainConfig field (training/config.py), its default and help the field's own: `train`
    and `cv` never state a default of their own."""
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        flag, text = meta.pop("flag", "--" + f.name.replace("_", "-")), meta.pop("help")
        if f.name == "target_sensitivity":
            meta["type"] = _fraction
        if f.default is MISSING and f.default_factory is MISSING:
            p.add_argument(flag, dest=f.name, required=True, help=text, **meta)
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=text)
            continue
        if default is not None and not isinstance(default, list):
            meta.setdefault("type", type(default))
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        p.add_argument(flag, dest=f.name, default=default, help=text if default is None else
                       f"{text} (default: {shown})", **meta)


def _add_common_model(p, help_extra=""):
    p.add_argument("--model", default=None,
                   help="model file (.onnx, or a training checkpoint .safetensors / run folder), " + NAMES_HELP
                        + "; default: the bundled model" + help_extra)


def _add_ray_options(p, how: str, rows: str):
    """--ray, --ray-cpus, --parquet: the command on a Ray cluster (scale.py)."""
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help=f"run on Ray{how} (needs the [scale] extra): local (start one here), auto (the cluster "
                        "this machine is in) or ray://HOST:PORT; PATHs may then also be URIs (s3://, gs://, ...)")
    p.add_argument("--ray-cpus", type=_positive_int, default=None, metavar="N",
                   help="CPUs of a --ray local instance (default: all)")
    p.add_argument("--parquet", default=None, metavar="DIR",
                   help=f"with --ray: also write {rows} as Parquet files here (a folder or a URI)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="malaria-detect", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("predict", help="classify cell images (files and folders, recursively)",
                       description="Classify cell images (files, and folders recursively). Every input gets a row: "
                                   "its label and calibrated p_parasitized, or the reason it could not be read. "
                                   "Exit status: 0 when every input got an answer; 1 when any input was missing or "
                                   "unreadable (or the model gave no answer for it), after every row that could be "
                                   "written was written.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--model", default=None, help="ONNX model file, " + NAMES_HELP + "; default: nih")
    p.add_argument("--csv", default=None, help="write one row per image: path,label,p_parasitized,ood,error "
                                               "(+ heatmap with --heatmaps)")
    p.add_argument("--heatmaps", default=None, metavar="DIR",
                   help="write a heatmap overlay PNG per image here; its path goes in the CSV's heatmap column")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations (8x slower)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per network batch (default 64)")
    p.add_argument("--workers", type=_positive_int, default=2, help="image-decoding threads")
    p.add_argument("--json", action="store_true",
                   help="print the results and the summary as JSON instead of a table (numbers, true/false and "
                        "null as such)")
    _add_ray_options(p, "", "the rows (+ idx, ood_score)")

    p = sub.add_parser("evaluate", help="metrics, CIs and plots on a labelled folder (patient-disjoint)")
    _add_common_model(p)
    p.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/ subfolders")
    p.add_argument("--split", default="test", choices=["test", "val", "all"],
                   help="test: the model's held-out test patients (default); all: every image (external data)")
    p.add_argument("--out", default=None, help="folder for report.json and PNG plots")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.add_argument("--patients", default=None, help="CSV file,patient for data without NIH file names")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over patients (0 = no CIs)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (ONNX models)")

    p = sub.add_parser("train", help="train a model (transfer learning or the scratch baseline)")
    _add_config_options(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out from its last epoch")

    p = sub.add_parser("export", help="checkpoint -> ONNX (+ int8), re-validated with ONNX Runtime")
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors checkpoint")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--int8", action="store_true", help="write a statically quantized int8 model")
    p.add_argument("--data", default=None, help="training data folder (validation patients for --int8 and "
                                                "--target-sensitivity, and for re-validation)")
    p.add_argument("--sample", default=None, help="folder of images to re-validate ONNX vs PyTorch on")
    p.add_argument("--target-sensitivity", type=_fraction, default=None,
                   help="choose the threshold that reaches this sensitivity on the validation patients")
    p.add_argument("--max-int8-drop", type=float, default=0.5,
                   help="refuse an int8 model whose validation accuracy drops by more points than this (0.5)")

    p = sub.add_parser("cv", help="patient-grouped k-fold cross-validation (mean +- sd of every metric)")
    p.add_argument("--folds", type=int, default=5, help="number of patient folds (default 5)")
    p.add_argument("--model", default=TrainConfig.model,
                   help="an architecture to train per fold (efficientnet_lite0, simple_cnn, ...) or a model "
                        f"file (.onnx/.safetensors) to score per patient fold (default: {TrainConfig.model})")
    p.add_argument("--out", default="runs/cv", help="folder for the folds' runs and cv.json (default runs/cv)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    _add_config_options(p, skip=CV_OWN)  # each fold's training options

    p = sub.add_parser("check-data", help="counts per class and patient, unreadable files, duplicates, sizes")
    p.add_argument("data")
    p.add_argument("--patients", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("download", help="download the public NIH cell_images.zip and unpack it")
    p.add_argument("dest", help="folder to unpack into")
    p.add_argument("--url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sha256", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("smear", help="whole smear fields: find every red cell, classify it, parasitemia",
                       description="Segment the red cells of whole thin-smear field images (files and folders; a "
                                   "folder of fields is one sample), classify each cell with the model, and report "
                                   "counts and parasitemia with a 95 percent Wilson interval per field and pooled. "
                                   "Cells flagged 'not a cell' are counted apart and left out of the parasitemia.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="field images (jpg, png, tif, ...) or folders of them")
    p.add_argument("--model", default=None,
                   help="ONNX model (e.g. one made by adapt), " + NAMES_HELP + "; default: robust")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write {fields: [{image, width, height, cells: [{box, label, p_parasitized, ood}], n_cells, "
                        "n_parasitized, parasitemia, parasitemia_ci95, ...}], summary: {...}}")
    p.add_argument("--csv", default=None, metavar="CELLS.csv", help="one row per cell: image,cell,x0,y0,x1,y1,label,"
                                                                     "p_parasitized,ood,border")
    p.add_argument("--overlays", default=None, metavar="DIR",
                   help="write each field with its cells drawn (parasitized bold red with p) and the counts")
    p.add_argument("--cell-diameter", type=float, default=None, metavar="PX",
                   help="typical red-cell diameter in pixels (default: estimated from each image)")
    p.add_argument("--rbc-per-ul", type=float, default=None, metavar="N",
                   help="red cells per microlitre of blood (e.g. 5000000): also report parasites/uL")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="cells per network batch (default 128)")
    _add_ray_options(p, ", one field per task", "one row per field (counts + the whole record as JSON)")

    p = sub.add_parser("adapt", help="site calibration: refit T, threshold and not-a-cell threshold on your cells",
                       description="Write a copy of a model calibrated on a small labelled folder of your lab's own "
                                   "cells (Parasitized/ and Uninfected/ subfolders, at least 20 cells and 5 of each "
                                   "class): temperature, threshold and not-a-cell threshold are refitted; the "
                                   "network is unchanged. Use the result with --model in predict, smear and serve.")
    p.add_argument("--data", required=True, help="folder with Parasitized/ and Uninfected/ cell images of your lab")
    p.add_argument("--out", required=True, help="the new model file (.onnx)")
    p.add_argument("--model", default=None, help="ONNX model to calibrate, " + NAMES_HELP + "; default: nih")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="choose the threshold reaching this sensitivity on your cells (default: the model's own, "
                        "moved only as far as your cells show it is off)")

    p = sub.add_parser("cut-cells", help="labelled cell images cut from annotated fields (IML_Malaria JSON)",
                       description="Cut the boxed cells of annotated whole fields into Parasitized/ and Uninfected/ "
                                   "folders (+ patients.csv: file,field), as a person crops them (box) and as the "
                                   "whole-field pipeline masks them (mask): data for train, evaluate and adapt.")
    p.add_argument("--fields", required=True, help="folder of field images")
    p.add_argument("--annotations", required=True, help="JSON list of {image_name, objects: [{type, bbox}]}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--only", nargs="*", default=None, metavar="PREFIX", help="only fields whose name starts so")
    p.add_argument("--mode", nargs="+", default=["box", "mask"], choices=["box", "mask"])
    p.add_argument("--max-uninfected-per-field", type=int, default=0, help="subsample uninfected cells (0 = all)")

    p = sub.add_parser("serve", help="web app + REST API (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="ONNX model for single cells, " + NAMES_HELP + "; default: nih")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="comma-separated Host headers to answer (e.g. localhost,127.0.0.1), against DNS "
                        "rebinding; default: MALARIA_DETECT_ALLOWED_HOSTS, else any")

    p = sub.add_parser("benchmark", help="latency and throughput: ONNX fp32, ONNX int8, PyTorch")
    p.add_argument("--model", default=None, help="ONNX model file, " + NAMES_HELP + "; default: nih")
    p.add_argument("--int8-model", default=None, help="int8 ONNX model to compare (default: the bundled one)")
    p.add_argument("--checkpoint", default=None, help="torch checkpoint for the PyTorch eager column")
    p.add_argument("--sample", default=None, help="labelled image folder (default: the bundled sample)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    for p in sub.choices.values():  # --debug after the command too (there it can only switch it on)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return ap


# ---------------------------------------------------------------- commands

def _check_outputs(a) -> None:
    """Refuse unusable --csv / --heatmaps destinations before any image is predicted."""
    if a.heatmaps:
        if Path(a.heatmaps).exists() and not Path(a.heatmaps).is_dir():
            raise SystemExit(f"error: --heatmaps {a.heatmaps}: exists and is not a folder")
        try:
            Path(a.heatmaps).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: --heatmaps {a.heatmaps}: cannot create the folder ({e.strerror or e})") from None
    if a.csv:
        out = Path(a.csv)
        if out.is_dir():
            raise SystemExit(f"error: --csv {a.csv}: is a folder; give a file name")
        if not out.parent.is_dir():
            raise SystemExit(f"error: --csv {a.csv}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise SystemExit(f"error: --csv {a.csv}: not writable")


def cmd_predict(a):
    from tqdm import tqdm

    from ..cells.heatmaps import heatmap_overlay
    from ..cells.predictor import Predictor
    from ..counting import tally
    from ..imaging import iter_image_paths

    if a.ray and a.heatmaps:
        raise SystemExit("error: --heatmaps is not available with --ray; run without --ray for heatmaps")
    if not a.ray and (a.parquet or a.ray_cpus):
        raise SystemExit("error: --parquet and --ray-cpus go with --ray")
    _check_outputs(a)
    pred = Predictor.load(a.model)  # (with --ray too: its record names the classes in the summary)
    if a.ray:  # the same rows from a Ray actor pool (scale.py); the rest of this command is shared
        from ..scale import predict_ray

        results = predict_ray(a.paths, address=a.ray, model=a.model, batch_size=a.batch_size, tta=a.tta,
                              num_cpus=a.ray_cpus, parquet=a.parquet, progress=not a.json)
    else:
        paths = list(iter_image_paths(a.paths))
        if not paths:
            raise SystemExit("error: no images found in " + " ".join(a.paths))
        with tqdm(total=len(paths), desc="predicting", unit="img", disable=a.json or not sys.stderr.isatty()) as bar:
            results = pred.predict(paths, batch_size=a.batch_size, tta=a.tta, heatmaps=bool(a.heatmaps),
                                   workers=a.workers, progress=bar)
    heatmaps = [None] * len(results)
    if a.heatmaps:
        for i, r in enumerate(results):
            if r.cam is not None:
                heatmaps[i] = Path(a.heatmaps) / f"{i:05d}_{Path(r.source).stem}_heatmap.png"
                heatmap_overlay(r.source, r.cam, pred.record.temperature).save(heatmaps[i])
    extra = (lambda i, empty: {"heatmap": str(heatmaps[i]) if heatmaps[i] else empty}) if a.heatmaps else \
        (lambda i, empty: {})
    if a.csv:  # strings only in CSV
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", "p_parasitized", "ood", "error"]
                               + ["heatmap"] * bool(a.heatmaps))
            w.writeheader()
            w.writerows({k: csv_safe(v) for k, v in (r.row() | extra(i, "")).items()} for i, r in enumerate(results))
    rec = pred.record
    t = tally(((r.label, r.ood) for r in results), rec.positive)  # the one counting rule (also smear's)
    summary = {"images": t["n"], rec.positive: t["n_positive"], rec.negative: t["n_classified"] - t["n_positive"],
               "parasitized_fraction": t["fraction"], "not_a_cell": t["n_not_a_cell"], "errors": t["n_unlabelled"]}
    if a.json:  # typed: numbers, booleans and null as such
        print(json.dumps({"results": [r.to_dict() | extra(i, None) for i, r in enumerate(results)],
                          "summary": summary}, indent=1))
    else:
        if not a.csv or len(results) <= 20:
            for r in results:
                msg = f"ERROR {r.error}" if r.error else \
                    f"{r.label:<12} p={r.p_parasitized:.3f}" + ("  NOT A CELL?" if r.ood else "")
                print(f"{r.source}\t{msg}")
        frac = f"{t['fraction']:.1%}" if t["fraction"] is not None else "n/a"
        print(f"\n{_plural(t['n'], 'image')}: {t['n_positive']} {rec.positive}, "
              f"{t['n_classified'] - t['n_positive']} {rec.negative} (parasitized fraction {frac} of the "
              f"{_plural(t['n_classified'], 'cell')}); {t['n_not_a_cell']} flagged as not a cell (left out of the "
              f"fraction); {t['n_unlabelled']} unreadable"
              + (f"\nresults written to {a.csv}" if a.csv else "")
              + (f"\nheatmaps written to {a.heatmaps}" if a.heatmaps else ""))
    if t["n_unlabelled"]:
        print(f"error: {t['n_unlabelled']} of {_plural(t['n'], 'input')} missing or unreadable (see their rows)",
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


def cmd_train(a):
    try:
        from ..training.loop import train
    except ImportError as e:
        raise SystemExit(f"error: training needs PyTorch: pip install 'malaria-detect[train]' ({e})") from None
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    cfg.split = list(cfg.split)
    if cfg.head_epochs == 0 and cfg.epochs == 0:
        raise SystemExit("error: nothing to train (--head-epochs 0 --epochs 0)")
    train(cfg, resume=a.resume, progress=sys.stderr.isatty())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: the run is finished and written,
        # but destructors of gloo's worker threads (held by the DDP reducer) can abort the process
        # at exit ("terminate called without an active exception", pytorch/pytorch#190489), which
        # torchrun then reports as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_export(a):
    from ..training.export import export

    r = export(a.checkpoint, a.out, int8=a.int8, target_sensitivity=a.target_sensitivity,
               sample_dir=a.sample, data_dir=a.data, max_int8_drop=a.max_int8_drop / 100)
    print(json.dumps(r, indent=1))
    return 0


def cmd_cv(a):
    from ..evaluation.crossval import cross_validate, format_cv

    options = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if f.name not in (*CV_OWN, "data")}
    r = cross_validate(a.data, a.folds, a.model, a.out, **options)
    print(json.dumps(r) if a.json else format_cv(r))
    return 0


def cmd_check_data(a):
    from ..data import POSITIVE, check_data

    r = check_data(a.data, a.patients, progress=not a.json and sys.stderr.isatty())
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['root']}: {r['n_images']} images, {r['n_patients']} patients")
    for k, v in r["per_class"].items():
        print(f"  {k:<12} {v}")
    infected = sum(1 for c in r["per_patient"].values() if c[POSITIVE])
    print(f"  patients with parasitized cells: {infected}; healthy-only: {r['n_patients'] - infected}")
    if r["patients_without_id"]:
        print(f"  WARNING: {r['patients_without_id']} images have no patient id: splits cannot be patient-disjoint")
    w, h = r["size"]["width"], r["size"]["height"]
    print(f"  width min/median/max {w[0]}/{w[1]:.0f}/{w[2]}, height {h[0]}/{h[1]:.0f}/{h[2]}")
    print(f"  unreadable: {len(r['unreadable'])}")
    for b in r["unreadable"][:20]:
        print(f"    {b['file']}: {b['error']}")
    print(f"  exact duplicate groups (same pixels): {len(r['duplicate_groups'])}, "
          f"with conflicting labels: {len(r['duplicates_with_conflicting_labels'])}")
    for g in r["duplicate_groups"][:10]:
        print("    " + "  =  ".join(g))
    return 0


def cmd_download(a):
    from ..data import NIH_SHA256, NIH_URL, download

    folder = download(a.dest, a.url or NIH_URL, a.sha256 or NIH_SHA256)
    print(f"dataset ready in {folder}")
    return 0


def cmd_serve(a):
    from ..serve.app import run

    run(model=a.model, host=a.host, port=a.port, allowed_hosts=a.allowed_hosts)
    return 0


def cmd_benchmark(a):
    from ..evaluation.speed import format_benchmark, run_benchmark

    r = run_benchmark(a.model, a.int8_model, a.checkpoint, a.sample)
    print(json.dumps(r, indent=1) if a.json else format_benchmark(r))
    return 0


def cmd_smear(a):
    from tqdm import tqdm

    from ..cells.predictor import Predictor
    from ..fields.analysis import SmearOptions, analyze_fields
    from ..fields.overlay import draw_overlay
    from ..fields.report import write_csv
    from ..imaging import iter_image_paths
    from ..modelfile import bundled_field_model_path

    if a.cell_diameter is not None and not 6 <= a.cell_diameter <= 2000:
        raise SystemExit("error: --cell-diameter must be between 6 and 2000 pixels")
    if a.ray and a.overlays:
        raise SystemExit("error: --overlays is not available with --ray; run without --ray for overlays")
    if not a.ray and (a.parquet or a.ray_cpus):
        raise SystemExit("error: --parquet and --ray-cpus go with --ray")
    for out in (a.json, a.csv):
        if out and not Path(out).resolve().parent.is_dir():
            raise SystemExit(f"error: the folder of {out} does not exist")
    if a.overlays:
        if Path(a.overlays).exists() and not Path(a.overlays).is_dir():
            raise SystemExit(f"error: --overlays {a.overlays} is a file, not a folder")
        Path(a.overlays).mkdir(parents=True, exist_ok=True)
    opts = SmearOptions(cell_diameter=a.cell_diameter, batch_size=a.batch_size, rbc_per_ul=a.rbc_per_ul)
    model = a.model or str(bundled_field_model_path())
    if a.ray:  # the same report from a Ray actor pool (scale.py); the rest of this command is shared
        from ..scale import analyze_fields_ray

        report = analyze_fields_ray(a.paths, address=a.ray, model=model, opts=opts, num_cpus=a.ray_cpus,
                                    parquet=a.parquet)
    else:
        pred = Predictor.load(model)
        paths = list(iter_image_paths(a.paths))
        if not paths:
            raise SystemExit("error: no images found in " + " ".join(a.paths))

        def overlay(i, path, rec):
            if a.overlays and "error" not in rec:
                out = Path(a.overlays) / f"{i:04d}_{path.stem}_overlay.png"
                draw_overlay(path, rec, pred.record.positive).save(out)
                rec["overlay"] = str(out)

        with tqdm(total=len(paths), desc="fields", unit="field", disable=not sys.stderr.isatty()) as bar:
            report = analyze_fields(pred, paths, opts, progress=bar, on_field=overlay)
    fields = report["fields"]
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.csv:
        write_csv(report, a.csv)
    for f in fields:
        pm = f["parasitemia"]
        what = f"ERROR {f['error']}" if "error" in f else (
            f"{f['n_cells']} cells, {f['n_parasitized']} parasitized, {f['n_not_a_cell']} not a cell, parasitemia "
            + (f"{pm:.2%} [{f['parasitemia_ci95'][0]:.2%}, {f['parasitemia_ci95'][1]:.2%}]" if pm is not None
               else f"n/a ({f.get('note', 'no classified cell')})"))
        print(f"{f['image']}\t{what}")
    s = report["summary"]
    pm = s["parasitemia"]
    print(f"\n{_plural(s['n_fields'], 'field')}: {s['n_cells']} cells, {s['n_parasitized']} parasitized, "
          f"{s['n_not_a_cell']} not a cell; parasitemia " + (f"{pm:.2%} (95% CI {s['parasitemia_ci95'][0]:.2%}-"
                                           f"{s['parasitemia_ci95'][1]:.2%})" if pm is not None else "n/a")
          + (f", {s['parasites_per_ul']:,} parasites/uL" if "parasites_per_ul" in s else "")
          + (f"; {s['n_errors']} unreadable" if s["n_errors"] else "")
          + (f"\nnote: {s['note']}" if "note" in s else "")
          + (f"\nJSON written to {a.json}" if a.json else "") + (f"\nCSV written to {a.csv}" if a.csv else "")
          + (f"\noverlays written to {a.overlays}" if a.overlays else ""))
    return 1 if s["n_errors"] else 0


def cmd_adapt(a):
    from ..evaluation.adapt import adapt

    r = adapt(a.data, a.out, a.model, a.target_sensitivity, progress=sys.stderr.isatty())
    b, s = r["in_sample_before"], r["in_sample_after"]
    print(f"calibrated on {r['n_files']} cells ({r['n_parasitized']} parasitized, {r['n_uninfected']} uninfected) "
          f"of {r['data']}\n"
          f"  temperature {r['before']['temperature']:.3f} -> {r['after']['temperature']:.3f}, threshold "
          f"{r['before']['threshold']:.3f} -> {r['after']['threshold']:.3f} ({r['threshold_rule']})\n"
          f"  on these cells (in-sample, optimistic): sensitivity {b['sensitivity']:.3f} -> {s['sensitivity']:.3f}, "
          f"specificity {b['specificity']:.3f} -> {s['specificity']:.3f}; flagged not-a-cell "
          f"{r['ood_flagged_before']:.1%} -> {r['ood_flagged_after']:.1%}\n"
          f"model written to {r['out']}: use it with --model (predict, smear, serve, evaluate)")
    return 0


def cmd_cut_cells(a):
    from tqdm import tqdm

    from ..data.cutcells import cut_cells

    with tqdm(desc="fields", unit="field", disable=not sys.stderr.isatty()) as bar:
        r = cut_cells(a.fields, a.annotations, a.out, a.only, tuple(a.mode), a.max_uninfected_per_field,
                      progress=bar)
    print(f"{r['fields']} fields -> {r['Parasitized']} Parasitized and {r['Uninfected']} Uninfected cell images "
          f"in {a.out} (patients.csv: file,field)")
    for e in r["errors"]:
        print(f"  warning: {e}")
    return 0


COMMANDS = {"predict": cmd_predict, "evaluate": cmd_evaluate, "train": cmd_train, "export": cmd_export,
            "cv": cmd_cv, "check-data": cmd_check_data, "download": cmd_download, "serve": cmd_serve,
            "benchmark": cmd_benchmark, "smear": cmd_smear, "adapt": cmd_adapt,
            "cut-cells": cmd_cut_cells}


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 2
    from ..errors import MalariaDetectError

    warnings.simplefilter("always", UserWarning)
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"WARNING: {msg}\n"
    try:
        return COMMANDS[a.command](a)
    except MalariaDetectError as e:  # the project's own errors: one line. Anything else is a bug: a traceback
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
