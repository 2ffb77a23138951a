"""The object heads (training/heads.py): look-alikes drawn on real cells, and a graph written with new
heads that computes exactly what was fitted (the CAM included), on the bundled robust model's backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_detect.errors import ModelError, UsageError
from malaria_detect.imaging import resize_uint8
from malaria_detect.record import KIND_MIN_P

pytest.importorskip("onnx")
heads = pytest.importorskip("malaria_detect.training.heads")
from malaria_detect.training import objectcrops as oc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cells(samples, n=8):
    files = sorted((samples / "Uninfected").glob("*.webp"))[:n]
    return np.stack([resize_uint8(Image.open(f).convert("RGB"), 112) for f in files])


def test_lookalikes_change_part_of_a_real_cell(samples):
    rng = np.random.default_rng(0)
    cell = _cells(samples, 1)[0]
    plate = np.full((20, 20, 3), 200, np.float32)
    plate[5:15, 5:15] = (90, 40, 120)  # a dark purple body on a light rim, as a platelet's crop
    patch, mask = oc._platelet_patch(Image.fromarray(plate.astype(np.uint8)), (0, 0, 20, 20), rng)
    assert mask[10, 10] > 0.9 and mask[0, 0] == 0  # the body is pasted, its rim is not
    for out in (oc.paste_platelet(cell, patch, mask, 30, rng), oc.draw_precipitate(cell, rng),
                oc.draw_precipitate(cell, rng, dust=True)):
        assert out.shape == cell.shape and out.dtype == np.uint8
        changed = np.abs(out.astype(int) - cell).sum(2) > 10
        assert 0.002 < changed.mean() < 0.3  # something was drawn, most of the cell is left as it was
        assert out[changed].mean() < cell[changed].mean()  # darker: stain, dust, a platelet


def test_written_heads_compute_what_was_fitted(samples, tmp_path):
    from malaria_detect.cells.predictor import Predictor

    base = heads.base_model_path("robust")
    record = Predictor.load(base).record
    x = _cells(samples)
    f, _ = heads.compute_features(base, record, x, progress=False)
    w0, b0 = heads.base_head(base)
    z_base = Predictor.load(base).run(x)[0]
    assert np.allclose(f @ w0 + b0[0], z_base, atol=1e-3)  # the features are the ones the head reads
    rng = np.random.default_rng(1)
    C = f.shape[1]
    fitted = {"parasitized": [(rng.normal(0, 0.05, (1, C)).astype(np.float32), np.array([0.3], np.float32))],
              "kind": [(rng.normal(0, 0.05, (4, C)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32))],
              "stage": [(rng.normal(0, 0.05, (16, C)).astype(np.float32), np.zeros(16, np.float32)),
                        (rng.normal(0, 0.5, (4, 16)).astype(np.float32), np.zeros(4, np.float32))]}
    out = tmp_path / "heads.onnx"
    heads.write_heads(base, fitted, out)
    from malaria_detect.modelfile import write_model_record

    record.kind_names, record.stage_names = heads.KIND_NAMES, heads.STAGE_NAMES
    write_model_record(out, record)
    with pytest.raises(ModelError, match="disagree on a whole-field head"):  # object_logits without its record
        Predictor.load(out)
    record.object_head = {"temperature": 0.8, "threshold": 0.3}
    write_model_record(out, record)
    pred = Predictor.load(out)
    z, cam, ood, zk, zs = pred.run_fields(x)
    want = heads.apply_heads(f, fitted)
    assert np.allclose(z, want[0], atol=1e-3) and np.allclose(zk, want[1], atol=1e-3)
    assert np.allclose(zs, want[2], atol=1e-3)
    zc, camc, _, _, _ = pred.run_all(x)  # single cells: the base's own head and CAM, as they were
    assert np.allclose(zc, z_base, atol=1e-4) and np.allclose(camc.mean((1, 2)), z_base, atol=1e-3)
    assert not np.allclose(z, z_base, atol=0.1)
    assert np.allclose(ood, Predictor.load(base).run(x)[2], atol=1e-4)  # the not-a-cell score is kept
    with pytest.raises(UsageError, match="already has whole-field heads"):
        heads.write_heads(out, fitted, tmp_path / "again.onnx")
    kinds, p = pred.record.kinds(zk)
    soft = np.exp(zk - zk.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    want_kinds = [heads.KIND_NAMES[k] if soft[i, k] >= KIND_MIN_P else "red cell" for i, k in enumerate(soft.argmax(1))]
    assert list(kinds) == want_kinds


def test_crenated_and_target_cells_are_made_from_a_real_red_cell():
    """training/redcells.py: a crenated cell gains spicules outside its rim and keeps its middle; a target
    cell gets a paler ring inside and keeps its outside; a crop where no cell stands out is kept as it is."""
    from malaria_detect.data.annotations import box_of, load_annotations
    from malaria_detect.training.objectcrops import _crop
    from malaria_detect.training.redcells import _cell, crenate, target

    fields = ROOT / "samples" / "fields"
    rec = next(r for r in load_annotations(fields / "annotations.json") if r["image_name"] == "PA171700.JPG")
    img = Image.open(fields / rec["image_name"]).convert("RGB")
    boxes = [box_of(o) for o in rec["objects"] if o["type"] == "red blood cell"]
    crop = next(c for c in (_crop(img, b, 112, 1.3) for b in boxes[:40]) if _cell(c) is not None)
    cx, cy, r, _, _ = _cell(crop)
    yy, xx = np.mgrid[:112, :112]
    d = np.hypot(xx - cx, yy - cy) / r
    rng = np.random.default_rng(0)
    cr, tg = crenate(crop, rng), target(crop, rng)
    assert cr.shape == tg.shape == crop.shape and cr.dtype == tg.dtype == np.uint8
    moved = lambda a, m: np.abs(a.astype(float) - crop).sum(2)[m].mean()  # noqa: E731
    assert moved(cr, (d > 1.0) & (d < 1.15)) > 3 * moved(cr, d > 1.4)      # spicules just outside the rim
    assert tg.mean(2)[(d > 0.3) & (d < 0.5)].mean() > crop.mean(2)[(d > 0.3) & (d < 0.5)].mean() + 5  # paler ring
    assert moved(tg, d > 1.1) < 1.0                                        # nothing outside the cell
    blank = np.full((112, 112, 3), 200, np.uint8)
    assert (crenate(blank, rng) == blank).all() and (target(blank, rng) == blank).all()
