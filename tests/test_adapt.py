"""Site calibration (`adapt`): a new model file fitted to a lab's own labelled cells, torch-free."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from malaria_detect import data as D
from malaria_detect.cells.predictor import Predictor
from malaria_detect.cli import main
from malaria_detect.evaluation.adapt import adapt


def _lab(tmp_path, samples, n_pos, n_neg):
    """A small labelled folder: the first n_pos / n_neg sample cells of each class."""
    lab = tmp_path / f"lab_{n_pos}_{n_neg}"
    for cls, n in (("Parasitized", n_pos), ("Uninfected", n_neg)):
        (lab / cls).mkdir(parents=True)
        for p in sorted((samples / cls).iterdir())[:n]:
            shutil.copy(p, lab / cls / p.name)
    return lab


def test_adapt_writes_a_calibrated_model_that_says_what_it_was_fitted_on(tmp_path, samples, bundled):
    lab = _lab(tmp_path, samples, 30, 40)
    out = tmp_path / "my_lab.onnx"
    r = adapt(lab, out)
    new = Predictor.load(out)  # loads and verifies (record valid, weights hash unchanged)
    a = new.record.extra["adapted"]
    assert a["n_files"] == 70 and a["n_parasitized"] == 30 and a["n_uninfected"] == 40
    assert len(a["files_sha256"]) == 64 and a["from_model"] == bundled.path.name
    assert set(a["what"]) == {"temperature", "threshold", "ood_threshold"}
    assert 0 < new.record.threshold < 1 and new.record.temperature > 0
    assert new.record.ood_threshold >= bundled.record.ood_threshold  # never tightened
    assert r["in_sample_after"]["sensitivity"] >= 0.9
    # the network is the same: identical logits; only the rule that reads them changed
    x, y, _, _ = D.load_arrays(D.find_images(lab), bundled.record.input_size, use_cache=False, progress=False)
    z_old, _, _ = bundled.run(x)
    z_new, _, _ = new.run(x)
    assert np.allclose(z_old, z_new, atol=1e-5)
    # the same files give the same hash; another set another one
    r2 = adapt(_lab(tmp_path, samples, 31, 40), tmp_path / "other.onnx")
    assert r2["files_sha256"] != a["files_sha256"]


def test_adapt_target_sensitivity(tmp_path, samples):
    lab = _lab(tmp_path, samples, 40, 40)
    r = adapt(lab, tmp_path / "s.onnx", target_sensitivity=1.0)
    assert r["in_sample_after"]["sensitivity"] == 1.0
    assert "sensitivity >= 1.0" in r["threshold_rule"]


@pytest.mark.parametrize("n_pos,n_neg,msg", [(0, 30, "both classes"), (3, 30, "too few"), (8, 8, "too few")])
def test_adapt_refuses_too_few_cells_or_one_class(tmp_path, samples, n_pos, n_neg, msg):
    lab = _lab(tmp_path, samples, n_pos, n_neg)
    with pytest.raises(D.DataError, match=msg):
        adapt(lab, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_adapt_cli_and_use_with_model(tmp_path, samples, capsys):
    lab = _lab(tmp_path, samples, 20, 20)
    out = tmp_path / "lab.onnx"
    assert main(["adapt", "--data", str(lab), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "temperature" in text and "--model" in text
    assert main(["predict", str(next((samples / "Parasitized").iterdir())), "--model", str(out)]) == 0
    assert main(["adapt", "--data", str(_lab(tmp_path, samples, 0, 25)), "--out", str(tmp_path / "y.onnx")]) == 1
    assert "both classes" in capsys.readouterr().err


def test_adapt_keeps_the_field_operating_point(tmp_path, samples):
    """The whole-field threshold stays where it was in raw-logit units (a few dozen cells cannot set
    an operating point for 1-2 % prevalence); only its expression under the new temperature changes.
    A model with a whole-field head of its own (the bundled default) keeps that head's temperature,
    threshold and field threshold as they are: adapt refits the cell head."""
    import math

    from malaria_detect.modelfile import bundled_field_model_path

    base = Predictor.load("robust").record
    adapt(_lab(tmp_path, samples, 30, 30), tmp_path / "f.onnx", "robust")
    new = Predictor.load(tmp_path / "f.onnx").record
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert new.temperature != base.temperature
    assert abs(new.temperature * logit(new.extra["field_threshold"])
               - base.temperature * logit(base.extra["field_threshold"])) < 1e-6
    base = Predictor.load(bundled_field_model_path()).record
    adapt(tmp_path / "lab_30_30", tmp_path / "g.onnx", bundled_field_model_path())
    new = Predictor.load(tmp_path / "g.onnx").record
    assert new.temperature != base.temperature and new.threshold != base.threshold
    assert new.object_head == base.object_head
    assert new.extra["field_threshold"] == base.extra["field_threshold"]
    assert new.field_temperature == base.field_temperature
