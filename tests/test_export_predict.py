"""Export to ONNX and torch-free prediction: equivalence, metadata, CLI, bad files, no torch import."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from malaria_detect import data as D
from malaria_detect.cells.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


def test_onnx_matches_pytorch_and_carries_the_record(tiny_run, tiny_onnx, samples):
    pytest.importorskip("torch")
    from malaria_detect.training.checkpoint import load_checkpoint
    from malaria_detect.training.export import torch_outputs

    model, rec, ood = load_checkpoint(tiny_run)
    pred = Predictor.load(tiny_onnx)
    assert pred.record.to_json() == rec.to_json()  # the whole record travels as ONNX metadata
    x, _, _, _ = D.load_arrays(D.find_images(samples), rec.input_size, use_cache=False, progress=False)
    z_o, cam_o, s_o = pred.run(x)
    z_t, cam_t, s_t = torch_outputs(model, ood, rec, x)
    assert np.abs(pred.probability(z_o) - pred.probability(z_t)).max() < 1e-4
    assert np.allclose(cam_o, cam_t, atol=1e-3) and np.allclose(s_o, s_t, rtol=1e-3, atol=1e-2)
    assert cam_o.shape == (len(x), 2, 2)  # 64 px input / 32
    assert np.allclose(cam_o.mean((1, 2)), z_o, atol=1e-4)  # CAM is exact for GAP + linear
    # dynamic batch axis
    assert pred.run(x[:1])[0].shape == (1,) and pred.run(x[:7])[0].shape == (7,)


def test_export_refuses_when_onnx_disagrees(tiny_run, tmp_path, monkeypatch, samples):
    pytest.importorskip("torch")
    from malaria_detect.training import export as E

    with pytest.raises(RuntimeError, match="disagree"):
        E.export(tiny_run, tmp_path / "m.onnx", sample_dir=samples, tol=-1.0)


def test_predict_cli_csv_with_bad_files_and_heatmaps(tiny_onnx, samples, tmp_path):
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    good = sorted((samples / "Parasitized").iterdir())[:3]
    for p in good:
        (folder / "nested" / p.name).write_bytes(p.read_bytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    png = (samples / "Uninfected").iterdir().__next__().read_bytes()
    (folder / "truncated.webp").write_bytes(png[: len(png) // 3])
    out = tmp_path / "out.csv"
    r = subprocess.run([sys.executable, "-m", "malaria_detect.cli", "predict", str(folder), "--model", str(tiny_onnx),
                        "--csv", str(out), "--heatmaps", str(tmp_path / "heat")], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # unreadable inputs: non-zero, after every row was written
    assert "3 of 6 inputs missing or unreadable" in r.stderr
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["path", "label", "p_parasitized", "ood", "error", "heatmap"]
    assert len(rows) == 6
    by = {Path(row["path"]).name: row for row in rows}
    for p in good:
        row = by[p.name]
        assert row["label"] in ("Parasitized", "Uninfected") and 0 <= float(row["p_parasitized"]) <= 1
        assert row["ood"] in ("true", "false") and row["error"] == ""
    assert "0 bytes" in by["empty.png"]["error"] and by["empty.png"]["label"] == ""
    assert by["text.png"]["error"] and by["truncated.webp"]["error"]
    assert "3 unreadable" in r.stdout and "parasitized fraction" in r.stdout
    assert len(list((tmp_path / "heat").glob("*.png"))) == 3
    for p in good:
        assert Path(by[p.name]["heatmap"]).parent == tmp_path / "heat" and Path(by[p.name]["heatmap"]).exists()
    assert by["empty.png"]["heatmap"] == ""


def test_importing_the_predictor_does_not_import_torch():
    code = ("import sys, malaria_detect.cells.predictor, malaria_detect.evaluation.evaluate, malaria_detect.serve.app, "
            "malaria_detect.cli; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_predict_and_evaluate_work_with_torch_unavailable(samples, tmp_path):
    """Block `import torch` entirely, as in an install without the [train] extra."""
    code = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
from malaria_detect.cli import main
assert main(['predict', {str(samples / 'Parasitized')!r}, '--csv', {str(tmp_path / 'p.csv')!r}]) == 0
assert main(['evaluate', '--data', {str(samples)!r}, '--split', 'all', '--bootstrap', '0', '--json']) == 0
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["model_kind"] == "onnx" and report["n_images"] == 221
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 93


def test_predictor_api_on_paths_bytes_and_errors(bundled, samples):
    paths = sorted((samples / "Parasitized").iterdir())[:2]
    res = bundled.predict([paths[0], paths[1].read_bytes(), b""], names=["a", "b", "c"])
    assert [r.source for r in res] == ["a", "b", "c"]
    assert res[0].label in bundled.record.class_names and res[2].error == "empty file (0 bytes)"
    one = bundled.predict_one(paths[0])
    assert one.p_parasitized == pytest.approx(res[0].p_parasitized, abs=1e-6)


def test_not_a_malaria_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        Predictor.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        Predictor.load(tmp_path / "junk.onnx")


def test_export_target_sensitivity_sets_the_operating_point(tiny_run, tmp_path, samples):
    pytest.importorskip("torch")
    from malaria_detect.evaluation import metrics as M
    from malaria_detect.training.export import export

    r = export(tiny_run, tmp_path / "sens.onnx", target_sensitivity=0.98, data_dir=samples)
    pred = Predictor.load(tmp_path / "sens.onnx")
    assert pred.record.extra["threshold_rule"] == "sensitivity >= 0.98 on validation"
    assert pred.record.extra["val_metrics"]["recall"] >= 0.98
    val = D.select(D.find_images(samples), pred.record.extra["split"]["val"])
    x, y, _, _ = D.load_arrays(val, pred.record.input_size, use_cache=False, progress=False)
    p = pred.probability(pred.run(x)[0])
    assert M.binary_metrics(y, p, pred.record.threshold)["recall"] >= 0.98
    assert "test_metrics" in r and r["test_metrics"]["n_patients"] >= 1


def test_bundled_models_by_name(samples, tmp_path, monkeypatch):
    """--model nih / robust / anylab pick the bundled models (a user from another lab need not find the
    package folder); a file of that name wins; an unknown name says what is accepted."""
    from malaria_detect.errors import MissingFileError
    from malaria_detect.evaluation.evaluate import Scorer
    from malaria_detect.modelfile import bundled_field_model_path, bundled_model_path

    assert Predictor.load("anylab").path == bundled_field_model_path()
    assert Predictor.load("anylab").path == bundled_model_path()  # one default everywhere
    assert Predictor.load("nih").path.name == "malaria_lite0.onnx"
    assert Predictor.load("robust").path.name == "malaria_lite0_robust.onnx"
    assert Scorer("anylab").path == bundled_field_model_path()
    cell = sorted((samples / "Parasitized").iterdir())[0]
    assert Predictor.load("robust").predict_one(cell).label == "Parasitized"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "robust").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        Predictor.load("robust")
    with pytest.raises(MissingFileError, match="'anylab'.*'robust'.*'nih'"):
        Predictor.load("robst")
