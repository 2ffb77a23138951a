"""Does mapping each field's stain to a reference (fields/stain.py, `train-heads --stain-norm`) keep
whole-field results when the stain and lamp change? Validation fields only: IML PA171770-799 and
TXL-PBC val/, as they are and re-stained as K synthetic labs.

    .venv/bin/python research/stain_shift_validation.py MODEL.onnx [MODEL2.onnx ...] [--labs 4] [--txl-every 2]

A synthetic lab re-stains a whole field: optical densities mixed by a matrix near the identity (sd 0.15)
and scaled 0.6-1.5 per channel, a lamp tint 0.8-1.05 per channel and a gamma 0.8-1.25 (seeded, one draw
per lab, the same for every field and model). Each model runs the whole-field path (bundled detector)
at its own field threshold; the table gives IML validation infected recall / precision and TXL-PBC
validation false parasitized per 1,000 red cells, per lab. CPU; a few minutes per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from malaria_detect import load
from malaria_detect.data.annotations import load_annotations
from malaria_detect.evaluation.fieldscore import score_fields
from malaria_detect.fields.analysis import SmearOptions, analyze_field

DATA = Path("../shared/data")


def synthetic_lab(seed: int):
    rng = np.random.default_rng(1000 + seed)
    mix = np.eye(3) + 0.15 * rng.standard_normal((3, 3))
    scale, lamp, gamma = rng.uniform(0.6, 1.5, 3), rng.uniform(0.8, 1.05, 3), rng.uniform(0.8, 1.25)

    def restain(rgb: np.ndarray) -> np.ndarray:
        od = -np.log(np.maximum(rgb.astype(np.float32) / 255, 1 / 255))
        od = np.einsum("ij,hwj->hwi", mix, od) * scale
        x = (np.exp(-np.maximum(od, 0)) * lamp).clip(0, 1) ** gamma
        return (x * 255 + 0.5).astype(np.uint8)
    return restain


def fields_of(folder: Path, keep) -> tuple[list[dict], list[Path]]:
    ann = [r for r in load_annotations(folder / "annotations.json") if keep(r["image_name"])]
    return ann, [folder / "images" / r["image_name"] for r in ann]


def run(model: str, sets, labs: int) -> list[dict]:
    pred = load(model)
    rows = []
    for lab in range(labs + 1):
        restain = (lambda a: a) if lab == 0 else synthetic_lab(lab)
        row = {"model": Path(model).name, "lab": "as photographed" if lab == 0 else f"synthetic {lab}"}
        for name, (ann, paths) in sets.items():
            fields = [analyze_field(pred, restain(np.asarray(Image.open(p).convert("RGB"))), p.name, SmearOptions())
                      for p in paths]
            s = score_fields(fields, ann, pred.record.positive)
            row[name] = s
        rows.append(row)
        print(fmt(row), flush=True)
    return rows


def fmt(row: dict) -> str:
    iml, txl = row["IML val"], row["TXL val"]
    return (f"| {row['model']} | {row['lab']} | {iml['inf_recall']:.3f} | {iml['inf_precision']:.3f} | "
            f"{iml['det_f1']:.3f} | {txl['fp_per_1000']:.2f} | {txl['det_f1']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--labs", type=int, default=4)
    ap.add_argument("--txl-every", type=int, default=2, help="every Nth TXL-PBC validation field")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    a = ap.parse_args()
    iml = fields_of(DATA / "iml-fields", lambda n: "PA171770" <= Path(n).stem[:8] <= "PA171799")
    txl_ann, txl_paths = fields_of(DATA / "txl-pbc", lambda n: n.startswith("val/"))
    sets = {"IML val": iml, "TXL val": (txl_ann[::a.txl_every], txl_paths[::a.txl_every])}
    print("| model | lab | IML val infected recall | precision | red-cell F1 | TXL val false parasitized /1,000 | "
          "red-cell F1 |\n|---|---|---|---|---|---|---|")
    rows = [r for m in a.models for r in run(m, sets, a.labs)]
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
