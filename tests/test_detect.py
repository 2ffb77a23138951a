"""The bundled learned detector, torch-free (ONNX Runtime): what it finds on the sample fields, that
smear uses it end to end, and that a damaged copy is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_detect.cli import main
from malaria_detect.fields.detect import Detector

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ROOT / "samples" / "fields"


def test_the_bundled_detector_finds_the_boxed_cells_and_the_white_cells_of_the_sample_fields():
    from malaria_detect.evaluation.fieldscore import load_annotations, score_fields

    det = Detector.load("bundled")
    assert det.record["kinds"] == ["red cell", "white cell", "platelet"] and det.record["trained"]["steps"] > 0
    fields = []
    for name in ("PA171710.JPG", "PA171771.JPG"):  # a training field with two white cells; a validation field
        rgb = np.asarray(Image.open(FIELDS / name))
        boxes, kinds, _, cell = det.detect(rgb)
        assert 60 < cell < 95  # IML red cells are ~80 px
        fields.append({"image": name, "width": 1280, "height": 960,
                       "cells": [{"box": list(map(float, b)), "kind": k, "label": "Uninfected"} for b, k in zip(boxes, kinds)]})
        if name == "PA171710.JPG":
            assert kinds.count("white cell") >= 1
    s = score_fields({"fields": fields}, [r for r in load_annotations(ROOT / "samples" / "fields" / "annotations.json")
                                          if r["image_name"] in ("PA171710.JPG", "PA171771.JPG")])
    assert s["det_f1"] > 0.9, s


def test_a_damaged_bundled_detector_is_refused(tmp_path, monkeypatch):
    import shutil

    from malaria_detect import modelfile
    from malaria_detect.errors import ModelError

    assets = tmp_path / "assets"
    shutil.copytree(modelfile.bundled_model_path().parent, assets)
    blob = bytearray((assets / modelfile.BUNDLED_DETECTOR).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (assets / modelfile.BUNDLED_DETECTOR).write_bytes(bytes(blob))
    monkeypatch.setattr(modelfile, "bundled_model_path", lambda: assets / modelfile.BUNDLED_MODEL)
    with pytest.raises(ModelError, match="sha256"):
        Detector.load("bundled")


def test_smear_with_the_bundled_detector_reports_every_kind_and_counts_red_cells_only(tmp_path):
    out = tmp_path / "smear.json"
    assert main(["smear", str(FIELDS / "PA171710.JPG"), "--detector", "bundled", "--json", str(out)]) == 0
    field = json.loads(out.read_text())["fields"][0]
    kinds = [c["kind"] for c in field["cells"]]
    assert field["n_cells"] == kinds.count("red cell") > 100 and field["n_white_cells"] == kinds.count("white cell") >= 1
    assert all(c["label"] is None for c in field["cells"] if c["kind"] != "red cell")
    assert field["parasitemia"] is not None


def test_the_detector_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["smear", str(FIELDS / "PA171710.JPG"), "--detector", str(tmp_path / "none.onnx")])
    from malaria_detect.modelfile import detector_path

    with pytest.raises(SystemExit, match="finds the scale itself"):
        main(["smear", str(FIELDS / "PA171710.JPG"), "--detector", str(detector_path("bundled")),
              "--cell-diameter", "70"])


def test_a_given_cell_diameter_means_the_classical_segmenter(tmp_path):
    out = tmp_path / "r.json"
    assert main(["smear", str(FIELDS / "PA171710.JPG"), "--cell-diameter", "70", "--json", str(out)]) == 0
    f = json.loads(out.read_text())["fields"][0]
    assert f["cell_diameter_px"] == 70 and f["n_cells"] > 50
    assert main(["smear", str(FIELDS / "PA171710.JPG"), "--detector", "classical", "--json", str(out)]) == 0
    classical = json.loads(out.read_text())["fields"][0]
    assert main(["smear", str(FIELDS / "PA171710.JPG"), "--json", str(out)]) == 0
    default = json.loads(out.read_text())["fields"][0]
    from malaria_detect import load
    from malaria_detect.fields.analysis import SmearOptions, analyze_field

    segmented = analyze_field(load("anylab"), FIELDS / "PA171710.JPG", opts=SmearOptions(detector=None))
    assert [c["box"] for c in classical["cells"]] == [c["box"] for c in segmented["cells"]]
    assert [c["box"] for c in default["cells"]] != [c["box"] for c in classical["cells"]]
    assert all("stage" not in c for c in classical["cells"])  # stages are named on box crops only
