"""Tests on the full NIH dataset in ../shared/data (marker: slow; run with `make test-slow`)."""

from __future__ import annotations

import json

import pytest

from malaria_detect.cli import main

pytestmark = pytest.mark.slow


def test_bundled_model_on_its_test_patients(nih, capsys):
    assert main(["evaluate", "--data", str(nih), "--json", "--bootstrap", "200"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["leaked_patients"] == [] and r["n_patients"] == 32 and r["split"] == "test"
    assert r["accuracy"] >= 0.96 and r["roc_auc"] >= 0.99


def test_check_data_on_the_full_dataset(nih):
    from malaria_detect.data import check_data

    r = check_data(nih, progress=False)
    assert r["n_images"] == 21894 and r["n_patients"] == 160
    assert r["per_class"] == {"Uninfected": 11049, "Parasitized": 10845}
    assert r["unreadable"] == []


def test_robust_model_on_the_same_test_patients(nih, capsys):
    """The whole-field model keeps NIH performance: same 32 test patients, none leaked (its split adds
    IML fields to the NIH split of the first model)."""
    from malaria_detect.modelfile import bundled_field_model_path

    assert main(["evaluate", "--model", str(bundled_field_model_path()), "--data", str(nih), "--json",
                 "--bootstrap", "200"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["leaked_patients"] == [] and r["n_patients"] == 32 and r["split"] == "test"
    assert r["accuracy"] >= 0.97 and r["recall"] >= 0.965 and r["specificity"] >= 0.97 and r["roc_auc"] >= 0.99


def test_whole_fields_on_held_out_iml_fields():
    """`smear` on ten held-out IML fields (PA171830-839): cells found and infected cells called with
    the precision measured on the whole block (benchmarks/smear_iml.py)."""
    from pathlib import Path

    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.evaluation.fieldscore import load_annotations, score_fields
    from malaria_detect.fields.analysis import analyze_fields
    from malaria_detect.modelfile import bundled_field_model_path

    iml = Path(__file__).resolve().parents[2] / "shared" / "data" / "iml-fields"
    if not (iml / "annotations.json").exists():
        pytest.skip("the IML fields are not at ../shared/data/iml-fields")
    recs = [r for r in load_annotations(iml / "annotations.json") if r["image_name"].startswith("PA17183")]
    rep = analyze_fields(Predictor.load(bundled_field_model_path()), [iml / "images" / r["image_name"] for r in recs])
    s = score_fields(rep, recs)
    assert s["fields"] == 10 and s["det_f1"] >= 0.93 and s["inf_precision"] >= 0.6
