"""Set a model's not-a-cell threshold with an unseen stain as validation, and store it in its record.

    .venv/bin/python scripts/flag_margin.py MODEL.onnx [--max-flagged 0.03] [--write]

The threshold that lets 99 % of the validation cells (and a stain view of each) pass sits just below
the scores of a lab whose stain no training field has: it flagged 25 % of the box crops of the adapt
pool (IML fields PA171800-829, the dark magenta stain; no reported field). This multiplies it by the
smallest margin of a grid (1, 1.25, 1.5, 2, 3) that flags at most `--max-flagged` of the pool's box
and masked cells, and prints what the margin does to the 64 benchmark non-cell images. The reported
fields PA171830-899 are not read. Needs runs/data/iml_test (scripts/robust_training_set.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from non_cells import non_cell_images  # noqa: E402

from malaria_detect import data as D  # noqa: E402
from malaria_detect.predict import Predictor, write_model_record  # noqa: E402
from malaria_detect.preprocess import resize_uint8  # noqa: E402

GRID = (1.0, 1.25, 1.5, 2.0, 3.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--pool", default=str(ROOT / "runs/data/iml_test"), help="cut-cells folder of block PA1718")
    ap.add_argument("--pool-fields", type=int, default=30, help="the first N fields of the block are the pool")
    ap.add_argument("--max-flagged", type=float, default=0.03)
    ap.add_argument("--write", action="store_true", help="store the threshold in the model's record")
    a = ap.parse_args()
    pred = Predictor.load(a.model)
    rec, size = pred.record, pred.record.input_size
    items = [it for it in D.find_images(a.pool, Path(a.pool) / "patients.csv")
             if int(it.path.stem[6:8]) < a.pool_fields]
    scores = {}
    for tag in ("box", "mask"):
        x, _, _, _ = D.load_arrays([it for it in items if it.path.stem.endswith("_" + tag)], size, progress=False)
        scores[tag] = pred.run(x)[2]
    imgs = non_cell_images(ROOT / "samples", ROOT / "samples" / "fields")
    s_nc = pred.run(np.stack([resize_uint8(im, size) for im in imgs.values()]))[2]
    base = rec.extra.get("not_a_cell", {}).get("threshold_validation", rec.ood_threshold)
    print(f"validation threshold {base:.3f}")
    print("| margin | pool box crops flagged | pool masked cells flagged | non-cell images flagged |")
    print("|---|---|---|---|")
    chosen = None
    for m in GRID:
        t = base * m
        fb, fm, fn = (float(np.mean(s > t)) for s in (scores["box"], scores["mask"], s_nc))
        print(f"| {m} | {100 * fb:.1f} % | {100 * fm:.1f} % | {100 * fn:.1f} % |")
        if chosen is None and max(fb, fm) <= a.max_flagged:
            chosen = m
    if chosen is None:
        raise SystemExit(f"no margin in {GRID} flags at most {a.max_flagged:.0%} of the pool")
    print(f"chosen margin {chosen}: not-a-cell threshold {base * chosen:.3f}")
    if a.write:
        rec.extra.setdefault("not_a_cell", {})
        rec.extra["not_a_cell"].update(
            threshold_validation=base, margin=chosen,
            margin_rule=f"smallest of {list(GRID)} flagging <= {a.max_flagged:.0%} of the box and masked cells of "
                        f"IML fields PA171800-{a.pool_fields - 1:02d} (an unseen stain; not the reported fields)")
        rec.ood_threshold = base * chosen
        write_model_record(Path(a.model), rec)
        print(f"stored in {a.model}")


if __name__ == "__main__":
    main()
