"""A field's stain and lamp, brought to one reference before its cells are classified.

    stain = stain_of(rgb, red_boxes, area)          # (background RGB, red cells' optical density) or None
    rgb2 = normalize_stain(rgb, red_boxes, area)    # the field as the reference lab would have stained and lit it

Labs differ most in colour: the lamp (the background's colour) and the stain (how strongly, and in
which hue, the cells absorb). Both are measured on the field itself, from its red cells, so one
field of a new lab needs no labelled cell. How:

- **background**: the median colour of the imaged pixels outside every red cell's box (grown by a tenth);
- **optical density** of each channel, OD = -ln((I + 1) / (background + 1)); the red cells' OD is the
  per-channel median over the inner half of each red cell's box (pallor and rim alike);
- **the map** is per channel (a lookup table): OD scaled so that the red cells' median OD becomes the
  reference's, then lit by the reference background. Red cells of any stain thus look like the
  reference's; what absorbs differently from a red cell (chromatin, a white cell's nucleus, a
  platelet) keeps its difference, scaled with them.

The reference is the IML development fields' (PA171690-769, measured by `reference_of` on their
annotated red cells: REFERENCE). A factor is bounded (FACTOR_RANGE: a faint channel is not stretched
more than 2 x, which amplifies JPEG noise); a field with fewer than MIN_CELLS red cells is left as it
is. A model trained on mapped crops (`train-heads --stain-norm`) names the map in its record
(`stain_norm`, record.STAIN_MAP); the whole-field path then applies it after finding the objects (the
detector sees the photo as it is). Tried, not in the bundled model (research/README.md). NumPy.
"""

from __future__ import annotations

import numpy as np

from ..record import STAIN_MAP as METHOD  # the map's name in a record (a change of the map gets a new name)

# background RGB and the cells' median OD per channel of the 80 IML development fields PA171690-769,
# averaged (reference_of on those fields)
REFERENCE = ((189.1, 213.4, 193.2), (0.214, 0.307, 0.232))
FACTOR_RANGE = (0.25, 2.0)
MIN_CELLS = 5         # red cells a field needs for its stain to be measured (else it is left as it is)


def stain_of(rgb: np.ndarray, red_boxes, area: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """-> (background RGB (3,), the red cells' median optical density per channel (3,)), or None when
    the field has too few red cells or too little background to measure them. `red_boxes`: the red
    cells' (x0, y0, x1, y1); their inner halves are the cells' pixels (central pallor and rim alike),
    the imaged pixels outside every box (grown by a tenth) the background."""
    H, W = rgb.shape[:2]
    cells = np.zeros((H, W), bool)
    outside = np.ones((H, W), bool) if area is None else area.copy()
    n = 0
    for box in red_boxes:
        x0, y0, x1, y1 = (max(0, int(round(v))) for v in box)
        w, h = x1 - x0, y1 - y0
        if w < 4 or h < 4:
            continue
        n += 1
        cells[y0 + h // 4:y1 - h // 4, x0 + w // 4:x1 - w // 4] = True
        gx, gy = w // 10 + 1, h // 10 + 1
        outside[max(0, y0 - gy):y1 + gy, max(0, x0 - gx):x1 + gx] = False
    if area is not None:
        cells &= area
    cells, outside = cells[::2, ::2], outside[::2, ::2]
    sub = rgb[::2, ::2].astype(np.float32)
    if n < MIN_CELLS or cells.sum() < 200 or outside.sum() < 200:
        return None
    bg = np.median(sub[outside], axis=0)
    od = -np.log((sub[cells] + 1) / (bg + 1))
    return bg, np.median(od, axis=0)


def stain_table(bg, od, reference=REFERENCE) -> np.ndarray:
    """(256, 3) uint8: each channel's map from this field's stain and lamp to the reference's."""
    ref_bg, ref_od = (np.asarray(r, np.float64) for r in reference)
    factor = np.clip(ref_od / np.maximum(np.asarray(od, np.float64), 1e-3), *FACTOR_RANGE)
    v = np.arange(256, dtype=np.float64)[:, None]
    d = -np.log((v + 1) / (np.asarray(bg, np.float64) + 1))        # negative above the background: kept, scaled
    out = (ref_bg + 1) * np.exp(-d * factor) - 1
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def apply_table(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The image (..., 3) uint8 through a (256, 3) table, channel by channel."""
    out = np.empty_like(rgb)
    for c in range(3):
        out[..., c] = table[rgb[..., c], c]
    return out


def normalize_stain(rgb: np.ndarray, red_boxes, area: np.ndarray | None = None) -> np.ndarray:
    """The field (H, W, 3) uint8 with its stain and lamp mapped to the reference, measured on its red
    cells; the field as it is when they are too few to measure."""
    stain = stain_of(rgb, red_boxes, area)
    return rgb if stain is None else apply_table(rgb, stain_table(*stain))


def reference_of(fields) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean background and red-cell OD of some (RGB array, red-cell boxes) pairs: how REFERENCE
    was measured."""
    stats = [s for s in (stain_of(f, boxes) for f, boxes in fields) if s is not None]
    return (tuple(np.round(np.mean([s[0] for s in stats], 0), 1).tolist()),
            tuple(np.round(np.mean([s[1] for s in stats], 0), 3).tolist()))


def stained_like_reference(record, rgb: np.ndarray, red_boxes, area: np.ndarray | None = None) -> np.ndarray:
    """The field mapped as the record's `stain_norm` asks (a model trained on mapped crops;
    Record.validate refuses a map this version does not have)."""
    if record.stain_norm != METHOD:
        raise ValueError(f"the record asks for the stain map {record.stain_norm!r}, not {METHOD!r}")
    return normalize_stain(rgb, red_boxes, area)
