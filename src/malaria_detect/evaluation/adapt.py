"""Site calibration: fit a model's operating point to one lab's own labelled cells.

    malaria-detect adapt --data MY_LABELLED_CELLS --out my_lab.onnx [--model M] [--target-sensitivity 0.95]

A lab's stain, camera and species shift the network's scores: it may still rank cells well (high
ROC-AUC) while its threshold, fitted on the training lab, misses infected cells, and its not-a-cell
flag may fire on every cell. With a small folder of the lab's own cells (`Parasitized/`,
`Uninfected/`, a few dozen of each) this refits, torch-free and in seconds:

- the **temperature** T of p = sigmoid(logit / T) (minimum negative log-likelihood on the lab's cells);
- the **threshold** on p: the model's own cut (unmoved in raw-logit units) unless the lab's cells show
  it is off: of the thresholds whose balanced accuracy on them is at most one misjudged cell of each
  class below the best, the one nearest the model's own (`metrics.threshold_near`; chosen inside the adapt pool,
  research/adapt_rule.py); or the highest threshold that reaches `--target-sensitivity`;
- the **not-a-cell threshold**: raised, if needed, to 1.2 x the score that 99 % of the lab's cells pass
  (their other fields vary more than 100 cells show), never lowered
  (a model's view check, which flags views of several cells, keeps its cut in the graph: raising the
  threshold from t to t' moves that cut by log(t'/t) on its linear score, a small loosening);

and writes a new model file: the same network and weights (so the weights hash is unchanged), a new
record whose `extra.adapted` says what was refitted, on what (folder, file count per class, a hash of
the files, date) and from which model. The network's weights are not changed.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from .. import data as D
from ..cells.predictor import Predictor
from ..evaluation import metrics as M
from ..modelfile import write_model_record

MIN_CELLS = 20          # refuse to calibrate on fewer cells than this ...
MIN_PER_CLASS = 5       # ... or fewer of either class
OOD_PASS = 0.99         # the not-a-cell threshold lets at least this share of the lab's cells pass...
OOD_MARGIN = 1.2        # ...times this margin, for the lab's other fields: chosen inside the adapt pool (fields
                        # PA171800-829: 100 cells of one half, measured on the other half; README), not on the
                        # reported fields: 1.02 left 2.6 % of the other half flagged, 1.2 1.2 %, while 96 % of
                        # the non-cell images stay flagged (97.5 % at 1.02); measured with the flag of stop 13
                        # (every part counted)


def files_hash(items) -> str:
    """sha256 over (class, name, content hash) of every file: identifies the calibration set."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.label, i.path.name)):
        h.update(f"{it.label}|{it.path.name}|{hashlib.sha256(it.path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def unmoved(threshold: float, old_temperature: float, new_temperature: float) -> float:
    """A threshold on p, unmoved in raw-logit units, expressed under the new temperature."""
    z = old_temperature * _logit(threshold)
    return float(1 / (1 + math.exp(-z / new_temperature)))


def field_threshold_under(old, new) -> float:
    """The whole-field threshold, unmoved in raw-logit units, expressed under the new temperature.

    A field needs an operating point for 1-2 % prevalence (specificity >= 99.7 %), which a few dozen
    labelled uninfected cells cannot set. Moving it with the refitted cell threshold was measured to
    drop infected-cell precision on held-out fields from 0.84 to 0.34 (MODEL_CARD.md), so adapt keeps it."""
    return unmoved(old.extra["field_threshold"], old.temperature, new.temperature)


def adapt(data_dir: str | Path, out: str | Path, model: str | Path | None = None,
          target_sensitivity: float | None = None, progress: bool = False) -> dict:
    """Refit temperature, threshold and not-a-cell threshold on a lab's labelled cells -> report dict."""
    pred = Predictor.load(model)
    out = Path(out)
    if out.resolve() == Path(pred.path).resolve():
        raise D.DataError(f"{out}: choose another --out than the model being adapted")
    with warnings.catch_warnings():  # patient ids do not matter here: nothing is split
        warnings.simplefilter("ignore", UserWarning)
        items = D.find_images(data_dir)
    n_pos = sum(i.label == 1 for i in items)
    n_neg = len(items) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise D.DataError(f"{data_dir}: calibration needs cells of both classes (found {n_pos} parasitized, "
                          f"{n_neg} uninfected)")
    x, y, kept, errors = D.load_arrays(items, pred.record.input_size, use_cache=False, progress=progress)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if len(y) < MIN_CELLS or min(n_pos, n_neg) < MIN_PER_CLASS:
        raise D.DataError(f"{data_dir}: too few readable cells to calibrate ({n_pos} parasitized, {n_neg} "
                          f"uninfected): give at least {MIN_CELLS} in all and {MIN_PER_CLASS} of each class")
    z, _, s = pred.run(x)
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(s))):
        raise D.DataError(f"{pred.path}: the model gives non-finite scores; it cannot be calibrated")
    old = pred.record
    before = M.binary_metrics(y, old.probability(z), old.threshold)
    ood_before = float(np.mean(old.is_ood(s)))

    record = old.__class__.from_json(old.to_json())
    record.temperature = T = M.fit_temperature(z, y)
    p = record.probability(z)
    if target_sensitivity:
        thr, rule = M.threshold_for_sensitivity(y, p, target_sensitivity), \
            f"sensitivity >= {target_sensitivity} on the lab's cells"
    else:
        thr = M.threshold_near(y, p, unmoved(old.threshold, old.temperature, T))
        rule = "the model's own threshold, moved only as far as the lab's cells show it is off: the nearest " \
               "to it of those at most one misjudged cell of each class below their best balanced accuracy"
    ood_thr = old.ood_threshold
    if ood_thr is not None:
        ood_thr = max(float(ood_thr), float(np.quantile(s, OOD_PASS)) * OOD_MARGIN)

    record.threshold, record.ood_threshold = float(thr), ood_thr
    if "field_threshold" in record.extra and record.object_head is None:  # the field decision stays where it
        # was (see field_threshold_under); a whole-field head of its own keeps its temperature and threshold
        record.extra["field_threshold"] = field_threshold_under(old, record)
    after = M.binary_metrics(y, p, thr)
    record.extra["adapted"] = {
        "what": ["temperature", "threshold", "ood_threshold"], "threshold_rule": rule,
        "data": str(data_dir), "n_files": len(y), "n_parasitized": n_pos, "n_uninfected": n_neg,
        "n_unreadable": len(errors), "files_sha256": files_hash(kept),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from_model": Path(pred.path).name,
        "from_model_sha256": hashlib.sha256(Path(pred.path).read_bytes()).hexdigest(),
        "before": {"temperature": old.temperature, "threshold": old.threshold, "ood_threshold": old.ood_threshold},
        # in-sample: fitted and measured on the same cells, so optimistic; measure on other cells of the lab
        "in_sample_before": {"sensitivity": before["recall"], "specificity": before["specificity"],
                             "accuracy": before["accuracy"]},
        "in_sample_after": {"sensitivity": after["recall"], "specificity": after["specificity"],
                            "accuracy": after["accuracy"]},
        "ood_flagged_before": ood_before,
        "ood_flagged_after": float(np.mean(record.is_ood(s))),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    shutil.copyfile(pred.path, tmp)
    write_model_record(tmp, record)
    tmp.replace(out)
    Predictor.load(out)  # the new file loads and verifies
    return {"out": str(out), **record.extra["adapted"], "after": {"temperature": T, "threshold": thr,
                                                                  "ood_threshold": ood_thr},
            "whole_field_head": record.object_head is not None}


def format_adapt(r: dict) -> str:
    """adapt's result as the terminal shows it."""
    b, s = r["in_sample_before"], r["in_sample_after"]
    return (f"calibrated on {r['n_files']} cells ({r['n_parasitized']} parasitized, {r['n_uninfected']} uninfected) "
            f"of {r['data']}\n"
            f"  temperature {r['before']['temperature']:.3f} -> {r['after']['temperature']:.3f}, threshold "
            f"{r['before']['threshold']:.3f} -> {r['after']['threshold']:.3f} ({r['threshold_rule']})\n"
            f"  on these cells (in-sample, optimistic): sensitivity {b['sensitivity']:.3f} -> "
            f"{s['sensitivity']:.3f}, specificity {b['specificity']:.3f} -> {s['specificity']:.3f}; flagged "
            f"not-a-cell {r['ood_flagged_before']:.1%} -> {r['ood_flagged_after']:.1%}\n"
            f"model written to {r['out']}: use it with --model (predict, smear, serve, evaluate)"
            + ("\n  whole fields keep the model's whole-field head and its operating point (only the not-a-cell "
               "threshold changes for them)" if r.get("whole_field_head") else ""))
