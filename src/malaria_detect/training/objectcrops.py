"""The object crops `train-heads` learns from: every lab's objects cut by their boxes as the field pipeline
cuts them, and look-alikes made on purpose (torch-free: Pillow and NumPy).

- NIH cells (train patients sampled, validation patients all), as published;
- IML red cells (the training block, --iml-learn, default PA171690-769, sampled, every infected cell in
  several jittered views; the validation block, --iml-choose, default PA171770-799, all), with their stage;
- TXL-PBC red cells, white cells and platelets (train sampled, val all), and background crops ("other");
- look-alikes, training only, a quarter each: a TXL-PBC platelet pasted onto an uninfected red cell,
  stain precipitate and dust drawn on one (irregular granules), a white cell's fragment; with
  --cell-shapes N, N more: uninfected red cells made crenated or target cells (training/redcells.py).
IML PA171830-899 and the NIH test patients are never read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.annotations import INFECTED_TYPES
from ..data.objects import LabelledField, iml_block, labelled_fields
from ..errors import UsageError
from ..fields.area import fill_outside, imaged_area
from ..fields.crops import box_crop
from ..fields.stain import normalize_stain
from .config import HeadsConfig
from .redcells import crenate, target

KIND_NAMES = ("red cell", "white cell", "platelet", "other")
STAGE_NAMES = ("ring", "trophozoite", "schizont", "gametocyte")
RED, WHITE, PLATELET, OTHER = range(4)
SOURCES = ("NIH", "IML", "TXL-PBC", "look-alike")


def _crop(img: Image.Image, box, size: int, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """A box crop as the field pipeline cuts it (fields/crops.box_crops: the box as it is, resized with
    Pillow's bilinear filter), optionally grown by `scale` and shifted by `shift` box sides."""
    x0, y0, x1, y1 = box
    dx, dy = shift[0] * (x1 - x0), shift[1] * (y1 - y0)
    crop = box_crop(img, (x0 + dx, y0 + dy, x1 + dx, y1 + dy), scale)
    if crop.width < 2 or crop.height < 2:  # a sliver at the image's edge: the box as it is
        crop = img.crop((max(0, int(x0)), max(0, int(y0)), min(img.width, int(x1) + 1), min(img.height, int(y1) + 1)))
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def _jitter(rng) -> tuple[float, tuple[float, float]]:
    return float(rng.uniform(0.95, 1.3)), (float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1)))


def _blob_mask(rng, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """An irregular blob (two to four overlapping discs), soft-edged, as float (size, size)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    m = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        ox, oy, rr = rng.normal(0, r * 0.6), rng.normal(0, r * 0.6), r * rng.uniform(0.5, 1.0)
        m = np.maximum(m, np.clip(rr + 0.75 - np.hypot(xx - cx - ox, yy - cy - oy), 0, 1.5) / 1.5)
    return m


def _platelet_patch(img: Image.Image, box, rng) -> tuple[np.ndarray, np.ndarray]:
    """A platelet cut out of its field: its pixels and a soft mask of what is darker than its box's rim."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    a = np.asarray(img.crop((x0, y0, max(x0 + 2, x1), max(y0 + 2, y1)))).astype(np.float32)
    g = a.mean(2)
    rim = np.r_[g[0], g[-1], g[:, 0], g[:, -1]]
    m = np.clip((np.median(rim) - g - 8) / 20, 0, 1)
    return a, m


def paste_platelet(cell: np.ndarray, patch: np.ndarray, mask: np.ndarray, side: float, rng) -> np.ndarray:
    """`cell` (S, S, 3 uint8) with a platelet of `side` pixels pasted at a random place on the cell."""
    S = cell.shape[0]
    side = int(np.clip(round(side), 4, 0.45 * S))  # a platelet is smaller than a red cell
    p = np.asarray(Image.fromarray(patch.astype(np.uint8)).resize((side, side), Image.BILINEAR), np.float32)
    m = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR),
                   np.float32)[..., None] / 255
    x, y = (int(rng.integers(int(0.15 * S), max(int(0.15 * S) + 1, int(0.85 * S) - side))) for _ in range(2))
    out = cell.astype(np.float32)
    region = out[y:y + side, x:x + side]
    out[y:y + side, x:x + side] = region * (1 - m) + p * m
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_precipitate(cell: np.ndarray, rng, dust: bool = False) -> np.ndarray:
    """`cell` with 1-5 irregular granules of stain precipitate (dark purple), or of dust (grey-black),
    anywhere on the crop: what a lab's dirty slide puts on uninfected cells."""
    S = cell.shape[0]
    out = cell.astype(np.float32)
    for _ in range(int(rng.integers(1, 6))):
        r = S * rng.uniform(0.02, 0.07)
        m = _blob_mask(rng, S, rng.uniform(0.1, 0.9) * S, rng.uniform(0.1, 0.9) * S, r)[..., None]
        if dust:
            v = rng.uniform(20, 90)
            colour = np.array([v, v, v]) + rng.normal(0, 5, 3)
        else:
            colour = np.array([rng.uniform(50, 120), rng.uniform(10, 60), rng.uniform(80, 150)])
        alpha = rng.uniform(0.6, 1.0)
        out = out * (1 - alpha * m) + colour * alpha * m
    return np.clip(out, 0, 255).astype(np.uint8)


@dataclass
class Crops:
    x: np.ndarray          # (N, S, S, 3) uint8
    kind: np.ndarray       # index into KIND_NAMES
    parasitized: np.ndarray  # 1, 0, or -1 (no label: not used by that head)
    stage: np.ndarray      # index into STAGE_NAMES, or -1
    source: np.ndarray     # index into SOURCES
    split: np.ndarray      # 0 train, 1 validation

    def save(self, path: Path) -> None:
        np.savez(path, **asdict(self))

    @classmethod
    def load(cls, path: Path) -> Crops:
        z = np.load(path, allow_pickle=False)
        return cls(**{k: z[k] for k in ("x", "kind", "parasitized", "stage", "source", "split")})


def loss_weights(c: Crops, train: np.ndarray, lookalike_weight: float) -> dict:
    """The heads' loss weights on the crops of `train` (a mask), as arrays over all crops:
    - `w_par`: parasitized, each source weighing the same in total and its two classes half each (TXL-PBC
      and the look-alikes hold negatives only); look-alikes and non-red objects `lookalike_weight` times
      more; summing to 1 over the labelled training crops (0 elsewhere);
    - `kind_w`, `st_w`: per class, the inverse of its training count, mean 1 (balanced)."""
    w_par = np.zeros(len(c.kind), np.float32)
    for s in range(len(SOURCES)):
        classes = [y for y in (0, 1) if (train & (c.source == s) & (c.parasitized == y)).any()]
        for y in classes:
            m = train & (c.source == s) & (c.parasitized == y)
            w_par[m] = 1.0 / (len(classes) * m.sum())
    w_par[train & ((c.source == SOURCES.index("look-alike")) | (c.kind != RED))] *= lookalike_weight
    labelled = train & (c.parasitized >= 0)
    w_par = np.where(labelled, w_par, 0) / w_par[labelled].sum()
    kind_w = np.array([1.0 / max(1, int((train & (c.kind == k)).sum())) for k in range(len(KIND_NAMES))])
    st = c.stage[train & (c.stage >= 0)]
    st_w = 1.0 / np.maximum(1, np.bincount(st, minlength=len(STAGE_NAMES)))
    return {"w_par": w_par.astype(np.float32), "kind_w": (kind_w / kind_w.mean()).astype(np.float32),
            "st_w": (st_w / st_w.mean()).astype(np.float32)}


class _Builder:
    def __init__(self, size: int):
        self.size, self.rows = size, []

    def add(self, x, kind, parasitized, stage, source, split):
        self.rows.append((x, kind, parasitized, stage, SOURCES.index(source), split))

    def crops(self) -> Crops:
        cols = list(zip(*self.rows))
        return Crops(np.stack(cols[0]).astype(np.uint8), *(np.array(c, np.int16) for c in cols[1:]))


def _field_scale(f: LabelledField) -> float:
    sides = [max(b[2] - b[0], b[3] - b[1]) for b, k in zip(f.boxes, f.kinds) if k == "red cell"]
    return float(np.median(sides)) if sides else 0.0


def build_crops(cfg: HeadsConfig, size: int, say=print) -> Crops:
    """The object crops of every lab, train and validation, with the look-alikes (seeded)."""
    from ..data import find_images, load_arrays, load_split, select

    rng = np.random.default_rng(cfg.seed)
    b = _Builder(size)
    root = Path(cfg.data)
    # NIH cells (single-cell crops as published): train patients sampled, validation patients all
    nih = root / "nih-cells"
    if not nih.is_dir():
        raise UsageError(f"{nih} is not there: train-heads needs the NIH cells (see ../shared/data/README.md)")
    parts = load_split(cfg.nih_split)
    items = find_images(nih)
    for split, part in ((0, "train"), (1, "val")):
        sel = select(items, parts[part])
        if split == 0:
            by = [[it for it in sel if it.label == c] for c in (0, 1)]
            sel = [it for c in by for it in (rng.permutation(np.array(c, object))[:cfg.nih_per_class].tolist())]
        x, y, _, _ = load_arrays(sel, size, desc=f"NIH {part}", progress=True)
        for xi, yi in zip(x, y):
            b.add(xi, RED, int(yi), -1, "NIH", split)
        say(f"NIH {part}: {len(x)} cells")
    try:
        learn, choose = iml_block(cfg.iml_learn), iml_block(cfg.iml_choose)
        fields = [f for f in labelled_fields(root, learn, choose) if f.split in ("train", "val")]
    except ValueError as e:
        raise UsageError(f"--iml-learn / --iml-choose: {e}") from None
    platelets = []  # (field image, box, field red-cell side) of TXL-PBC training platelets
    red_pool = []   # (field image, box, field red-cell side) of uninfected training red cells
    wbc_pool = []
    for i, f in enumerate(fields):
        split = 0 if f.split == "train" else 1
        img = Image.open(f.path).convert("RGB")
        if cfg.stain_norm:  # as the whole-field path maps it: measured inside the imaged area
            rgb = np.asarray(img)
            area = imaged_area(rgb)
            img = Image.fromarray(normalize_stain(fill_outside(rgb, area) if not area.all() else rgb,
                                                  [b for b, k in zip(f.boxes, f.kinds) if k == "red cell"], area))
        side = _field_scale(f)
        if f.lab == "IML":
            inf = [j for j, s in enumerate(f.stages) if s in INFECTED_TYPES]
            un = [j for j, k in enumerate(f.kinds) if k == "red cell" and f.stages[j] is None]
            keep = un if split == 1 else list(rng.permutation(un)[:max(1, cfg.iml_uninfected // 80)])
            for j in keep:
                b.add(_crop(img, f.boxes[j], size), RED, 0, -1, "IML", split)
            if split == 0:
                red_pool += [(img, f.boxes[j], side) for j in keep[:5]]
            for j in inf:
                st = STAGE_NAMES.index(f.stages[j])
                b.add(_crop(img, f.boxes[j], size), RED, 1, st, "IML", split)
                if split == 0:
                    for _ in range(cfg.infected_views - 1):
                        s, sh = _jitter(rng)
                        b.add(_crop(img, f.boxes[j], size, s, sh), RED, 1, st, "IML", split)
        else:  # TXL-PBC: red cells, white cells, platelets; all malaria-free
            red = [j for j, k in enumerate(f.kinds) if k == "red cell"]
            pick = red if split == 1 else list(rng.permutation(red)[:cfg.txl_red_per_field])
            for j in pick:
                b.add(_crop(img, f.boxes[j], size), RED, 0, -1, "TXL-PBC", split)
            if split == 0:
                red_pool += [(img, f.boxes[j], side) for j in pick[:3]]
            for j, k in enumerate(f.kinds):
                if k == "red cell":
                    continue
                kind = WHITE if k == "white cell" else PLATELET
                b.add(_crop(img, f.boxes[j], size), kind, 0, -1, "TXL-PBC", split)
                if split == 0:
                    s, sh = _jitter(rng)
                    b.add(_crop(img, f.boxes[j], size, s, sh), kind, 0, -1, "TXL-PBC", split)
                    (platelets if kind == PLATELET else wbc_pool).append((img, f.boxes[j], side))
            if split == 0 and f.boxes:
                _background(b, img, f, size, rng, max(1, cfg.background // 800))
        if (i + 1) % 200 == 0:
            say(f"fields: {i + 1}/{len(fields)}")
    _lookalikes(b, cfg, size, rng, red_pool, platelets, wbc_pool)
    c = b.crops()
    say(f"crops: {len(c.x)} ({int((c.split == 0).sum())} train, {int((c.split == 1).sum())} validation)")
    return c


def _background(b: _Builder, img: Image.Image, f: LabelledField, size: int, rng, n: int) -> None:
    """Crops of a fully labelled field that hold no object's centre and overlap no box much: "other"."""
    from ..data.annotations import iou

    side = _field_scale(f) or 60.0
    for _ in range(n * 10):
        if n == 0:
            return
        cx, cy = rng.uniform(0, img.width), rng.uniform(0, img.height)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        if box[0] < 0 or box[1] < 0 or box[2] > img.width or box[3] > img.height:
            continue
        if any(iou(box, o) > 0.15 or (o[0] <= cx <= o[2] and o[1] <= cy <= o[3]) for o in f.boxes):
            continue
        b.add(_crop(img, box, size), OTHER, 0, -1, "TXL-PBC", 0)
        n -= 1


def _lookalikes(b: _Builder, cfg: HeadsConfig, size: int, rng, red_pool, platelets, wbc_pool) -> None:
    """Uninfected red cells with a platelet lying on them, with stain precipitate, with dust; white-cell
    fragments. Training only; all of them taught as not parasitized."""
    if not red_pool or not platelets or not wbc_pool:
        raise UsageError("train-heads needs TXL-PBC training fields with platelets and white cells")
    for i in range(cfg.lookalikes):
        what = i % 4
        if what == 3:  # a white cell's fragment: a part of its box, cut as the detector might box it
            img, box, _ = wbc_pool[rng.integers(len(wbc_pool))]
            x0, y0, x1, y1 = box
            f = rng.uniform(0.4, 0.7)
            w, h = (x1 - x0) * f, (y1 - y0) * f
            ox, oy = rng.uniform(x0, x1 - w), rng.uniform(y0, y1 - h)
            b.add(_crop(img, (ox, oy, ox + w, oy + h), size), WHITE, 0, -1, "look-alike", 0)
            continue
        img, box, side = red_pool[rng.integers(len(red_pool))]
        s, sh = _jitter(rng)
        cell = _crop(img, box, size, min(s, 1.15), sh)
        if what == 0:
            pimg, pbox, pside = platelets[rng.integers(len(platelets))]
            patch, mask = _platelet_patch(pimg, pbox, rng)
            rel = max(pbox[2] - pbox[0], pbox[3] - pbox[1]) / max(pside, 1.0)  # platelet / red cell
            cell = paste_platelet(cell, patch, mask, rel * size * rng.uniform(0.8, 1.1), rng)
        else:
            cell = draw_precipitate(cell, rng, dust=what == 2)
        b.add(cell, RED, 0, -1, "look-alike", 0)
    for i in range(cfg.cell_shapes):  # red cells of other shapes: crenated (burr cells), target cells
        img, box, _ = red_pool[rng.integers(len(red_pool))]
        s, sh = _jitter(rng)
        cell = _crop(img, box, size, min(s, 1.15), sh)
        b.add(crenate(cell, rng) if i % 2 == 0 else target(cell, rng), RED, 0, -1, "look-alike", 0)
