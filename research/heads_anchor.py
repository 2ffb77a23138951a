"""How strongly the new parasitized head is pulled towards the robust model's own (`train-heads --anchor`),
chosen on validation crops only.

    .venv/bin/python research/heads_anchor.py runs/anylab     # a train-heads run (its crops.npz, features.npz)

For each anchor, fits the heads on the run's training crops and prints, on its validation crops: NIH
(16 validation patients) ROC-AUC and accuracy / sensitivity / specificity at the max-balanced-accuracy
threshold; and the share of IML validation infected cells (PA171770-799) still called at the threshold
where 0.5 (or 1) of 1,000 TXL-PBC validation red cells are called parasitized -- the trade the whole-field
operating point has to make. The base model's own head is the first row.

Measured (CPU, 2026-12-02, the crops of `train-heads` defaults):
| anchor | NIH AUC | NIH acc / sens / spec | IML recall at TXL 0.5 / 1 per 1,000 |
|---|---|---|---|
| base head | 0.9943 | 0.9664 / 0.9653 / 0.9668 | 0.30 / 0.62 |
| 0.003 | 0.9899 | 0.9638 / 0.9606 / 0.9650 | 0.72 / 0.88 |
| 0.03 | 0.9913 | 0.9670 / 0.9606 / 0.9695 | 0.76 / 0.76 |
| 0.1 | 0.9921 | 0.9657 / 0.9676 / 0.9650 | 0.76 / 0.76 |
| 0.3 | 0.9929 | 0.9696 / 0.9676 / 0.9704 | 0.74 / 0.74 |
Chosen: 0.3, the best NIH validation figures among the anchors that keep IML recall at TXL 0.5 per 1,000
within 0.02 of the best (50 infected validation cells: 0.02 is one cell).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from malaria_detect.evaluation import metrics as M
from malaria_detect.record import sigmoid
from malaria_detect.training.config import HeadsConfig
from malaria_detect.training.heads import RED, SOURCES, Crops, apply_heads, base_head, base_model_path, fit_heads


def main(run: str = "runs/anylab", anchors=(0.003, 0.03, 0.1, 0.3)):
    c = Crops.load(Path(run) / "crops.npz")
    f = np.load(Path(run) / "features.npz")["f"]
    va = c.split == 1
    nih = va & (c.source == SOURCES.index("NIH"))
    iml = va & (c.source == SOURCES.index("IML")) & (c.kind == RED)
    txl = va & (c.source == SOURCES.index("TXL-PBC")) & (c.kind == RED)
    base = base_head(base_model_path("robust"))

    def row(name, z):
        T = M.fit_temperature(z[nih], c.parasitized[nih])
        p = sigmoid(z / T)
        m = M.binary_metrics(c.parasitized[nih], p[nih], M.threshold_max_balanced_accuracy(c.parasitized[nih], p[nih]))
        y = c.parasitized[iml]
        order = np.sort(z[txl])[::-1]
        at = [(z[iml][y == 1] > order[int(r * txl.sum())]).mean() for r in (0.0005, 0.001)]
        print(f"| {name} | {m['roc_auc']:.4f} | {m['accuracy']:.4f} / {m['recall']:.4f} / {m['specificity']:.4f} | "
              f"{at[0]:.2f} / {at[1]:.2f} |", flush=True)

    print("| anchor | NIH AUC | NIH acc / sens / spec | IML recall at TXL 0.5 / 1 per 1,000 |\n|---|---|---|---|")
    row("base head", f @ base[0] + base[1][0])
    for a in anchors:
        h = fit_heads(f, c, replace(HeadsConfig(), anchor=a), base, say=lambda *_: None)
        row(str(a), apply_heads(f, h)[0])


if __name__ == "__main__":
    main(*sys.argv[1:2])
