"""Build the training folder of the bundled (robust) model: NIH training/validation patients next to
cells cut from the IML_Malaria development fields. Reproduces runs/data/ as used for the model card.

    .venv/bin/python recipes/robust/robust_training_set.py   # writes runs/data/{iml_train,iml_val,iml_test,combined}
    .venv/bin/malaria-detect train --data runs/data/combined --out runs/robust112 \\
        --patients runs/data/combined/patients.csv --split-file runs/data/combined/split.json --robust-aug \\
        --patience 10

IML fields are split by consecutive image numbers, never at random (neighbouring numbers are likely
the same slide): PA171690-PA171769 train (at most 30 uninfected cells per field, every infected one),
PA171770-PA171799 validation (operating point; at most 60 uninfected per field), PA1718xx held out
(cut whole into iml_test for reporting only). NIH: the 112 training and 16 validation patients of the
previous bundled model's split (same 32 test patients, kept out of the folder). NIH images are
symlinked, read in place; IML crops are written as PNG under runs/ (not committed).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from malaria_detect import data as D
from malaria_detect.data.cutcells import cut_cells

ROOT = Path(__file__).resolve().parents[2]

SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "data"
TRAIN_FIELDS = ["PA17169"] + [f"PA1717{i}" for i in range(0, 7)]   # PA171690-PA171769
VAL_FIELDS = ["PA17177", "PA17178", "PA17179"]                     # PA171770-PA171799
TEST_FIELDS = ["PA1718"]                                           # held out
# the NIH split of the first bundled model (its 32 test patients stay the test patients)
NIH_SPLIT = ROOT / "recipes" / "nih_split.json"


def main():
    F = SHARED / "iml-fields"
    for name, only, cap in (("iml_train", TRAIN_FIELDS, 30), ("iml_val", VAL_FIELDS, 60), ("iml_test", TEST_FIELDS, 0)):
        print(name, cut_cells(F / "images", F / "annotations.json", OUT / name, only, max_uninfected_per_field=cap))
    split = json.loads(NIH_SPLIT.read_text())["parts"]
    comb = OUT / "combined"
    for c in ("Parasitized", "Uninfected"):
        (comb / c).mkdir(parents=True, exist_ok=True)
    rows = []
    keep = set(split["train"]) | set(split["val"])
    for it in D.find_images(SHARED / "nih-cells"):
        if it.patient in keep:
            dst = comb / it.label_name / it.path.name
            if not dst.exists():
                os.symlink(it.path.resolve(), dst)
            rows.append((f"{it.label_name}/{it.path.name}", it.patient))
    parts = {k: list(split[k]) for k in ("train", "val", "test")}
    for sub, part in (("iml_train", "train"), ("iml_val", "val")):
        fields = set()
        for r in csv.DictReader(open(OUT / sub / "patients.csv")):
            dst = comb / r["file"]
            if not dst.exists():
                os.symlink((OUT / sub / r["file"]).resolve(), dst)
            rows.append((r["file"], "IML-" + r["patient"]))
            fields.add("IML-" + r["patient"])
        parts[part] += sorted(fields)
    parts["test"] += [f"IML-PA1718{i:02d}" for i in range(100)]
    with open(comb / "patients.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient"])
        w.writerows(rows)
    D.save_split(parts, comb / "split.json", seed=0,
                 source="NIH split of the first bundled model + IML fields by consecutive number: "
                        "PA171690-PA171769 train, PA171770-PA171799 val, PA1718xx held out")
    print({k: len(v) for k, v in parts.items()}, len(rows), "images in", comb)


if __name__ == "__main__":
    main()
