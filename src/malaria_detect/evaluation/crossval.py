"""Patient-grouped k-fold cross-validation: mean +- sd of every metric over folds.

With an architecture name, one model is trained per fold (needs torch): fold i's patients are the
test set, a tenth of the other patients the validation set, the rest the training set.
With a model file (.onnx / .safetensors) nothing is trained: the fixed model is scored on each
patient fold, which shows how much its figures vary between groups of patients (folds holding
patients it was trained on are flagged as leaked).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import data as D
from ..training.config import TrainConfig
from .metrics import METRIC_NAMES


def cross_validate(data_dir, folds: int = 5, model: str = TrainConfig.model, out="runs/cv", n_boot: int = 0,
                   **options) -> dict:
    """`options`: TrainConfig fields for each fold's training (epochs, image_size, seed, patients_csv, ...;
    their defaults are TrainConfig's). The seed also shuffles the patients into folds."""
    from ..modelfile import model_path
    from .evaluate import Scorer, evaluate

    path = model_path(model)           # a file, a run folder or a bundled model's name; else an architecture
    is_file = path.suffix in (".onnx", ".safetensors") or path.is_dir()
    model = path if is_file else model
    base = TrainConfig(data=str(data_dir), out=str(out), **({} if is_file else {"model": model}), **options)
    seed, patients_csv = base.seed, base.patients_csv
    items = D.find_images(data_dir, patients_csv)
    fold_patients = D.kfold_patients(items, folds, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(model) if is_file else None
    per_fold = []
    for i, test in enumerate(fold_patients):
        if is_file:
            r = evaluate(None, data_dir, patients=test, scorer=scorer, n_boot=n_boot, progress=False)
        else:
            from ..training.loop import train

            rest = sorted(set(p for f in fold_patients for p in f) - set(test))
            inner = D.split_patients(D.select(items, rest), (0.9, 0.1, 0.0), seed + i)
            parts = {"train": inner["train"], "val": inner["val"], "test": test}
            D.assert_disjoint(parts)
            run = out / f"fold{i + 1}"
            run.mkdir(parents=True, exist_ok=True)
            split_file = out / f"fold{i + 1}_split.json"
            D.save_split(parts, split_file, fold=i + 1, folds=folds, seed=seed)
            if not (run / "best.safetensors").exists():
                if (run / "state.json").exists():
                    train(TrainConfig(data=str(data_dir), out=str(run)), resume=True, progress=False)
                else:
                    train(replace(base, out=str(run), split_file=str(split_file)), progress=False)
            r = evaluate(run / "best.safetensors", data_dir, split="test", n_boot=n_boot, progress=False,
                         patients_csv=patients_csv)
        r.pop("per_patient", None)
        r["fold"] = i + 1
        per_fold.append(r)
        print(f"fold {i + 1}/{folds}: accuracy {r['accuracy']:.4f}  auc {r['roc_auc']:.4f}  "
              f"({r['n_patients']} patients, {r['n_images']} images)", file=sys.stderr, flush=True)
    summary = {k: {"mean": float(np.nanmean([f[k] for f in per_fold])),
                   "sd": float(np.nanstd([f[k] for f in per_fold], ddof=1))} for k in METRIC_NAMES}
    leaked = sorted({p for f in per_fold for p in f.get("leaked_patients", [])})
    result = {"model": str(model), "folds": folds, "data": str(data_dir), "summary": summary,
              "per_fold": per_fold, "leaked_patients": leaked}
    (out / "cv.json").write_text(json.dumps(result, indent=1))
    return result


def format_cv(r: dict) -> str:
    lines = [f"{r['folds']}-fold patient-grouped cross-validation of {r['model']} on {r['data']}",
             f"{'metric':<18}{'mean':>8}{'sd':>8}"]
    for k, v in r["summary"].items():
        lines.append(f"{k:<18}{v['mean']:>8.4f}{v['sd']:>8.4f}")
    if r["leaked_patients"]:
        lines.append(f"WARNING: {len(r['leaked_patients'])} scored patients were used to train this model: "
                     f"these figures are NOT honest")
    return "\n".join(lines)
