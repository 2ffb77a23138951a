"""A field's stain mapped to the reference (fields/stain.py), on real IML fields."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_detect.data.annotations import box_of
from malaria_detect.fields.stain import REFERENCE, normalize_stain, stain_of
from malaria_detect.record import STAIN_MAP, Record, RecordError

FIELDS = Path(__file__).resolve().parents[1] / "samples" / "fields"


def _field(name: str):
    ann = json.loads((FIELDS / "annotations.json").read_text())
    rec = next(r for r in ann if r["image_name"] == name)
    red = [box_of(o) for o in rec["objects"] if o["type"] != "difficult"]
    return np.asarray(Image.open(FIELDS / name).convert("RGB")), red


def _restain(rgb: np.ndarray, scale, lamp) -> np.ndarray:
    od = -np.log(np.maximum(rgb.astype(np.float64) / 255, 1 / 255)) * np.asarray(scale)
    return np.clip(np.exp(-od) * np.asarray(lamp) * 255 + 0.5, 0, 255).astype(np.uint8)


def test_another_stain_and_lamp_come_back_to_the_reference():
    rgb, red = _field("PA171771.JPG")
    bg, od = stain_of(rgb, red)
    ref_bg, ref_od = (np.asarray(r) for r in REFERENCE)
    assert np.all(np.abs(od / ref_od - 1) < 0.35) and np.all(np.abs(bg - ref_bg) < 40)  # the development lab's
    other = _restain(rgb, (1.6, 0.6, 1.3), (0.95, 0.85, 1.0))   # a darker magenta stain, a warmer lamp
    bg2, od2 = stain_of(other, red)
    assert np.abs(od2 / od - (1.6, 0.6, 1.3)).max() < 0.15      # measured on the field's own red cells
    back = normalize_stain(other, red)
    bg3, od3 = stain_of(back, red)
    assert np.all(np.abs(od3 / ref_od - 1) < 0.1) and np.all(np.abs(bg3 - ref_bg) < 6)
    assert back.shape == rgb.shape and back.dtype == np.uint8


def test_a_field_with_too_few_red_cells_is_left_as_it_is():
    rgb, red = _field("PA171771.JPG")
    assert stain_of(rgb, red[:3]) is None
    assert normalize_stain(rgb, red[:3]) is rgb


def test_a_record_asking_for_an_unknown_stain_map_is_refused(tmp_path):
    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.fields.analysis import analyze_field
    from malaria_detect.modelfile import bundled_model_path, write_model_record

    pred = Predictor.load()
    rec = Record.from_json(pred.record.to_json())
    rec.stain_norm = "some-other-map-9"
    with pytest.raises(RecordError, match="stain map this version does not have"):
        rec.validate()
    # a model trained on mapped crops: the whole-field path maps each field before cutting its cells,
    # and finds the same objects (the detector sees the photo as it is)
    rec.stain_norm = STAIN_MAP
    model = tmp_path / "mapped.onnx"
    shutil.copy(bundled_model_path(), model)
    write_model_record(model, rec)
    mapped = Predictor.load(model)
    field = _restain(_field("PA171771.JPG")[0], (1.6, 0.6, 1.3), (0.95, 0.85, 1.0))
    a, b = analyze_field(pred, field, "f"), analyze_field(mapped, field, "f")
    assert [c["box"] for c in a["cells"]] == [c["box"] for c in b["cells"]]
    pa = [c["p_parasitized"] for c in a["cells"] if c["kind"] == "red cell"]
    pb = [c["p_parasitized"] for c in b["cells"] if c["kind"] == "red cell"]
    assert len(pa) == len(pb) > 50 and not np.allclose(pa, pb)
