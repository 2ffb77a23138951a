"""The not-a-cell score is computed one way: the threshold set at training time is set on the
numbers the exported graph gives."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from malaria_detect import data as D
from malaria_detect.cells.predictor import Predictor
from malaria_detect.imaging import normalize
from malaria_detect.training import notacell as O
from malaria_detect.training.checkpoint import load_checkpoint
from malaria_detect.training.loop import predict_arrays


def test_training_score_equals_the_exported_graphs(tiny_run, tiny_onnx, samples):
    model, rec, ood = load_checkpoint(tiny_run)
    x, _, _, _ = D.load_arrays(D.find_images(samples), rec.input_size, use_cache=False, progress=False)
    mean, std = rec.mean, rec.std
    _, stats = predict_arrays(model, x, mean, std, features=True)
    s_train = O.score(ood, stats)                      # what train() sets the threshold on
    s_graph = Predictor.load(tiny_onnx).run(x)[2]      # what every prediction is flagged by
    assert np.allclose(s_train, s_graph, rtol=1e-3, atol=1e-3)
    # so the threshold passes, in the graph, the share of validation cells it was set to pass
    val = D.select(D.find_images(samples), rec.extra["split"]["val"])
    xv, _, _, _ = D.load_arrays(val, rec.input_size, use_cache=False, progress=False)
    passed = float(np.mean(~rec.is_ood(Predictor.load(tiny_onnx).run(xv)[2])))
    assert passed == pytest.approx(rec.extra["val_ood_pass_rate"], abs=1 / len(xv) + 1e-9)


def test_fit_normalises_each_layer_to_a_median_of_one_on_validation():
    rng = np.random.default_rng(0)
    tr = [rng.normal(size=(200, 6)).astype(np.float32), rng.normal(2, 1, size=(200, 4)).astype(np.float32)]
    va = [rng.normal(size=(80, 6)).astype(np.float32), rng.normal(2, 1, size=(80, 4)).astype(np.float32)]
    y = rng.integers(0, 2, 200)
    ood = O.fit(tr, y, va)
    assert set(ood) == {f"ood.{i}.{k}" for i in (0, 1) for k in ("means", "prec", "scale")}
    score = O.NotACellScore(ood)
    for i in (0, 1):
        assert np.median(score.layer(i, torch.from_numpy(va[i])).numpy()) == pytest.approx(1.0, rel=1e-4)
    far = [v + 50 for v in va]  # far from every training cell: flagged
    assert (O.score(ood, far) > O.threshold(O.score(ood, va))).all()


def test_train_and_model_offer_the_same_architectures():
    from malaria_detect.training.config import ARCHITECTURES
    from malaria_detect.training.models import ARCHITECTURES as MODELS

    assert list(ARCHITECTURES) == MODELS


def test_view_check_separates_and_its_cut_passes_the_asked_share_of_validation_cells():
    rng = np.random.default_rng(1)
    cells = rng.normal(0, 1, (400, 8)).astype(np.float32)
    views = rng.normal(0, 1, (300, 8)).astype(np.float32)
    views[:, 0] += 4          # several cells: far along one direction
    val = rng.normal(0, 1, (200, 8)).astype(np.float32)
    part = O.fit_view_check(cells, views, threshold=2.5, val_cells=val, pass_rate=0.99)
    ood = {"ood.0.means": np.zeros((2, 2), np.float32), "ood.0.prec": np.eye(2, dtype=np.float32),
           "ood.0.scale": np.full(1, 1e-6, np.float32), **part}
    score = O.NotACellScore(ood)
    taps = [torch.zeros(len(val), 1, 2, 2)]                  # the Gaussian part: ~0 for every image
    s_val = score(taps, torch.from_numpy(val)).numpy()
    assert np.mean(s_val <= 2.5) == pytest.approx(0.99, abs=0.01)
    s_views = score([torch.zeros(len(views), 1, 2, 2)], torch.from_numpy(views)).numpy()
    assert np.mean(s_views > 2.5) > 0.95
    # the layer score is above the threshold exactly where the linear score is above its cut
    lin = val.astype(np.float64) @ part["ood.view.w"] + part["ood.view.b"][0]
    assert ((s_val > 2.5) == (lin > 0)).all()


def test_view_check_is_computed_by_the_exported_graph(tiny_run, samples, tmp_path):
    """A checkpoint whose not-a-cell model has a view check exports to a graph giving the same score."""
    from malaria_detect.training.checkpoint import save_checkpoint
    from malaria_detect.training.export import export

    model, rec, ood = load_checkpoint(tiny_run)
    x, _, _, _ = D.load_arrays(D.find_images(samples), rec.input_size, use_cache=False, progress=False)
    with torch.no_grad():
        f, taps = model.forward_taps(torch.from_numpy(normalize(x, rec)))
    pooled = f.mean((2, 3)).numpy()
    rng = np.random.default_rng(0)
    part = O.fit_view_check(pooled[:60], pooled[60:120] + rng.normal(0, 1, pooled[60:120].shape).astype(np.float32),
                            rec.ood_threshold, pooled[120:])
    ood2 = {**ood, **part}
    save_checkpoint(tmp_path / "best.safetensors", model, rec, ood2)
    export(tmp_path / "best.safetensors", tmp_path / "m.onnx", sample_dir=samples)
    s_graph = Predictor.load(tmp_path / "m.onnx").run(x)[2]
    with torch.no_grad():
        s_torch = O.NotACellScore(ood2)(taps, f.mean((2, 3))).numpy()
        s_gauss = O.NotACellScore(ood)(taps).numpy()
    assert np.allclose(s_graph, s_torch, rtol=1e-3, atol=1e-3)
    assert (s_torch >= s_gauss - 1e-6).all()      # the view check only adds flags
    # leaving the first tapped layer out (as the robust model's flag does): the score is the larger of
    # the other parts, in torch and in the exported graph
    ood3 = O.leave_out(ood2, [0])
    assert float(ood2["ood.0.scale"][0]) > 0                  # the original arrays are not changed
    with torch.no_grad():
        parts = O.NotACellScore(ood2).parts(taps, f.mean((2, 3))).numpy()
        s_left = O.NotACellScore(ood3)(taps, f.mean((2, 3))).numpy()
    assert parts.shape == (len(x), 3) and np.allclose(parts.max(1), s_torch, rtol=1e-5)
    assert (parts[:, 0] > parts[:, 1:].max(1)).any()         # so leaving layer 0 out changes some scores
    assert np.allclose(s_left, parts[:, 1:].max(1), rtol=1e-5)
    save_checkpoint(tmp_path / "left.safetensors", model, rec, ood3)
    export(tmp_path / "left.safetensors", tmp_path / "left.onnx", sample_dir=samples)
    assert np.allclose(Predictor.load(tmp_path / "left.onnx").run(x)[2], s_left, rtol=1e-3, atol=1e-3)


def test_lab_stain_varies_colour_keeps_range_and_fills_some_black_surrounds():
    from malaria_detect.training.augment import lab_stain

    x = torch.zeros(64, 3, 16, 16)
    x[:, :, 4:12, 4:12] = torch.tensor([0.8, 0.6, 0.7])[None, :, None, None]   # a pinkish cell on black
    y = lab_stain(x.clone(), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    cell = y[:, :, 8, 8]
    assert float(cell.std(0).mean()) > 0.05                      # the cell's colour varies between views
    corner = y[:, :, 0, 0].amax(1)
    filled = corner > 0.02
    assert 0.2 < float(filled.float().mean()) < 0.8              # about half get a background...
    assert float(corner[~filled].max()) == 0.0                   # ...the others keep the black mask


def test_fitting_on_stain_views_lets_stain_varied_cells_pass(tiny_run, samples):
    """fit_not_a_cell with ood_stain_views: the threshold is set on the validation cells and a stain
    view of each, and other-lab-like views of held-back cells score lower than under the plain fit."""
    from dataclasses import replace
    from types import SimpleNamespace

    from malaria_detect.training.config import TrainConfig
    from malaria_detect.training.loop import fit_not_a_cell

    model, rec, _ = load_checkpoint(tiny_run)
    x, y, _, _ = D.load_arrays(D.find_images(samples), rec.input_size, use_cache=False, progress=False)
    data = SimpleNamespace(xtr=x[:150], ytr=y[:150], xva=x[150:190])
    cfg = TrainConfig(data=str(samples), out="unused", image_size=rec.input_size)
    _, f_va = predict_arrays(model, data.xva, rec.mean, rec.std, features=True)
    plain, s_plain = fit_not_a_cell(cfg, model, data, f_va)
    stained, s_stained = fit_not_a_cell(replace(cfg, ood_stain_views=2), model, data, f_va)
    assert len(s_plain) == 40 and len(s_stained) == 80        # validation cells + one stain view of each
    _, f_new = predict_arrays(model, x[190:], rec.mean, rec.std, features=True,
                              view=torch.Generator().manual_seed(123))   # stain views of unseen cells
    rel = lambda ood, s_va: O.score(ood, f_new) / O.threshold(s_va)  # noqa: E731
    assert np.median(rel(stained, s_stained)) < np.median(rel(plain, s_plain))
