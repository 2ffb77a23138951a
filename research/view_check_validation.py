"""Compare not-a-cell flags on the validation fields only: how often they flag cells cut loosely.

    .venv/bin/python research/view_check_validation.py MODEL.onnx [MODEL.onnx ...]

For each model: the share flagged of 20 cells per validation field (IML PA171770-799; never
trained on) cut by their box x 1.0 / 1.2 / 1.4 / 1.7 (more and more of the neighbours in view),
of 4 windows per field 200-400 px across (several cells: must be flagged) and of the 64 non-cell
benchmark images. Used to keep the view check's loose crops (recipes/robust/refit_not_a_cell.py
--loose-per-field): loosely cut cells flagged less, while the windows and non-cell images stay flagged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from malaria_detect.cells.predictor import Predictor
from malaria_detect.data.annotations import read_annotations
from malaria_detect.evaluation.noncells import field_windows, non_cell_images
from malaria_detect.fields.crops import box_crop
from malaria_detect.imaging import resize_uint8

ROOT = Path(__file__).resolve().parents[1]

VAL_FIELDS = [f"PA1717{i:02d}" for i in range(70, 100)]
SCALES = (1.0, 1.2, 1.4, 1.7)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--fields", default=str(ROOT.parent / "shared/data/iml-fields"))
    a = ap.parse_args()
    fields = Path(a.fields)
    anns = {r["image_name"]: r for r in read_annotations(fields / "annotations.json")}
    size = Predictor.load(a.models[0]).record.input_size
    rng, wrng = np.random.default_rng(0), np.random.default_rng(1)
    sets: dict[str, list] = {f"cells x {s}": [] for s in SCALES}
    sets["windows of several cells"] = []
    for name in VAL_FIELDS:
        rec = anns.get(f"{name}.JPG")
        if rec is None:
            continue
        img = Image.open(fields / "images" / rec["image_name"]).convert("RGB")
        for j in rng.choice(len(rec["boxes"]), min(20, len(rec["boxes"])), replace=False):
            for s in SCALES:
                sets[f"cells x {s}"].append(resize_uint8(box_crop(img, rec["boxes"][j], s), size))
        for sides in ((200, 260), (320, 400)):
            sets["windows of several cells"] += [resize_uint8(w, size)
                                                 for w in field_windows(img, name, sides, wrng).values()]
    sets["non-cell images"] = [resize_uint8(im.convert("RGB"), size)
                               for im in non_cell_images(ROOT / "samples", ROOT / "samples" / "fields").values()]
    print("| model | " + " | ".join(f"{k} ({len(v)})" for k, v in sets.items()) + " |")
    print("|---|" + "---|" * len(sets))
    for m in a.models:
        pred = Predictor.load(m)
        flagged = [float(np.mean(pred.run(np.stack(v))[2] > pred.record.ood_threshold)) for v in sets.values()]
        print(f"| {m} | " + " | ".join(f"{100 * f:.1f} %" for f in flagged) + " |")


if __name__ == "__main__":
    main()
