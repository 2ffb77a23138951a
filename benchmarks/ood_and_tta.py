"""Not-a-cell rejection and test-time augmentation of the bundled model, on held-out patients.

    .venv/bin/python benchmarks/ood_and_tta.py --data ../shared/data/nih-cells

Prints two tables:
  1. the fraction flagged `ood` among non-cell images (malaria_detect.evaluation.noncells) and among the
     held-out test patients' cells (which should pass);
  2. accuracy / AUC / time on the test patients without and with 8-view TTA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from malaria_detect import data as D
from malaria_detect.cells.predictor import Predictor
from malaria_detect.evaluation import metrics as M
from malaria_detect.evaluation.noncells import non_cell_images

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nih-cells"))
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    pred = Predictor.load(a.model)
    rec = pred.record
    imgs = non_cell_images(ROOT / "samples")
    res = pred.predict(list(imgs.values()), names=list(imgs))
    missed = [r.source for r in res if not r.ood]
    items = D.select(D.find_images(a.data), rec.extra["split"]["test"])
    x, y, _, _ = D.load_arrays(items, rec.input_size, progress=False)
    t = time.perf_counter()
    z, _, s = pred.run(x)
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    z_tta, _, _ = pred.run_tta(x)
    t_tta = time.perf_counter() - t
    flagged_cells = float((s > rec.ood_threshold).mean())
    print(f"not-a-cell threshold {rec.ood_threshold:.1f} (passes 99% of validation cells)")
    print("| input set | images | flagged not-a-cell |")
    print("|---|---|---|")
    print(f"| non-cell images (photos, crops, noise, solid colours, screenshot, smear field) | {len(res)} | "
          f"{100 * (len(res) - len(missed)) / len(res):.1f}% |")
    print(f"| held-out test-patient cells | {len(x)} | {100 * flagged_cells:.1f}% |")
    if missed:
        print("not flagged: " + ", ".join(missed))
    print()
    print("| inference | accuracy | sensitivity | specificity | ROC-AUC | seconds | ms/cell |")
    print("|---|---|---|---|---|---|---|")
    for name, zz, tt in (("single view", z, t_plain), ("TTA, 8 flips/rotations", z_tta, t_tta)):
        m = M.binary_metrics(y, pred.probability(zz), rec.threshold)
        print(f"| {name} | {m['accuracy']:.4f} | {m['recall']:.4f} | {m['specificity']:.4f} | {m['roc_auc']:.4f} | "
              f"{tt:.1f} | {1e3 * tt / len(x):.2f} |")
    print(f"({len(x)} cells of {len(set(it.patient for it in items))} test patients)")


if __name__ == "__main__":
    main()
