"""Whole thin-smear fields: find every red cell, classify it, count, report parasitemia.

    from malaria_detect import load
    from malaria_detect.fields.analysis import analyze_fields
    report = analyze_fields(load("anylab"), ["field1.jpg", "slide_A/"])   # the smear --json dict

Each field takes the one path of a cell, for each of its cells:

    field ─► the imaged area (fields/area.py) ─► the objects: the learned detector (fields/detect.py:
          red cells, white cells, platelets; the default) or the classical segmenter (fields/segment.py:
          boxes + masks; with a given cell diameter) ─► (a record's stain map: fields/stain.py) ─► each
          red cell's box crop (the segmenter's: its mask, black outside) ─► the Predictor, in batches
          (Predictor.run_fields: the whole-field head when the model has one, with its temperature;
          the field threshold; the not-a-cell score; with object heads, kind and stage) ─► counts,
          parasitemia + 95 % Wilson
          interval, white cells, platelets and parasitized cells by stage beside

Cells flagged "not a cell" and cells whose score is not finite are counted apart and left out of
the parasitemia (counting.py). A folder of fields is one sample: its counts are pooled in `summary`.
NumPy + Pillow + OpenCV + ONNX Runtime; no torch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import cv2
import numpy as np

from ..cells.predictor import Predictor
from ..counting import TARGET_CELLS, field_counts, field_note, parasites_per_ul, sample_summaries, summarize
from ..imaging import FIELD_MAX_PIXELS, ImageError, iter_image_paths, open_rgb, sample_names
from ..record import RED_CELL
from .area import fill_outside, imaged_area
from .crops import box_crops, cell_crops
from .segment import Cell, SegmentationError, foreground, segment_cells
from .stain import stained_like_reference

MIN_FIELD_SIDE = 256  # a field photo is larger; smaller images are single cells or thumbnails
MIN_IMAGED = 0.05     # a photo of which less than this share shows the smear is not counted
MIN_COVERED = 0.4     # cells found must cover this share of the stained imaged area, else the count is implausible
STOP_VISIBLE = 0.5    # an object cut by a field stop is kept when more than this share of a red cell's box shows


@dataclass
class SmearOptions:
    cell_diameter: float | None = None   # pixels; None = estimate from each field
    batch_size: int = 128
    rbc_per_ul: float | None = None      # red cells per microlitre, for parasites/uL
    max_pixels: int = FIELD_MAX_PIXELS   # the largest field decoded (width x height)
    target_cells: int = TARGET_CELLS     # the stopping rule: red cells a sample needs (counting.stopping_rule)
    sample: str | None = None            # the sample (slide) of every field; None: each field's folder name
    detector: str | None = "bundled"     # the learned detector ('bundled' or export-detector's ONNX); None: the
                                         # classical segmenter (also used whenever cell_diameter is given)
    cell_head: bool = False              # every red cell also gets its cell head's p (p_cell_head), not only
                                         # those the record's second opinion asks about (field-threshold)


def field_threshold(record) -> float:
    """The threshold for cells of whole fields: `extra.field_threshold` when the model has one (chosen
    on validation fields, where only 1-2 % of cells are infected: `malaria-detect field-threshold`),
    else the cell threshold (of the whole-field head, when the model has one: record.object_head)."""
    return float(record.extra.get("field_threshold", record.field_cell_threshold))


def analyze_field(pred: Predictor, src, name: str | None = None, opts: SmearOptions | None = None) -> dict:
    """One field -> its JSON record (see the smear command). Never raises for a bad image: the
    record then has `error` and zero counts."""
    opts = opts or SmearOptions()
    name = name if name is not None else str(src)
    rec = {"image": name, "width": None, "height": None, "cells": []}
    t0 = time.perf_counter()
    try:
        img = open_rgb(src, opts.max_pixels, max_side=None)
    except ImageError as e:
        return failed_field(name, str(e), opts)
    rgb = np.asarray(img)
    rec["width"], rec["height"] = img.width, img.height
    if min(img.size) < MIN_FIELD_SIDE:
        return _finish(rec | {"note": f"the image is only {img.width}x{img.height} pixels: too small to be a field "
                                      f"of cells (a single-cell image? use 'predict' for single cells)"},
                       opts, pred.record.positive)
    area = imaged_area(rgb)
    rec["imaged_fraction"] = round(float(area.mean()), 4)
    if rec["imaged_fraction"] < MIN_IMAGED:
        return _finish(rec | {"note": f"only {rec['imaged_fraction']:.1%} of the photo shows the smear (the rest is "
                                      "a black or white surround): too little to count"}, opts, pred.record.positive)
    if rec["imaged_fraction"] < 1:
        rgb = fill_outside(rgb, area)
    try:
        cells, diameter = _objects(rgb, opts)
    except SegmentationError as e:
        return _finish(rec | {"note": f"no cells found: {e}"}, opts, pred.record.positive)
    rec["cell_diameter_px"] = round(diameter, 1)
    if rec["imaged_fraction"] < 1:  # a cell cut by the field stop is a border cell, as at the image's edge
        cells = _inside_stop(cells, area)
    implausible = implausible_count(rgb, area, cells, diameter)  # either path: the detector's masks are its boxes
    if implausible:
        rec["note"] = implausible
    red = [c for c in cells if c.kind == "red cell"]
    if red:
        if pred.record.stain_norm:  # the model learnt its crops with each field's stain mapped
            rgb = stained_like_reference(pred.record, rgb, [c.box for c in red], area)
        x = box_crops(rgb, red, pred.record.input_size) if _uses_detector(opts) else \
            cell_crops(rgb, red, diameter, pred.record.input_size)
        # the segmenter's masked crops keep the view check: the kind head, which is not trusted on them,
        # cannot say "other" for a clump or a background blob there
        z, _, s, zk, zs = pred.run_fields(x, opts.batch_size, view_check=not _uses_detector(opts))
        thr = field_threshold(pred.record)
        p, _, ood = pred.record.decide(z, s, threshold=thr, temperature=pred.record.field_temperature)
        # the classifier's kinds and stages are trusted on box crops (what it learnt from), not on masks
        boxes = _uses_detector(opts)
        p_cell = _second_opinion(pred, x, p, thr, opts.cell_head) if boxes else np.full(len(p), np.nan)
        labels = pred.record.field_labels(p, p_cell, thr)
        kinds = pred.record.kinds(zk)[0] if zk is not None and boxes else [RED_CELL] * len(red)
        stages, p_stage = pred.record.stages(zs) if zs is not None and boxes else (None, None)
        for extra in (zk, zs):  # a damaged model: no label where any output is not a finite number
            if extra is not None:
                p = np.where(np.isfinite(extra).all(1), p, np.nan)
        for i, c in enumerate(red):
            if kinds[i] != RED_CELL:  # the classifier knows it for a white cell, a platelet or none of these
                cells.append(replace(c, kind=str(kinds[i])))
                continue
            finite = bool(np.isfinite(p[i]) and np.isfinite(s[i]))
            obj = {"kind": c.kind, "box": list(c.box), "label": str(labels[i]) if finite else None,
                   "p_parasitized": round(float(p[i]), 6) if finite else None,
                   "ood": bool(ood[i]) if finite else False, "border": c.border}
            if finite and np.isfinite(p_cell[i]):  # the cell head was asked (record.second_opinion)
                obj["p_cell_head"] = round(float(p_cell[i]), 6)
            if stages is not None and obj["label"] == pred.record.positive and not obj["ood"]:
                obj |= {"stage": str(stages[i]), "p_stage": round(float(p_stage[i]), 4)}
            rec["cells"].append(obj)
    # white cells and platelets are reported, never classified as red cells nor counted in the parasitemia
    rec["cells"] += [{"kind": c.kind, "box": list(c.box), "label": None, "p_parasitized": None, "ood": False,
                      "border": c.border} for c in cells if c.kind != RED_CELL]
    if not any(c["kind"] == RED_CELL for c in rec["cells"]) and "note" not in rec:
        rec["note"] = "no red cells found in this image"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(rec, opts, pred.record.positive)


def _second_opinion(pred: Predictor, x: np.ndarray, p: np.ndarray, thr: float, every: bool) -> np.ndarray:
    """The cell head's p of the red cells (box crops `x`) the record's second opinion asks about, NaN for
    the others; of every red cell with `every` (SmearOptions.cell_head: how field-threshold chooses it)."""
    out = np.full(len(p), np.nan)
    ask = np.ones(len(p), bool) if every and pred.record.object_head else pred.record.second_opinion_asked(p, thr)
    if ask.any():
        out[ask] = pred.record.second_opinion_p(pred.run(x[ask])[0])
    return out


def _inside_stop(cells: list[Cell], area: np.ndarray) -> list[Cell]:
    """The objects of a field with a stop (or a border) around its imaged area: one cut by it is a border
    cell, and is counted only when more than half of it shows (its box over half the field's median red-
    cell box): the counting-frame rule, so that a cell mostly hidden behind the stop, seen again in the next
    field, is not counted twice, and a sliver is not classified. (Chosen a priori; on validation fields
    PA171770-799 masked to a round stop it took the loss of red-cell F1 from 0.032 to 0.009.)"""
    def cut(c: Cell) -> bool:
        return not area[c.box[1]:c.box[3], c.box[0]:c.box[2]].all()

    def box_area(c: Cell) -> int:
        return (c.box[2] - c.box[0]) * (c.box[3] - c.box[1])

    reds = [box_area(c) for c in cells if c.kind == RED_CELL]
    half = STOP_VISIBLE * float(np.median(reds)) if reds else 0.0
    out = []
    for c in cells:
        if cut(c):
            if box_area(c) <= half:
                continue
            c = replace(c, border=True)
        out.append(c)
    return out


def _uses_detector(opts: SmearOptions) -> bool:
    """The learned detector finds the objects unless none is set or a red-cell diameter is given (the
    classical segmenter works at a given scale; the detector finds the scale itself)."""
    return bool(opts.detector) and opts.cell_diameter is None


@functools.lru_cache(maxsize=4)
def _detector(path: str):
    from .detect import Detector

    return Detector.load(path)


def _objects(rgb: np.ndarray, opts: SmearOptions) -> tuple[list[Cell], float]:
    """The field's objects (red cells, white cells, platelets) and its red-cell diameter: from the learned
    detector when one is given, else from the classical segmenter (fields/segment.py)."""
    if not _uses_detector(opts):
        return segment_cells(rgb, opts.cell_diameter)
    boxes, kinds, _, cell = _detector(opts.detector).detect(rgb)
    if cell is None:
        raise SegmentationError("the detector found no red cell")
    H, W = rgb.shape[:2]
    cells = []
    for (x0, y0, x1, y1), kind in zip(np.rint(boxes).astype(int), kinds):
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        cells.append(Cell((int(x0), int(y0), int(x1), int(y1)), np.ones((y1 - y0, x1 - x0), bool),
                          int((x1 - x0) * (y1 - y0)), bool(x0 <= 1 or y0 <= 1 or x1 >= W - 1 or y1 >= H - 1), kind))
    cells.sort(key=lambda c: (c.box[1], c.box[0]))
    return cells, cell


def implausible_count(rgb: np.ndarray, area: np.ndarray, cells: list, diameter: float) -> str | None:
    """A note when the cells found cover far less than the stained part of the imaged area (black
    corners, a wrong scale, a photo that is no smear): the count would be wrong without a word."""
    H, W = rgb.shape[:2]
    s0 = min(1.0, (300_000 / (H * W)) ** 0.5)
    size = (max(1, round(W * s0)), max(1, round(H * s0)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if s0 < 1 else rgb
    inside = cv2.resize(area.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0 if s0 < 1 else area
    stained = float((foreground(small)[0] & inside).sum()) / (s0 * s0)
    covered = float(sum(int(c.mask.sum()) for c in cells))
    if stained < 0.02 * H * W or covered >= MIN_COVERED * stained:
        return None
    return (f"the count is implausible for this field: the {len(cells)} cells found ({diameter:.0f} px across) cover "
            f"{covered / stained:.0%} of its stained area; check the photo (a black or white border, focus) or "
            "give the red-cell diameter")


def failed_field(name: str, error: str, opts: SmearOptions | None = None) -> dict:
    """The record of a field that could not be read: its error, zero counts, no parasitemia."""
    return _finish({"image": name, "width": None, "height": None, "cells": [], "error": error},
                   opts or SmearOptions(), positive="")  # no cells, so no class name is needed


def _finish(rec: dict, opts: SmearOptions, positive: str) -> dict:
    """The field's counts, parasitemia and note, by the counting rule (counting.py)."""
    rec.update(field_counts(rec["cells"], positive))
    note = field_note(rec)
    if note:
        rec["note"] = note
    per_ul = parasites_per_ul(rec["parasitemia"], opts.rbc_per_ul)
    if per_ul is not None:
        rec["parasites_per_ul"] = per_ul
    return rec


def analyze_fields(pred: Predictor, paths: Iterable, opts: SmearOptions | None = None, progress=None,
                   on_field=None) -> dict:
    """Files and folders (recursively) -> {"fields": [...], "summary": {...}, "samples": [...]} (the smear
    --json format: every field carries its `sample`, `opts.sample` or its folder's name; `summary` pools
    all fields, `samples` each sample). `on_field(index, path, record)` is called after each field (e.g.
    to draw its overlay)."""
    opts = opts or SmearOptions()
    paths = list(paths)
    names = sample_names(paths) if opts.sample is None else {}
    fields = []
    for i, path in enumerate(iter_image_paths(paths)):
        rec = analyze_field(pred, path, str(path), opts)
        rec["sample"] = opts.sample if opts.sample is not None else names.get(str(path), path.parent.name)
        if on_field:
            on_field(i, path, rec)
        fields.append(rec)
        if progress is not None:
            progress.update(1)
    return report_of(pred, fields, opts)


def report_of(pred: Predictor, fields: list[dict], opts: SmearOptions) -> dict:
    """The smear report of analysed field records: pooled, per sample, and the model's entry."""
    return {"fields": fields, "summary": summarize(fields, opts.rbc_per_ul, opts.target_cells),
            "samples": sample_summaries(fields, opts.rbc_per_ul, opts.target_cells), "model": model_entry(pred)}


def model_entry(pred: Predictor) -> dict:
    """The report's `model`: its file, field threshold, class names and weights hash."""
    return {"file": pred.path.name, "threshold": field_threshold(pred.record),
            "class_names": list(pred.record.class_names), "weights_sha256": _weights_hash(pred.path)}


@functools.lru_cache(maxsize=8)
def _weights_hash(path) -> str | None:
    """The model's weights hash, as its metadata carries it (checked at load)."""
    from ..modelfile import WEIGHTS_KEY, read_metadata

    try:
        return read_metadata(path).get(WEIGHTS_KEY)
    except (OSError, ValueError):
        return None
