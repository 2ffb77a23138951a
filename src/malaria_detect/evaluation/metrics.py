"""Pure metric functions (NumPy): binary metrics with Parasitized as positive, ROC/PR, bootstrap
CIs over patients, calibration (temperature, ECE), operating-point thresholds."""

from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError

METRIC_NAMES = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "mcc",
                "roc_auc", "pr_auc")


def _div(a, b):
    return float(a) / float(b) if b else float("nan")


def confusion(y, yhat) -> dict:
    y, yhat = np.asarray(y).astype(bool), np.asarray(yhat).astype(bool)
    return {"tp": int((y & yhat).sum()), "fp": int((~y & yhat).sum()),
            "tn": int((~y & ~yhat).sum()), "fn": int((y & ~yhat).sum())}


def _ranked(y, score):
    """Counts at each distinct score, from the highest down (tied scores form one step, whatever
    their order): (true positives, false positives, the scores)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1].astype(int)
    tps = np.cumsum(yy)[distinct]
    return tps, (distinct + 1) - tps, s[distinct]


def roc_curve(y, score):
    """False-positive rate, true-positive rate and thresholds (descending), ties handled."""
    y = np.asarray(y).astype(bool)
    tps, fps, thr = _ranked(y, score)
    P, N = max(y.sum(), 1), max((~y).sum(), 1)
    return np.r_[0, fps / N], np.r_[0, tps / P], np.r_[np.inf, thr]


def roc_auc(y, score) -> float:
    y = np.asarray(y).astype(bool)
    if y.all() or (~y).all():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.trapezoid(tpr, fpr))


def pr_auc(y, score) -> float:
    """Average precision: the sum over distinct thresholds of precision x recall gained there (the
    area under the step-wise precision-recall curve). Tied scores are one threshold, so the answer
    does not depend on the order of tied examples."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    tps, fps, _ = _ranked(y, score)
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(y, p, threshold: float = 0.5) -> dict:
    """All scalar metrics plus the confusion matrix, for labels y (1 = parasitized) and scores p."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, np.float64)
    cm = confusion(y, p >= threshold)
    tp, fp, tn, fn = cm["tp"], cm["fp"], cm["tn"], cm["fn"]
    recall, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    precision = _div(tp, tp + fp)
    denom = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": _div(tp + tn, len(y)),
        "balanced_accuracy": (recall + spec) / 2,
        "precision": precision,
        "recall": recall,
        "specificity": spec,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "mcc": (tp * tn - fp * fn) / denom if denom else 0.0,
        "roc_auc": roc_auc(y, p),
        "pr_auc": pr_auc(y, p),
        "confusion_matrix": cm,
        "threshold": float(threshold),
    }


def bootstrap_ci(y, p, patients, threshold=0.5, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """95% CIs by resampling whole patients with replacement (cells of one patient are not independent)."""
    y, p, patients = np.asarray(y), np.asarray(p), np.asarray(patients)
    uniq, inv = np.unique(patients, return_inverse=True)
    groups = [np.nonzero(inv == i)[0] for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in METRIC_NAMES}
    for _ in range(n_boot):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        m = binary_metrics(y[idx], p[idx], threshold)
        for k in METRIC_NAMES:
            samples[k].append(m[k])
    out = {}
    for k, v in samples.items():
        v = np.asarray(v, np.float64)
        v = v[~np.isnan(v)]
        out[k] = [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))] if len(v) else None
    return out


def per_patient(y, p, patients, threshold=0.5) -> list[dict]:
    y, p, patients = np.asarray(y), np.asarray(p), np.asarray(patients)
    rows = []
    for pt in np.unique(patients):
        m = patients == pt
        yhat = p[m] >= threshold
        rows.append({"patient": str(pt), "n": int(m.sum()), "n_parasitized": int(y[m].sum()),
                     "predicted_parasitized": int(yhat.sum()),
                     "accuracy": float((yhat == y[m].astype(bool)).mean())})
    return rows


def sigmoid(z):
    z = np.asarray(z, np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_temperature(logits, y) -> float:
    """Temperature T minimising the NLL of sigmoid(logit / T) (golden-section search on log T)."""
    z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)

    def nll(logt):
        p = np.clip(sigmoid(z / math.exp(logt)), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    a, b = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if nll(c) < nll(d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return float(math.exp((a + b) / 2))


def ece(y, p, n_bins: int = 15) -> float:
    """Expected calibration error of p(parasitized) over equal-width bins."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / max(len(y), 1))


def reliability(y, p, n_bins: int = 15):
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            conf.append(float(p[m].mean()))
            acc.append(float(y[m].mean()))
            count.append(int(m.sum()))
    return conf, acc, count


def _between(thr: np.ndarray, i: int) -> float:
    """A threshold halfway between ROC point i's score and the next lower score, so that tiny
    numerical differences (ONNX vs PyTorch) cannot flip the examples at the boundary."""
    hi = min(float(thr[i]), 1.0) if np.isfinite(thr[i]) else 1.0
    lo = float(thr[i + 1]) if i + 1 < len(thr) else max(hi - 1e-3, 0.0)
    return (hi + lo) / 2


def threshold_max_balanced_accuracy(y, p) -> float:
    """Threshold on p that maximises (sensitivity + specificity) / 2 (Youden's J)."""
    fpr, tpr, thr = roc_curve(y, p)
    return _between(thr, int(np.argmax(tpr - fpr)))


def threshold_near(y, p, reference: float, cells: float = 1.0) -> float:
    """The threshold nearest `reference` (in logit) among those whose balanced accuracy on (y, p) is
    at most `cells` x (1/(2 n_pos) + 1/(2 n_neg)) below the best (the worth of one misjudged cell of
    each class): a small labelled set moves a threshold only as far as it has evidence to.
    (Maximising balanced accuracy alone on 100 cells moved a threshold that was already right: one
    infected cell with a low score, caught at no cost in sample, cost ~1 % specificity on the lab's
    other cells; research/adapt_rule.py.) Every candidate sits between two scores, never on one."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, np.float64)
    _, _, thr = roc_curve(y, p)
    below = p[p < reference]
    if np.any(p == reference):  # keep the boundary off a cell's score, as _between does
        reference = (reference + (below.max() if len(below) else reference - 1e-3)) / 2
    cuts = np.array([_between(thr, i) for i in range(len(thr))] + [reference])
    ranked = np.array([(np.mean(p[y] >= c) + np.mean(p[~y] < c)) / 2 for c in cuts])
    tol = cells * 0.5 * (1 / max(y.sum(), 1) + 1 / max((~y).sum(), 1))
    ok = cuts[ranked >= ranked.max() - tol - 1e-12]

    def logit(q):
        q = np.clip(q, 1e-9, 1 - 1e-9)
        return np.log(q / (1 - q))

    return float(ok[np.argmin(np.abs(logit(ok) - logit(reference)))])


def threshold_for_sensitivity(y, p, target: float) -> float:
    """The highest threshold whose sensitivity on (y, p) is at least `target`."""
    fpr, tpr, thr = roc_curve(y, p)
    ok = np.nonzero(tpr >= target)[0]
    if not len(ok):
        raise UsageError(f"no threshold reaches sensitivity {target}")
    return _between(thr, int(ok[0]))
