"""Metric functions against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from malaria_detect import metrics as M


def test_binary_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
    m = M.binary_metrics(y, p, 0.5)
    assert m["confusion_matrix"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m["accuracy"] == 0.75 and m["recall"] == 0.75 and m["specificity"] == 0.75
    assert m["precision"] == 0.75 and m["f1"] == 0.75 and m["mcc"] == pytest.approx(0.5)
    assert m["roc_auc"] == pytest.approx(14 / 16)  # 14 of 16 positive/negative pairs ordered right


def test_thresholds_sit_between_scores_and_reach_the_target():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.95, 0.9, 0.6, 0.35, 0.5, 0.3, 0.2, 0.1])
    t = M.threshold_for_sensitivity(y, p, 1.0)
    assert 0.3 < t < 0.35 and M.binary_metrics(y, p, t)["recall"] == 1.0
    t = M.threshold_max_balanced_accuracy(y, p)
    assert M.binary_metrics(y, p, t)["balanced_accuracy"] == 0.875


def test_temperature_and_ece():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(20000) < M.sigmoid(z / 2.0)).astype(int)  # true temperature 2 on these logits
    assert M.fit_temperature(z, y) == pytest.approx(2.0, rel=0.08)
    assert M.ece(y, M.sigmoid(z / 2.0)) < M.ece(y, M.sigmoid(z))


def test_bootstrap_resamples_patients():
    y = np.array([1, 0] * 50)
    p = np.where(y == 1, 0.9, 0.1)
    p[:10] = 1 - p[:10]  # patient "a" is all wrong
    patients = np.array(["a"] * 10 + [f"p{i // 10}" for i in range(10, 100)])
    ci = M.bootstrap_ci(y, p, patients, n_boot=300)
    lo, hi = ci["accuracy"]
    assert lo < 0.9 < hi <= 1.0
