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
