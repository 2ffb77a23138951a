"""One bundled model for every command: its cell head decides single cells, its whole-field head the
objects of fields (real sample fields and cells)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from malaria_detect import available_models, load
from malaria_detect.errors import ModelError
from malaria_detect.fields.analysis import analyze_field, field_threshold
from malaria_detect.fields.crops import box_crops
from malaria_detect.modelfile import bundled_field_model_path, bundled_model_path, write_model_record
from malaria_detect.record import Record, RecordError, sigmoid

FIELD = Path(__file__).resolve().parents[1] / "samples" / "fields" / "PA171771.JPG"


def test_the_default_of_single_cells_and_of_fields_is_one_file():
    assert bundled_model_path() == bundled_field_model_path()
    assert available_models()["anylab"]["default_for"] == ["single cells", "whole fields"]
    r = load().record
    assert r.object_head and r.field_temperature != r.temperature  # two heads, each with its calibration
    assert 0 < field_threshold(r) < 1 and field_threshold(r) != r.threshold


def test_field_cells_are_decided_by_the_whole_field_head(samples):
    pred = load()
    rec = analyze_field(pred, FIELD, FIELD.name)
    red = [c for c in rec["cells"] if c["kind"] == "red cell"]
    assert len(red) > 50
    x = box_crops(np.asarray(Image.open(FIELD).convert("RGB")), [SimpleNamespace(box=c["box"]) for c in red],
                  pred.record.input_size)
    z_field = pred.run_fields(x)[0]
    z_cell = pred.run(x)[0]
    got = np.array([c["p_parasitized"] for c in red])
    want = sigmoid(z_field / pred.record.field_temperature)
    assert np.allclose(got, want, atol=2e-6)  # the reported p is the whole-field head's, calibrated as it is
    assert not np.allclose(got, sigmoid(z_cell / pred.record.temperature), atol=1e-3)  # not the cell head's
    # and a single cell is the cell head's, with its heatmap
    cell = sorted((samples / "Parasitized").iterdir())[0]
    one = pred.predict_one(cell, heatmap=True)
    z = pred.run(np.asarray(Image.open(cell).convert("RGB").resize((112, 112), Image.BILINEAR))[None])[0]
    assert one.p_parasitized == pytest.approx(float(sigmoid(z / pred.record.temperature)[0]), abs=1e-6)
    assert one.cam is not None


def test_a_whole_field_head_needs_its_record_and_its_output(tmp_path):
    robust = load("robust").record
    for bad in ({"temperature": 0, "threshold": 0.3}, {"temperature": 1.0, "threshold": 1.5}, {"threshold": 0.3}, 7):
        r = Record.from_json(robust.to_json())
        r.object_head = bad
        with pytest.raises(RecordError, match="object_head must hold"):
            r.validate()
    # a record naming a whole-field head on a graph without one is refused at load
    r = Record.from_json(robust.to_json())
    r.object_head = {"temperature": 0.8, "threshold": 0.3}
    model = tmp_path / "no_head.onnx"
    shutil.copy(bundled_model_path().with_name("malaria_lite0_robust.onnx"), model)
    write_model_record(model, r)
    with pytest.raises(ModelError, match="disagree on a whole-field head"):
        load(model)


def test_a_model_without_the_new_keys_keeps_its_record_and_a_model_with_them_says_so():
    """A release that does not know `object_head` refuses such a model ("unknown record keys")
    rather than deciding its fields with the cell head; models without it are written as before."""
    assert "object_head" not in json.loads(load("nih").record.to_json())
    d = json.loads(load().record.to_json())
    assert set(d["object_head"]) >= {"temperature", "threshold"} and "stain_norm" not in d
    assert "object_head" not in d["extra"]
