"""Refit a model's not-a-cell flag on stain-varied cells, keeping its classifier and record.

    .venv/bin/python recipes/robust/refit_not_a_cell.py runs/robust112 \\
        src/malaria_detect/assets/malaria_lite0_robust.onnx --views 2 --out runs/robust112_ood

The flag of a model file fitted on its training cells as they are fires on every cell of a lab whose
stain it has not seen. This refits its Gaussians on the same training cells plus `--views`
`training.augment.lab_stain` views of each (broad stain, colour and background variation) and sets its
threshold so that 99 % of the validation cells, and one stain view of each, pass. The weights, the
temperature and the thresholds of `record_from` (the model file whose record is kept) do not change.

With `--fields`, it also fits the view check (`training.notacell.fit_view_check`): single training cells (and a
stain view of each) against windows of the IML *training* fields (2.5-4.5 median cell sides across:
several cells, or mostly background) and mosaics of NIH training cells, each also as a stain view.
With `--loose-per-field N`, N cells of each training field cut by their box made 1-1.5 times larger
(one cell with parts of its neighbours, as a person cropping loosely gets it) count as single cells
too: without them the check flagged 12 % of 1.4 x box crops of the validation fields (2.7 % with 20).
The fields whose windows are in the non-cell benchmark (samples/fields) are left out of it.

Writes OUT/best.safetensors and OUT/model.onnx (exported and re-validated against torch).
Training and validation cells and training fields only: test patients and held-out fields are not read.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from malaria_detect.cells.predictor import Predictor
from malaria_detect.data.annotations import read_annotations
from malaria_detect.fields.crops import box_crop
from malaria_detect.imaging import resize_uint8
from malaria_detect.training import notacell as O
from malaria_detect.training.checkpoint import load_checkpoint, save_checkpoint
from malaria_detect.training.distributed import Ranks
from malaria_detect.training.export import export
from malaria_detect.training.loop import (
    fit_not_a_cell,
    forward_batches,
    load_data,
    normalization,
    predict_arrays,
    run_config,
)

ROOT = Path(__file__).resolve().parents[2]

TRAIN_FIELDS = [f"PA1716{i}" for i in range(90, 100)] + [f"PA1717{i:02d}" for i in range(70)]  # PA171690-769
BENCHMARK_FIELDS = {p.stem for p in (ROOT / "samples" / "fields").glob("*.JPG")}


def pooled(model, x_uint8: np.ndarray, mean, std, view_seed: int | None = None) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, C) pooled final features (of a lab_stain view when view_seed is set)."""
    view = torch.Generator().manual_seed(view_seed) if view_seed is not None else None
    return np.concatenate([f.mean((2, 3)).cpu().numpy() for f, _ in forward_batches(model, x_uint8, mean, std,
                                                                                    view=view)])


def training_fields(fields: Path):
    """(image, boxes) of each IML training field, leaving out those of the non-cell benchmark."""
    anns = {a["image_name"]: a for a in read_annotations(fields / "annotations.json")}
    for name in TRAIN_FIELDS:
        if name in BENCHMARK_FIELDS or f"{name}.JPG" not in anns:
            continue
        yield Image.open(fields / "images" / f"{name}.JPG").convert("RGB"), anns[f"{name}.JPG"]["boxes"]


def field_windows(fields: Path, size: int, per_field: int, rng) -> np.ndarray:
    """Random windows of the training fields, 2.5-4.5 median cell sides across."""
    out = []
    for im, boxes in training_fields(fields):
        boxes = np.array(boxes)
        cell = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
        for _ in range(per_field):
            side = int(cell * rng.uniform(2.5, 4.5))
            x, y = rng.integers(0, im.width - side), rng.integers(0, im.height - side)
            out.append(resize_uint8(im.crop((x, y, x + side, y + side)), size))
    return np.stack(out)


def loose_crops(fields: Path, size: int, per_field: int, rng, scale=(1.0, 1.5)) -> np.ndarray:
    """Cells of the training fields cut by their box made 1.0-1.5 times larger: one cell, with parts of
    its neighbours, as a person cropping loosely gets it (single cells for the view check)."""
    out = []
    for im, boxes in training_fields(fields):
        for j in rng.choice(len(boxes), min(per_field, len(boxes)), replace=False):
            out.append(resize_uint8(box_crop(im, boxes[j], float(rng.uniform(*scale))), size))
    return np.stack(out)


def mosaics(x_cells: np.ndarray, n: int, rng) -> np.ndarray:
    """Grids of 2x2 or 3x3 training cells (several cells in one image)."""
    s = x_cells.shape[1]
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 4))
        t = s // k
        m = np.zeros((s, s, 3), np.uint8)
        for j in range(k * k):
            c = Image.fromarray(x_cells[rng.integers(len(x_cells))]).resize((t, t))
            m[(j // k) * t:(j // k + 1) * t, (j % k) * t:(j % k + 1) * t] = np.asarray(c)
        out.append(m)
    return np.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="training run folder (config.json, split.json, best.safetensors)")
    ap.add_argument("record_from", help="model file (.onnx) whose record (temperature, thresholds) is kept")
    ap.add_argument("--views", type=int, default=2, help="stain views of each fitting cell")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--fields", default=None, help="IML fields folder (images/, annotations.json): fit the view check")
    ap.add_argument("--windows-per-field", type=int, default=12)
    ap.add_argument("--loose-per-field", type=int, default=0,
                    help="also give the view check this many loose box crops (1-1.5 x) per training field as cells")
    ap.add_argument("--data", default=None, help="the training data folder, if not where the run's config says")
    a = ap.parse_args()
    run = Path(a.run)
    cfg = replace(run_config(run, a.data), ood_stain_views=a.views)
    model, _, _ = load_checkpoint(run / "best.safetensors")
    record = Predictor.load(a.record_from).record
    t = time.time()
    data = load_data(cfg, True, Ranks(), print)
    mean, std = normalization(cfg)
    _, f_va = predict_arrays(model, data.xva, mean, std, features=True)
    ood, s_va = fit_not_a_cell(cfg, model, data, f_va)
    before = record.ood_threshold
    record.ood_threshold = O.threshold(s_va)
    s_plain = O.score(ood, f_va)
    record.extra["not_a_cell"] = {
        "fit": f"up to 6,000 training cells + {a.views} lab_stain views of each; threshold: 99 % of the "
               f"validation cells and one stain view of each pass",
        "stain_views": a.views, "threshold_before": before,
        "val_pass_rate": float(np.mean(s_plain <= record.ood_threshold)),
        "val_stain_view_pass_rate": float(np.mean(s_va[len(s_plain):] <= record.ood_threshold)),
        "seconds": round(time.time() - t, 1),
    }
    if a.fields:
        rng = np.random.default_rng(cfg.seed)
        sub = rng.choice(len(data.xtr), min(len(data.xtr), 4000), replace=False)
        win = field_windows(Path(a.fields), cfg.image_size, a.windows_per_field, rng)
        neg = np.concatenate([win, mosaics(data.xtr, len(win) // 2, rng)])
        cells = np.concatenate([pooled(model, data.xtr[sub], mean, std), pooled(model, data.xtr[sub], mean, std, 7)])
        loose = loose_crops(Path(a.fields), cfg.image_size, a.loose_per_field, rng) if a.loose_per_field else None
        if loose is not None:
            cells = np.concatenate([cells, pooled(model, loose, mean, std), pooled(model, loose, mean, std, 10)])
        views = np.concatenate([pooled(model, neg, mean, std), pooled(model, neg, mean, std, 8)])
        val = np.concatenate([pooled(model, data.xva, mean, std), pooled(model, data.xva, mean, std, 9)])
        ood.update(O.fit_view_check(cells, views, record.ood_threshold, val))
        w, b = ood["ood.view.w"].astype(np.float64), float(ood["ood.view.b"][0])
        record.extra["not_a_cell"]["view_check"] = {
            "fit": f"{len(cells)} training cells (half stain views"
                   + (f"; {2 * len(loose)} of them loose box crops of IML training fields" if loose is not None else "")
                   + f") vs {len(views)} views holding several cells or "
                   f"background ({len(win)} windows of {len(win) // a.windows_per_field} IML training fields, "
                   f"{len(neg) - len(win)} mosaics of NIH training cells; half stain views); cut: 99.5 % of the "
                   "validation cells and one stain view of each pass",
            "train_views_caught": float(np.mean(views @ w + b > 0)),
            "val_pass_rate": float(np.mean(val @ w + b <= 0)),
        }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best.safetensors", model, record, ood)
    print(json.dumps(record.extra["not_a_cell"], indent=1), flush=True)
    export(out / "best.safetensors", out / "model.onnx", sample_dir=ROOT / "samples")


if __name__ == "__main__":
    main()
