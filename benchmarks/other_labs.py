"""Cells from another lab: per-domain accuracy, not-a-cell flag and site calibration (`adapt`).

    .venv/bin/python benchmarks/other_labs.py --models OLD.onnx NEW.onnx [--adapt-model NEW.onnx] [--draws 5]
                                              [--fields-head]   # whole-field heads, where a model has one

Needs the IML cells of the held-out block cut by `malaria-detect cut-cells` (recipes/robust/robust_training_set.py):
    runs/data/iml_test  block PA1718xx, held out from training and every choice. It is split by
                        consecutive number: fields PA171800-829 are the "lab's own labelled cells" that
                        adapt may use; every IML figure below is measured on fields PA171830-899.

Prints, side by side in one run:
1. per domain x model: NIH test patients (4,752 cells), IML held-out cells cut by their boxes
   (background kept, as a person crops them) and IML held-out cells as the whole-field pipeline
   masks them: accuracy, sensitivity, specificity, ROC-AUC, ECE, % flagged not-a-cell;
2. not-a-cell images flagged (photos, noise, solid colours, screenshot, tiled cells, whole smear
   fields, windows of fields holding several cells);
3. the adapt learning curve: 25/50/100/200 labelled cells (half of each class; `--draws` random draws)
   from the PA171770-799 pool -> sensitivity, specificity, ECE on the held-out box crops, mean +- sd.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from malaria_detect import data as D
from malaria_detect.cells.predictor import Predictor
from malaria_detect.evaluation import metrics as M
from malaria_detect.evaluation.adapt import adapt
from malaria_detect.evaluation.noncells import field_windows, non_cell_images

ROOT = Path(__file__).resolve().parents[1]

NIH = ROOT.parent / "shared" / "data" / "nih-cells"


def crops(folder: Path, tag: str) -> list:
    """Items of a cut-cells folder whose file name ends with _{tag}.png (box, mask)."""
    return [it for it in D.find_images(folder, folder / "patients.csv") if it.path.stem.endswith("_" + tag)]


def scores(pred: Predictor, items, fields_head: bool = False) -> dict:
    """Figures of a model on cell crops: its cell head (what `predict` uses), or with `fields_head` the
    whole-field head of a model that has one (object_logits, its temperature and cell threshold)."""
    x, y, _, _ = D.load_arrays(items, pred.record.input_size, progress=False)
    head = pred.record.object_head if fields_head else None
    z, _, s = (pred.run_fields(x) if head else pred.run(x))[:3]
    p = pred.record.probability(z, pred.record.field_temperature if head else None)
    m = M.binary_metrics(y, p, pred.record.field_cell_threshold if head else pred.record.threshold)
    m["ece"] = M.ece(y, p)
    m["ood_rate"] = float(np.mean(s > pred.record.ood_threshold))
    m["n"] = len(y)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="ONNX models to compare")
    ap.add_argument("--adapt-model", default=None, help="model to calibrate with adapt (default: the last)")
    ap.add_argument("--adapt-fields", type=int, default=30, help="the first N held-out fields are the adapt pool")
    ap.add_argument("--iml-test", default=str(ROOT / "runs/data/iml_test"))
    ap.add_argument("--iml-fields", default=str(ROOT.parent / "shared/data/iml-fields"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--fields-head", action="store_true",
                    help="score a model's whole-field head (object_logits) where it has one, instead of its cell head")
    a = ap.parse_args()
    preds = {Path(m).name: Predictor.load(m) for m in a.models}
    first = next(iter(preds.values()))
    nih = D.select(D.find_images(NIH), first.record.extra["split"]["test"])
    nih = [it for it in nih if not it.patient.startswith("IML-")]
    pool_fields = {f"PA1718{i:02d}" for i in range(a.adapt_fields)}
    in_pool = lambda it: it.path.stem[:8] in pool_fields  # noqa: E731
    box, mask = crops(Path(a.iml_test), "box"), crops(Path(a.iml_test), "mask")
    domains = {"NIH test patients": nih,
               f"IML PA1718{a.adapt_fields:02d}-99 (held out), cut by box": [it for it in box if not in_pool(it)],
               f"IML PA1718{a.adapt_fields:02d}-99 (held out), pipeline mask": [it for it in mask if not in_pool(it)]}
    pool = [it for it in box if in_pool(it)]
    eval_box = list(domains.values())[1]
    adapted = {}
    tmp = Path(tempfile.mkdtemp(prefix="adapt-bench-"))
    base_model = a.adapt_model or a.models[-1]
    rng = np.random.default_rng(0)
    curve = {}
    for n in a.sizes:
        rows = []
        for k in range(a.draws):
            folder = tmp / f"n{n}_{k}"
            pos = [it for it in pool if it.label == 1]
            neg = [it for it in pool if it.label == 0]
            chosen = list(rng.choice(len(pos), min(n // 2, len(pos)), replace=False))
            chosen_neg = list(rng.choice(len(neg), n - len(chosen), replace=False))
            for it in [pos[i] for i in chosen] + [neg[i] for i in chosen_neg]:
                d = folder / it.label_name
                d.mkdir(parents=True, exist_ok=True)
                (d / it.path.name).symlink_to(it.path.resolve())
            out = tmp / f"n{n}_{k}.onnx"
            adapt(folder, out, base_model)
            m = scores(Predictor.load(out), eval_box)
            rows.append((m["recall"], m["specificity"], m["ece"], m["ood_rate"]))
            if n == 100 and k == 0:
                adapted[f"{Path(base_model).name} + adapt on 100 IML cells"] = Predictor.load(out)
        curve[n] = np.array(rows)
    print("| domain | model | cells | accuracy | sensitivity | specificity | ROC-AUC | ECE | flagged not-a-cell |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dname, items in domains.items():
        for mname, pred in {**preds, **adapted}.items():
            m = scores(pred, items, a.fields_head)
            print(f"| {dname} | {mname} | {m['n']} | {m['accuracy']:.4f} | {m['recall']:.4f} | "
                  f"{m['specificity']:.4f} | {m['roc_auc']:.4f} | {m['ece']:.3f} | {100 * m['ood_rate']:.1f}% |")
    imgs = non_cell_images(ROOT / "samples", ROOT / "samples" / "fields")
    print(f"\nnot-a-cell images flagged ({len(imgs)} images: photos, crops, noise, solid colours, screenshot, "
          "tiled cells, 4 whole IML fields, 16 windows of them holding several cells):")
    for mname, pred in {**preds, **adapted}.items():
        res = pred.predict(list(imgs.values()), names=list(imgs))
        missed = [r.source for r in res if not r.ood]
        print(f"- {mname}: {100 * (len(res) - len(missed)) / len(res):.1f}% flagged"
              + (f"; not flagged: {', '.join(missed)}" if missed else ""))
    fields = Path(a.iml_fields) / "images"
    held = sorted(p for p in fields.glob("PA1718*.JPG") if int(p.stem[6:8]) >= a.adapt_fields)
    wrng = np.random.default_rng(1)
    windows = {}
    for p in held:
        windows.update(field_windows(Image.open(p).convert("RGB"), p.stem, (200, 260), wrng))
    print(f"\nwindows of the held-out fields ({len(windows)}: 2 per field of PA1718{a.adapt_fields:02d}-99, 200 and "
          "260 px, 2.5-3.5 cells across: an unseen stain's several-cell crops) flagged:")
    for mname, pred in {**preds, **adapted}.items():
        res = pred.predict(list(windows.values()), names=list(windows))
        print(f"- {mname}: {100 * np.mean([r.ood for r in res]):.1f}% flagged")
    print(f"\nadapt learning curve ({base_model}; {a.draws} draws of labelled cells, up to half parasitized, "
          f"from fields PA171800-{a.adapt_fields - 1:02d}; measured on the box crops of the other held-out fields):")
    print("| labelled cells | sensitivity | specificity | ECE | flagged not-a-cell |")
    print("|---|---|---|---|---|")
    for n, r in curve.items():
        mu, sd = r.mean(0), r.std(0)
        print(f"| {n} | {mu[0]:.3f} ± {sd[0]:.3f} | {mu[1]:.3f} ± {sd[1]:.3f} | {mu[2]:.3f} ± {sd[2]:.3f} | "
              f"{100 * mu[3]:.1f}% |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
