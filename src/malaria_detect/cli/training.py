"""Commands that build and check models and data: train, export, cv, check-data, download."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from ..training.config import DetConfig, HeadsConfig, TrainConfig
from . import options as O

# TrainConfig fields that `cv` sets itself (per fold) or has its own option for
CV_OWN = ("out", "model", "split", "split_file")


def add_parsers(sub) -> dict:
    p = sub.add_parser("train", help="train a model (transfer learning or the scratch baseline)")
    O.add_config_options(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out from its last epoch")

    p = sub.add_parser("export", help="checkpoint -> ONNX (+ int8), re-validated with ONNX Runtime")
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors checkpoint")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--int8", action="store_true", help="write a statically quantized int8 model")
    p.add_argument("--data", default=None, help="training data folder (validation patients for --int8 and "
                                                "--target-sensitivity, and for re-validation)")
    p.add_argument("--sample", default=None, help="folder of images to re-validate ONNX vs PyTorch on")
    p.add_argument("--target-sensitivity", type=O.fraction, default=None,
                   help="choose the threshold that reaches this sensitivity on the validation patients")
    p.add_argument("--max-int8-drop", type=float, default=0.5,
                   help="refuse an int8 model whose validation accuracy drops by more points than this (0.5)")

    p = sub.add_parser("cv", help="patient-grouped k-fold cross-validation (mean +- sd of every metric)")
    p.add_argument("--folds", type=int, default=5, help="number of patient folds (default 5)")
    p.add_argument("--model", default=TrainConfig.model,
                   help="an architecture to train per fold (efficientnet_lite0, simple_cnn, ...) or a model "
                        f"file (.onnx/.safetensors) to score per patient fold (default: {TrainConfig.model})")
    p.add_argument("--out", default="runs/cv", help="folder for the folds' runs and cv.json (default runs/cv)")
    O.add_json_flag(p)
    O.add_config_options(p, skip=CV_OWN)  # each fold's training options

    p = sub.add_parser("check-data", help="counts per class and patient, unreadable files, duplicates, sizes")
    p.add_argument("data")
    p.add_argument("--patients", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("download", help="download the public NIH cell_images.zip and unpack it")
    p.add_argument("dest", help="folder to unpack into")
    p.add_argument("--url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sha256", default=None, help=argparse.SUPPRESS)
    return {"train": cmd_train, "export": cmd_export, "cv": cmd_cv, "check-data": cmd_check_data,
            "download": cmd_download, **add_detector_parsers(sub)}


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
    from ..data import check_data, format_check

    r = check_data(a.data, a.patients, progress=not a.json and sys.stderr.isatty())
    print(json.dumps(r, indent=1) if a.json else format_check(r))
    return 0


def cmd_download(a):
    from ..data import NIH_SHA256, NIH_URL, download

    folder = download(a.dest, a.url or NIH_URL, a.sha256 or NIH_SHA256)
    print(f"dataset ready in {folder}")
    return 0


def add_detector_parsers(sub) -> dict:

    p = sub.add_parser("train-detector", help="train the whole-field object detector (red cells, white cells, "
                                              "platelets) on annotated fields of several labs",
                       description="Train the centre-heatmap detector on IML_Malaria (PA171690-769) and TXL-PBC "
                                   "train fields, chosen on IML PA171770-799 and TXL-PBC val; checkpoints every "
                                   "--val-every steps, --resume continues a killed run (needs the [train] extra).")
    O.add_config_options(p, config=DetConfig)
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out from its last checkpoint")
    p = sub.add_parser("export-detector", help="a trained detector run -> ONNX with its record")
    p.add_argument("--run", required=True, help="the run folder of train-detector")
    p.add_argument("--out", required=True, help="output .onnx path")
    p = sub.add_parser("train-heads", help="one classifier for every object (red cell + stage, white cell, "
                                           "platelet, other) on a cell model's backbone",
                       description="Fit the parasitized, kind and stage heads on the features of a cell model "
                                   "(default: the robust one), from NIH cells, IML cells, TXL-PBC objects and "
                                   "look-alikes made on purpose (platelets on red cells, precipitate, dust, "
                                   "white-cell fragments); with --finetune-epochs, the heads then train end to end "
                                   "with a copy of the model's last stages for the whole-field path (single cells "
                                   "keep the model's own head). Writes OUT/model.onnx with its record (needs the "
                                   "[train] extra). Choices are made on validation data only.")
    O.add_config_options(p, config=HeadsConfig)
    p.add_argument("--resume", action="store_true", help="reuse the crops, features and fine-tuning epochs already "
                                                         "in --out")
    p = sub.add_parser("field-threshold", help="choose a model's whole-field operating point on validation fields "
                                               "of two labs and store it in the model",
                       description="Analyse an IML validation block (--iml-block, default PA171770-799) and the "
                                   "malaria-free TXL-PBC val fields once; store the threshold with the best "
                                   "infected-cell F1 on IML among those with at most --max-fp false parasitized "
                                   "per 1,000 red cells on TXL-PBC; then, for a model with a cell head beside its "
                                   "whole-field head (anylab), the second opinion: from which whole-field p under "
                                   "that threshold the cell head is asked, and from which of its p a cell is then "
                                   "parasitized (the best IML F1 that adds no false call on TXL-PBC).")
    p.add_argument("model", help="the .onnx model to set (its record is rewritten in place)")
    p.add_argument("--data", default="../shared/data", help="folder holding iml-fields/ and txl-pbc/")
    p.add_argument("--detector", default="bundled", help="the object detector smear uses with this model "
                                                         "('bundled', an .onnx file, or 'classical')")
    p.add_argument("--max-fp", type=float, default=0.5, help="false parasitized per 1,000 red cells allowed on TXL-PBC")
    p.add_argument("--iml-block", default="PA171770-799", help="the IML validation block (one the model did not learn "
                                                               "from; never PA171830-899)")
    p.add_argument("--no-second-opinion", action="store_true", help="choose the threshold only (any second opinion "
                                                                     "the record had is removed)")
    O.add_json_flag(p, "print the whole threshold table as JSON")
    p = sub.add_parser("recipe", help="how a bundled model is rebuilt: its data, augmentation, schedule, operating "
                                      "points and the commands (--run runs them)")
    p.add_argument("name", nargs="?", default=None, help="the recipe (leave out to list them)")
    p.add_argument("--run", action="store_true", help="run the steps in order (a step that can resume, resumes)")
    return {"train-detector": cmd_train_detector, "export-detector": cmd_export_detector,
            "train-heads": cmd_train_heads, "field-threshold": cmd_field_threshold, "recipe": cmd_recipe}


def _recipes() -> dict:
    from importlib import resources

    import tomllib

    folder = resources.files("malaria_detect") / "recipes"
    return {f.name.removesuffix(".toml"): tomllib.loads(f.read_text())
            for f in folder.iterdir() if f.name.endswith(".toml")}


def cmd_recipe(a):
    import subprocess

    recipes = _recipes()
    if a.name is None:
        for name, r in sorted(recipes.items()):
            print(f"{name}\t{r['model']}: {r['summary']}")
        return 0
    if a.name not in recipes:
        raise SystemExit(f"error: no recipe {a.name!r} (there are: {', '.join(sorted(recipes))})")
    r = recipes[a.name]
    print(f"# {r['name']}: {r['model']} -- {r['summary']}")
    for part in ("data", "augmentation", "schedule", "operating_points"):
        for k, v in r.get(part, {}).items():
            print(f"# {part} / {k}: {v}")
    for i, step in enumerate(r["steps"], 1):
        print(f"\n# step {i}: {step['what']}\n{step['run']}")
        if a.run:
            cmd = step["run"]
            out = cmd.split("--out ")[1].split()[0] if "--out " in cmd else None
            if step.get("resume") and out and Path(out).is_dir() and any(Path(out).iterdir()):
                cmd += " " + step["resume"]
            rc = subprocess.call(cmd, shell=True)
            if rc:
                print(f"error: step {i} failed (exit status {rc}); run the recipe again to continue", file=sys.stderr)
                return rc
    return 0


def cmd_field_threshold(a):
    from ..evaluation.operating import choose_field_threshold
    from ..modelfile import BUNDLED_NAMES, bundled_model_path, detector_path

    if not Path(a.model).is_file():
        raise SystemExit(f"error: {a.model}: no such model file")
    if Path(a.model).resolve().parent == bundled_model_path().resolve().parent:
        raise SystemExit(f"error: {a.model} is a bundled model (its sha256 is checked at every load): set a copy, "
                         f"e.g. runs/NAME/model.onnx, then bundle it ({', '.join(BUNDLED_NAMES)})")
    if a.detector != "classical" and not detector_path(a.detector).is_file():
        raise SystemExit(f"error: --detector {a.detector}: no such file (give 'bundled', 'classical' or an "
                         "export-detector file)")

    out = choose_field_threshold(a.model, a.data, None if a.detector == "classical" else a.detector, a.max_fp,
                                 say=lambda m: print(m, file=sys.stderr if a.json else sys.stdout), iml=a.iml_block,
                                 second_opinion=not a.no_second_opinion)
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


def cmd_train_heads(a):
    from ..training.headsrun import train_heads

    cfg = HeadsConfig(**{f.name: getattr(a, f.name) for f in fields(HeadsConfig)})
    print(f"model written to {train_heads(cfg, resume=a.resume)}")
    return 0


def cmd_train_detector(a):
    from ..training.detector import train_detector

    cfg = DetConfig(**{f.name: getattr(a, f.name) for f in fields(DetConfig)})
    print(f"best checkpoint: {train_detector(cfg, resume=a.resume, progress=True)}")
    return 0


def cmd_export_detector(a):
    from ..training.detector import export_detector

    print(f"detector written to {export_detector(a.run, a.out)}")
    return 0
