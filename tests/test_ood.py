"""The not-a-cell score is computed one way: the threshold set at training time is set on the
numbers the exported graph gives."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from malaria_detect import data as D  # noqa: E402
from malaria_detect import ood as O  # noqa: E402
from malaria_detect.checkpoint import load_checkpoint  # noqa: E402
from malaria_detect.predict import Predictor  # noqa: E402
from malaria_detect.train import predict_arrays  # noqa: E402


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
    from malaria_detect.config import ARCHITECTURES
    from malaria_detect.models import ARCHITECTURES as MODELS

    assert list(ARCHITECTURES) == MODELS
