"""Choose adapt's threshold rule inside the adapt pool, never on the reported fields.

    .venv/bin/python research/adapt_rule.py MODEL.onnx [MODEL.onnx ...] [--draws 40]

The pool is IML block PA1718's fields 00-29 (runs/data/iml_test, box crops; the reported fields
PA171830-899 are not read). Each draw splits the pool's fields in two halves (alternately by parity
and by first/last 15), takes 25/50/100/200 labelled cells of one half (up to half parasitized, as
`benchmarks/other_labs.py` does), refits the temperature as `adapt` does and sets the threshold by
each rule, and measures sensitivity and specificity on the other half's box crops. Rules:

- `the model's own`: its threshold, unmoved in raw-logit units (what no calibration gives);
- `max balanced accuracy`: the threshold maximising it on the labelled cells (adapt's rule until now);
- `near, k cells`: of the thresholds within k cell(s) of each class of the best balanced accuracy, the
  one nearest the model's own (`metrics.threshold_near`); k = 0 only breaks ties towards the model.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np

from malaria_detect import data as D
from malaria_detect.cells.predictor import Predictor
from malaria_detect.evaluation import metrics as M
from malaria_detect.evaluation.adapt import unmoved

ROOT = Path(__file__).resolve().parents[1]


def near(y, p, reference, cells):
    return M.threshold_near(y, p, reference, cells)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--pool", default=str(ROOT / "runs/data/iml_test"))
    ap.add_argument("--pool-fields", type=int, default=30)
    ap.add_argument("--draws", type=int, default=40)
    a = ap.parse_args()
    items = [it for it in D.find_images(a.pool, Path(a.pool) / "patients.csv")
             if it.path.stem.endswith("_box") and int(it.path.stem[6:8]) < a.pool_fields]
    print("| model | labelled cells | rule | sensitivity | specificity (min) |")
    print("|---|---|---|---|---|")
    for path in a.models:
        pred = Predictor.load(path)
        rec = pred.record
        x, y, kept, _ = D.load_arrays(items, rec.input_size, progress=False)
        z = pred.run(x)[0].astype(np.float64)
        field = np.array([int(it.path.stem[6:8]) for it in kept])
        rules = {"the model's own (not moved)": lambda yy, pp, ref: ref,
                 "max balanced accuracy": lambda yy, pp, ref: M.threshold_max_balanced_accuracy(yy, pp),
                 **{f"near, {k} cell(s)": partial(near, cells=k) for k in (0, 1, 2)}}
        rng = np.random.default_rng(0)
        for n in (25, 50, 100, 200):
            res = {r: [] for r in rules}
            for draw in range(a.draws):
                half = int(rng.integers(0, 2))
                in_a = (field % 2 == half) if draw % 2 else ((field < a.pool_fields // 2) == bool(half))
                ia, ib = np.flatnonzero(in_a), np.flatnonzero(~in_a)
                pos, neg = ia[y[ia] == 1], ia[y[ia] == 0]
                n_pos = min(n // 2, len(pos))
                pick = np.r_[rng.choice(pos, n_pos, replace=False), rng.choice(neg, n - n_pos, replace=False)]
                T = M.fit_temperature(z[pick], y[pick])
                p_pick, p_other = M.sigmoid(z[pick] / T), M.sigmoid(z[ib] / T)
                ref = unmoved(rec.threshold, rec.temperature, T)
                for r, fn in rules.items():
                    yes = p_other >= fn(y[pick], p_pick, ref)
                    res[r].append((yes[y[ib] == 1].mean(), (~yes[y[ib] == 0]).mean()))
            for r, v in res.items():
                v = np.array(v)
                print(f"| {Path(path).name} | {n} | {r} | {v[:, 0].mean():.3f} ± {v[:, 0].std():.3f} | "
                      f"{v[:, 1].mean():.4f} ± {v[:, 1].std():.4f} ({v[:, 1].min():.3f}) |")


if __name__ == "__main__":
    main()
