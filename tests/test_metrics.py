"""Metric functions against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from malaria_detect.evaluation import metrics as M


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


def test_a_small_labelled_set_moves_a_threshold_only_as_far_as_it_has_evidence_to():
    rng = np.random.default_rng(0)
    neg = rng.uniform(0.0, 0.5, 50)
    pos = np.r_[rng.uniform(0.75, 1.0, 49), 0.55]        # one infected cell scores low, near uninfected ones
    y, p = np.r_[np.zeros(50), np.ones(50)].astype(int), np.r_[neg, pos]
    # maximising balanced accuracy alone drops the threshold below that one cell ...
    assert M.threshold_max_balanced_accuracy(y, p) < 0.55
    # ... while one cell's worth of evidence leaves a threshold that is right where it was
    assert M.threshold_near(y, p, 0.7) == 0.7
    # a threshold that is clearly off (it misses most infected cells) is moved to within one cell of the best
    assert M.binary_metrics(y, p, 0.95)["recall"] < 0.5
    best = M.binary_metrics(y, p, M.threshold_max_balanced_accuracy(y, p))["balanced_accuracy"]
    m = M.binary_metrics(y, p, M.threshold_near(y, p, 0.95))
    assert m["recall"] >= 0.95 and m["balanced_accuracy"] >= best - 0.02 - 1e-9
    # a top score of exactly 1 (a small refitted temperature): the cut is judged by what it calls
    yy = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    pp = np.array([0.7, 0.5, 0.3, 0.2, 0.1, 1.0, 0.6, 0.4, 0.04, 0.03])
    top = M.binary_metrics(yy, pp, M.threshold_max_balanced_accuracy(yy, pp))["balanced_accuracy"]
    t = M.threshold_near(yy, pp, 0.99999)
    assert M.binary_metrics(yy, pp, t)["balanced_accuracy"] >= top - 0.2 - 1e-9
    # a reference on a cell's score is moved off it
    assert M.threshold_near(y, p, float(p[0])) != float(p[0])
    # with no slack it only breaks ties towards the reference: the best balanced accuracy
    assert M.binary_metrics(y, p, M.threshold_near(y, p, 0.95, cells=0))["balanced_accuracy"] == best


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


def test_pr_auc_does_not_depend_on_the_order_of_tied_scores():
    y = np.array([1, 0, 0, 1, 1, 0])
    p = np.array([0.9, 0.9, 0.9, 0.4, 0.4, 0.1])  # ties at 0.9 and at 0.4
    values = {M.pr_auc(y[o], p[o]) for o in (np.arange(6), np.array([1, 2, 0, 4, 3, 5]), np.array([0, 2, 1, 3, 4, 5]))}
    assert len(values) == 1
    # one step per distinct score: at 0.9 precision 1/3, recall 1/3; at 0.4 precision 3/5, recall 1
    assert values.pop() == pytest.approx(1 / 3 * 1 / 3 + 2 / 3 * 3 / 5)
    assert M.pr_auc([1, 0], [0.5, 0.5]) == M.pr_auc([0, 1], [0.5, 0.5]) == 0.5


def test_metrics_agree_with_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for trial in range(5):
        y = rng.integers(0, 2, 300)
        p = np.clip(0.35 * y + rng.random(300) * 0.65, 0, 1)
        if trial % 2:
            p = np.round(p, 1)  # many ties
        thr = 0.5
        yhat = p >= thr
        m = M.binary_metrics(y, p, thr)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, yhat))
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, yhat))
        assert m["precision"] == pytest.approx(sk.precision_score(y, yhat))
        assert m["recall"] == pytest.approx(sk.recall_score(y, yhat))
        assert m["specificity"] == pytest.approx(sk.recall_score(1 - y, ~yhat))
        assert m["f1"] == pytest.approx(sk.f1_score(y, yhat))
        assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y, yhat))
        assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p))
        assert m["pr_auc"] == pytest.approx(sk.average_precision_score(y, p))
        tn, fp, fn, tp = sk.confusion_matrix(y, yhat).ravel()
        assert m["confusion_matrix"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def test_bootstrap_resamples_whole_patients_not_cells():
    """Ten patients of 100 cells; the model is right on every cell of five patients and wrong on every
    cell of the other five. Resampling cells (1,000 nearly independent draws) would give an accuracy
    interval about 0.06 wide; resampling patients (10 draws) gives one about 0.6 wide, and every
    resample's accuracy is a whole number of patients out of ten."""
    patients = np.repeat([f"p{i}" for i in range(10)], 100)
    y = np.tile([1, 0], 500)
    right = np.repeat([True] * 5 + [False] * 5, 100)
    p = np.where(right == (y == 1), 0.9, 0.1)
    lo, hi = M.bootstrap_ci(y, p, patients, n_boot=400)["accuracy"]
    assert hi - lo > 0.4
    assert lo == pytest.approx(round(lo * 10) / 10) and hi == pytest.approx(round(hi * 10) / 10)
