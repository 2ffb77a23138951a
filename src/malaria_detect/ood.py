"""The not-a-cell score, computed one way.

Photos, noise, screenshots and whole smear fields differ from segmented cells in the low- and
mid-level statistics of the network's own features. For each tapped feature map (the ends of two
stages, `forward_taps`), the per-channel mean and standard deviation (`tap_stats`) are compared
with the training cells by a class-conditional Gaussian with a shared, shrunk covariance: a layer's
distance is the Mahalanobis distance to the nearer class, divided by its median on validation cells;
the image's score is the larger of the layers' distances.

`NotACellScore` is that score as a torch module. The exported ONNX graph computes it (its
`ood_score` output), and training uses the same module to normalise each layer and to set the
record's `ood_threshold`, so the threshold is set on exactly the numbers the graph gives. Only the
Gaussians are fitted here, in NumPy float64 (`fit`).

Stored in checkpoints as arrays `ood.{i}.means` (2, D), `ood.{i}.prec` (D, D), `ood.{i}.scale` (1,).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SHRINK = 0.05      # covariance shrinkage towards its mean variance
PASS_RATE = 0.99   # the threshold lets this share of validation cells pass


def tap_stats(taps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-channel mean and standard deviation of each tapped feature map: (N, 2C) per tap."""
    out = []
    for t in taps:
        m = t.mean((2, 3))
        v = (t * t).mean((2, 3)) - m * m
        out.append(torch.cat([m, torch.sqrt(v.clamp_min(1e-6))], 1))
    return out


def _distance(s: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(N, D) statistics -> (N,) squared Mahalanobis distance to the nearer of the 2 class means."""
    d = s[:, None, :] - means[None]                                      # (N, 2, D)
    return torch.einsum("ncd,de,nce->nc", d, prec, d).min(1).values


class NotACellScore(nn.Module):
    """The score from a fitted model (the `ood.*` arrays): taps -> (N,) score."""

    def __init__(self, ood: dict):
        super().__init__()
        self.n_layers = len({k.split(".")[1] for k in ood})
        for k, v in ood.items():  # ood.0.means -> buffer ood_0_means
            self.register_buffer(k.replace(".", "_"), torch.as_tensor(np.asarray(v, np.float32)))

    def layer(self, i: int, stats: torch.Tensor) -> torch.Tensor:
        return _distance(stats, getattr(self, f"ood_{i}_means"), getattr(self, f"ood_{i}_prec")) \
            * getattr(self, f"ood_{i}_scale")

    def from_stats(self, stats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.layer(i, s) for i, s in enumerate(stats)], 1).max(1).values

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return self.from_stats(tap_stats(taps))


@torch.no_grad()
def score(ood: dict, stats: list[np.ndarray]) -> np.ndarray:
    """The score of tap statistics (as `predict_arrays(..., features=True)` gives them), by the module
    the exported graph runs."""
    return NotACellScore(ood).from_stats([torch.from_numpy(np.asarray(s, np.float32)) for s in stats]).numpy()


@torch.no_grad()
def fit(train_stats: list[np.ndarray], train_y: np.ndarray, val_stats: list[np.ndarray],
        shrink: float = SHRINK) -> dict:
    """The not-a-cell model, fitted on training cells' tap statistics; each layer's scale makes its
    median distance on the validation cells 1."""
    ood = {}
    for i, (ftr, fva) in enumerate(zip(train_stats, val_stats)):
        f = ftr.astype(np.float64)
        mus = np.stack([f[train_y == c].mean(0) for c in (0, 1)])
        c = f - mus[train_y]
        cov = c.T @ c / len(f)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
        part = {f"ood.{i}.means": mus.astype(np.float32), f"ood.{i}.prec": np.linalg.inv(cov).astype(np.float32),
                f"ood.{i}.scale": np.ones(1, np.float32)}
        d = NotACellScore(part).layer(i, torch.from_numpy(np.asarray(fva, np.float32))).numpy()
        part[f"ood.{i}.scale"][0] = 1.0 / np.median(d)
        ood.update(part)
    return ood


def threshold(val_scores: np.ndarray, pass_rate: float = PASS_RATE) -> float:
    """The score above which an input is not a cell: `pass_rate` of the validation cells pass."""
    return float(np.quantile(val_scores, pass_rate))
