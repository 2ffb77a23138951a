"""EMFET (PyPI `emfet` 2.0: 5 hand-crafted features + random forest) on the shipped model's split.

EMFET needs numpy<2, so it runs in its own venv (made by compare_models.py, or by hand):
    python3 -m venv benchmarks/.emfet-venv && benchmarks/.emfet-venv/bin/pip install emfet==2.0.0
    benchmarks/.emfet-venv/bin/python benchmarks/emfet_baseline.py --data ../shared/data/nih-cells \
        --split runs/lite0/split.json --out runs/emfet.json

The random forest is fit on the training patients' cells and scored on the test patients' cells of
the given split (the same patients the CNNs are scored on). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from emfet.features import extract_features
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import confusion_matrix, matthews_corrcoef, roc_auc_score

PATIENT = re.compile(r"^(C\d+[A-Za-z0-9]*?)(?:_|thin|Thin)")


def _feat(path):
    f = extract_features(str(path))
    return None if f is None else f.tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True, help="split.json with parts train/val/test")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    parts = json.loads(Path(a.split).read_text())["parts"]
    where = {p: k for k, ps in parts.items() for p in ps}
    rows = []
    for cls, label in (("Parasitized", 1), ("Uninfected", 0)):
        for p in sorted((Path(a.data) / cls).iterdir()):
            m = PATIENT.match(p.name)
            part = where.get(m.group(1)) if m else None
            if part in ("train", "test"):
                rows.append((p, label, part))
    t = time.time()
    with ProcessPoolExecutor(a.workers) as ex:
        feats = list(ex.map(_feat, [r[0] for r in rows], chunksize=256))
    t_feat = time.time() - t
    keep = [i for i, f in enumerate(feats) if f is not None]
    X = np.array([feats[i] for i in keep])
    y = np.array([rows[i][1] for i in keep])
    part = np.array([rows[i][2] for i in keep])
    tr, te = part == "train", part == "test"
    clf = RandomForestClassifier(n_estimators=300, min_samples_leaf=2, n_jobs=a.workers, random_state=0)
    clf.fit(X[tr], y[tr])
    p = clf.predict_proba(X[te])[:, 1]
    yhat = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y[te], yhat, labels=[0, 1]).ravel()
    res = {"method": "EMFET 2.0 features + random forest", "n_train": int(tr.sum()), "n_test": int(te.sum()),
           "accuracy": float((yhat == y[te]).mean()), "precision": float(tp / max(tp + fp, 1)),
           "recall": float(tp / max(tp + fn, 1)), "specificity": float(tn / max(tn + fp, 1)),
           "f1": float(2 * tp / max(2 * tp + fp + fn, 1)), "mcc": float(matthews_corrcoef(y[te], yhat)),
           "roc_auc": float(roc_auc_score(y[te], p)),
           "confusion_matrix": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
           "feature_seconds": round(t_feat, 1), "unreadable": len(rows) - len(keep)}
    text = json.dumps(res)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
