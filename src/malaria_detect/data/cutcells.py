"""Labelled single-cell images cut out of annotated whole fields (the IML_Malaria format).

    malaria-detect cut-cells --fields DIR/images --annotations DIR/annotations.json --out cells/ \
        --only PA1717 [--mode box mask] [--max-uninfected-per-field 30]

writes `cells/Parasitized/*.png`, `cells/Uninfected/*.png` and `cells/patients.csv` (file,field):
a folder that `train`, `evaluate --split all --patients cells/patients.csv` and `adapt` read.

Two ways of cutting a cell, because users meet both:
- `box`: the annotated box as it is, background included (how a person crops a cell by hand);
  infected cells are also cut with a 10 % wider and a 5 % tighter box (more crops of the rare class,
  and the margin a person leaves varies).
- `mask`: the cell as the whole-field pipeline sees it: segmented by `fields/segment.py`, matched to an
  annotated box (IoU >= 0.5, or >= 0.3 for infected boxes), its pixels outside the mask black.

Annotations: a JSON list of {"image_name", "objects": [{"type", "bbox": {"x","y","w","h"}}]};
types `ring`, `trophozoite`, `schizont`, `gametocyte` are infected, `red blood cell` uninfected,
`difficult` is skipped. NumPy + Pillow + OpenCV; no torch.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..fields.crops import box_crop, masked_crop
from ..fields.segment import SegmentationError, segment_cells
from ..imaging import FIELD_MAX_PIXELS, ImageError, open_rgb
from .annotations import match_cells, read_annotations
from .folders import NEGATIVE, POSITIVE, DataError


class CellFolder:
    """A labelled cell folder being written: Parasitized/, Uninfected/ (the class folders find_images reads)
    and, on close(), patients.csv (file, patient); `n` counts the cells of each class, the fields and the
    errors."""

    def __init__(self, out: str | Path):
        self.out, self.rows = Path(out), []
        for d in (POSITIVE, NEGATIVE):
            (self.out / d).mkdir(parents=True, exist_ok=True)
        self.n = {POSITIVE: 0, NEGATIVE: 0, "fields": 0, "errors": []}

    def add(self, im: Image.Image, infected: bool, name: str, patient: str) -> None:
        """One crop (too small ones, under 4 pixels a side, are left out)."""
        if im.width < 4 or im.height < 4:
            return
        cls = POSITIVE if infected else NEGATIVE
        im.save(self.out / cls / name, compress_level=1)
        self.rows.append((f"{cls}/{name}", patient))
        self.n[cls] += 1

    def close(self) -> dict:
        with open(self.out / "patients.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "patient"])
            w.writerows(self.rows)
        return self.n


def cut_cells(fields_dir: str | Path, annotations: str | Path, out: str | Path, only: list[str] | None = None,
              modes=("box", "mask"), max_uninfected_per_field: int = 0, seed: int = 0, progress=None) -> dict:
    """Write labelled cell crops of the annotated fields whose name starts with one of `only`."""
    fields_dir = Path(fields_dir)
    recs = read_annotations(annotations)
    if only:
        recs = [r for r in recs if any(r["image_name"].startswith(p) for p in only)]
    if not recs:
        raise DataError(f"no annotated field matches {only}")
    folder = CellFolder(out)
    n = folder.n
    rng = np.random.default_rng(seed)
    for r in recs:
        stem = Path(r["image_name"]).stem
        try:
            img = open_rgb(fields_dir / r["image_name"], FIELD_MAX_PIXELS, max_side=None)
        except ImageError as e:
            n["errors"].append(f"{r['image_name']}: {e}")
            continue
        n["fields"] += 1
        keep = np.ones(len(r["boxes"]), bool)
        unin = np.nonzero(~np.asarray(r["infected"], bool))[0]
        if max_uninfected_per_field and len(unin) > max_uninfected_per_field:
            keep[rng.choice(unin, len(unin) - max_uninfected_per_field, replace=False)] = False
        crops = []  # (image, infected, tag)
        if "box" in modes:
            for j, (b, inf) in enumerate(zip(r["boxes"], r["infected"])):
                if keep[j]:
                    crops.append((box_crop(img, b), inf, f"{j:03d}_box"))
                    if inf:
                        crops.append((box_crop(img, b, 1.1), inf, f"{j:03d}_wide"))
                        crops.append((box_crop(img, b, 0.95), inf, f"{j:03d}_tight"))
        if "mask" in modes:
            rgb = np.asarray(img)
            try:
                cells, diameter = segment_cells(rgb)
                cells = [c for c in cells if c.kind == "red cell"]
            except SegmentationError as e:
                n["errors"].append(f"{r['image_name']}: {e}")
                cells, diameter = [], 0.0
            for i, j in match_cells([c.box for c in cells], r["boxes"], r["infected"]).items():
                if keep[j]:
                    crop = masked_crop(rgb, cells[i], diameter)
                    if crop is not None:
                        crops.append((Image.fromarray(crop), r["infected"][j], f"{j:03d}_mask"))
        for im, inf, tag in crops:
            folder.add(im, inf, f"{stem}_{tag}.png", stem)
        if progress is not None:
            progress.update(1)
    return folder.close()


def cut_reviewed(report: dict, out: str | Path, picture, progress=None) -> dict:
    """Write the red cells of a reviewed sample (store.Store.sample(..., reviewed=True)) as a labelled
    cell folder: each classified red cell by its box, under Parasitized/ or Uninfected/ as the person's
    review left it (cells nobody changed keep the model's call), and patients.csv (file, sample), so
    that `adapt` and `train` take a lab's review as its labelled cells. `picture(field)`: the field's
    image (PIL, any scale) or None; fields without one are counted in `errors`."""
    positive, negative = report["model"]["class_names"][1], report["model"]["class_names"][0]
    folder = CellFolder(out)
    n = folder.n
    for f in report["fields"]:
        if f.get("error"):
            continue
        img = picture(f)
        if img is None:
            n["errors"].append(f"{f['image']}: no picture of this field (the file is gone and none was stored)")
            continue
        n["fields"] += 1
        k = img.width / f["width"]
        stem = f"{f.get('field_id', n['fields'])}_{Path(f['image']).stem}"
        for j, c in enumerate(f["cells"]):
            if c.get("kind", "red cell") != "red cell" or c.get("ood") or c.get("label") not in (positive, negative):
                continue
            folder.add(box_crop(img, [v * k for v in c["box"]]), c["label"] == positive,
                       f"{stem}_{c.get('key', j)}.png", f.get("sample") or report.get("sample") or "sample")
        if progress is not None:
            progress.update(1)
    return folder.close()
