"""Score a model on a folder of labelled cells -> report dict (+ JSON file and PNG plots).

Works on an ONNX model (no torch needed) or a torch checkpoint (.safetensors / run directory).
The test patients come from the split stored inside the model; any scored patient that the model
was trained or validated on is reported as `leaked_patients`, since such a figure is not honest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .. import data as D
from ..errors import ModelError, UsageError
from ..evaluation import metrics as M
from ..record import Record


class Scorer:
    """Uniform access to a model: record + uint8 arrays -> (logits, ood scores)."""

    def __init__(self, path: str | Path | None = None, tta: bool = False):
        from ..modelfile import model_path

        p = model_path(path) if path else None
        self.tta = tta
        if p is None or p.suffix == ".onnx":
            from ..cells.predictor import Predictor

            self.pred = Predictor.load(p)
            self.record: Record = self.pred.record
            self.path = self.pred.path
            self.kind = "onnx"
        else:
            from ..training.checkpoint import load_checkpoint
            from ..training.models import torch_outputs

            self.model, self.record, self.ood = load_checkpoint(p)
            self._torch_outputs = torch_outputs
            self.path = p
            self.kind = "torch"

    def __call__(self, x_uint8: np.ndarray):
        if self.kind == "onnx":
            z, _, s = self.pred.run_tta(x_uint8) if self.tta else self.pred.run(x_uint8)
        else:
            z, _, s = self._torch_outputs(self.model, self.ood, self.record, x_uint8)
        bad = int((~(np.isfinite(z) & np.isfinite(s))).sum())
        if bad:  # metrics over NaN probabilities would be numbers that mean nothing
            raise ModelError(f"{self.path}: the model's output is not a finite number for {bad} of {len(z)} "
                               f"images: the model file may be damaged")
        return z, s


TEST_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "mcc", "roc_auc",
             "pr_auc", "ece", "confusion_matrix", "n_images", "n_patients", "ci95")


def test_metrics(model: str | Path, data_dir: str | Path) -> dict:
    """A model file's figures on its record's held-out test patients (1,000 patient bootstraps), as its
    record keeps them (`extra.test_metrics`, shown at /model); never used to choose anything."""
    r = evaluate(model, data_dir, split="test", n_boot=1000, progress=False)
    return {k: r[k] for k in TEST_KEYS if k in r}


def evaluate(model: str | Path | None, data_dir: str | Path, split: str = "test", out: str | Path | None = None,
             patients_csv=None, n_boot: int = 1000, tta: bool = False, progress: bool = True,
             scorer: Scorer | None = None, patients: list[str] | None = None) -> dict:
    scorer = scorer or Scorer(model, tta=tta)
    rec = scorer.record
    items = D.find_images(data_dir, patients_csv)
    parts = rec.extra.get("split") or {}
    if patients is not None:
        items = D.select(items, patients)
    elif split in ("test", "val", "train"):
        if split not in parts:
            raise D.DataError(f"the model has no stored '{split}' split; use --split all for an external folder")
        items = D.select(items, parts[split])
        if not items:
            raise D.DataError(f"none of the model's {split} patients are in {data_dir}; "
                              f"use --split all to score every image in it")
    elif split != "all":
        raise UsageError("split must be test, val, train or all")
    seen = set(parts.get("train", [])) | set(parts.get("val", []))
    leaked = sorted({it.patient for it in items} & seen) if split != "train" and split != "val" else []
    x, y, items, errors = D.load_arrays(items, rec.input_size, progress=progress)
    z, s = scorer(x)
    p = rec.probability(z)
    patients_arr = np.array([it.patient for it in items])
    m = M.binary_metrics(y, p, rec.threshold)
    report = {
        "model": str(scorer.path), "model_kind": scorer.kind, "arch": rec.arch, "data": str(data_dir),
        "split": split if patients is None else "custom", "tta": tta,
        **{k: m[k] for k in M.METRIC_NAMES}, "confusion_matrix": m["confusion_matrix"],
        "threshold": rec.threshold, "temperature": rec.temperature,
        "ece": M.ece(y, p), "ece_uncalibrated": M.ece(y, M.sigmoid(z)),
        "n_images": int(len(y)), "n_patients": int(len(set(patients_arr))),
        "n_parasitized": int(y.sum()), "n_unreadable": len(errors),
        "ood_flagged_fraction": float((s > rec.ood_threshold).mean()) if rec.ood_threshold and len(s) else None,
        "leaked_patients": leaked,
    }
    if leaked:
        report["warning"] = (f"NOT AN HONEST FIGURE: {len(leaked)} scored patients were used to train or "
                             f"validate this model: {', '.join(leaked[:10])}{' ...' if len(leaked) > 10 else ''}")
        print(f"WARNING: {report['warning']}", file=sys.stderr)
    if n_boot and len(set(patients_arr)) > 1:
        report["ci95"] = M.bootstrap_ci(y, p, patients_arr, rec.threshold, n_boot=n_boot)
    report["per_patient"] = M.per_patient(y, p, patients_arr, rec.threshold)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        report["plots"] = write_plots(out, y, p, m, rec)
        (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def write_plots(out: Path, y, p, m, rec: Record) -> list[str]:
    """confusion_matrix.png, roc_curve.png and reliability.png in `out` (class names and threshold
    from the model's record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def figure(name, title, xlabel, ylabel, draw, size=(4.2, 4)):
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(str(out / name))

    def confusion(ax):
        cm = m["confusion_matrix"]
        grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                    color="white" if v > grid.max() / 2 else "black")
        ax.set_xticks([0, 1], list(rec.class_names))
        ax.set_yticks([0, 1], list(rec.class_names))

    def roc(ax):
        fpr, tpr, _ = M.roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {m['roc_auc']:.4f}")
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        ax.scatter([1 - m["specificity"]], [m["recall"]], color="red", zorder=3, label="operating point")
        ax.legend(loc="lower right")

    def reliability(ax):
        conf, acc, _ = M.reliability(y, p)
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        ax.plot(conf, acc, "o-", label=f"ECE = {M.ece(y, p):.4f}")
        ax.legend(loc="upper left")

    figure("confusion_matrix.png", f"confusion matrix (threshold {rec.threshold:.2f})", "predicted", "true",
           confusion, (4.2, 3.8))
    figure("roc_curve.png", f"ROC curve ({rec.positive} = positive)", "1 - specificity", "sensitivity", roc)
    figure("reliability.png", "reliability diagram", f"predicted p({rec.positive})",
           f"observed fraction {rec.positive}", reliability)
    return files


def format_report(r: dict) -> str:
    ci = r.get("ci95") or {}
    lines = [f"model: {r['model']} ({r['arch']}, {r['model_kind']})",
             f"data:  {r['data']}  split={r['split']}  images={r['n_images']}  patients={r['n_patients']}  "
             f"parasitized={r['n_parasitized']}",
             f"{'metric':<18}{'value':>8}   95% CI (bootstrap over patients)"]
    for k in M.METRIC_NAMES:
        c = ci.get(k)
        lines.append(f"{k:<18}{r[k]:>8.4f}   " + (f"[{c[0]:.4f}, {c[1]:.4f}]" if c else ""))
    cm = r["confusion_matrix"]
    lines.append(f"confusion matrix: tp={cm['tp']} fp={cm['fp']} tn={cm['tn']} fn={cm['fn']}  "
                 f"(threshold {r['threshold']:.3f})")
    lines.append(f"calibration: ECE {r['ece']:.4f} (before temperature scaling {r['ece_uncalibrated']:.4f})")
    if r.get("warning"):
        lines.append("WARNING: " + r["warning"])
    return "\n".join(lines)
