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

Optionally (`fit_view_check`) a second, discriminative part: a linear score on the network's pooled
final features, trained to tell single cells (and their stain views) from views of a field that hold
several cells or mostly background, which the Gaussians, fitted on cells of two labs and broad stain
variation, let pass. Its layer score is `threshold * exp(w . f + b)`, above the threshold exactly when
the linear score is above its cut, and the image's score is the larger of both parts.

A part whose scale is 0 is left out of the score (`leave_out`): recipes/robust/flag_margin.py may leave out
the first tapped layer, whose statistics are mostly colour and drift with a lab's stain from field to
field, when the other parts flag as many non-cell images.

Stored in checkpoints as arrays `ood.{i}.means` (2, D), `ood.{i}.prec` (D, D), `ood.{i}.scale` (1,),
and for the view check `ood.view.w` (C,), `ood.view.b` (1,), `ood.view.scale` (1,).
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
        self.view_check = "ood.view.w" in ood
        for k, v in ood.items():  # ood.0.means -> buffer ood_0_means
            self.register_buffer(k.replace(".", "_"), torch.as_tensor(np.asarray(v, np.float32)))

    def layer(self, i: int, stats: torch.Tensor) -> torch.Tensor:
        return _distance(stats, getattr(self, f"ood_{i}_means"), getattr(self, f"ood_{i}_prec")) \
            * getattr(self, f"ood_{i}_scale")

    def layers(self, stats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tapped layer's score, from its statistics."""
        return [self.layer(i, s) for i, s in enumerate(stats)]

    def from_stats(self, stats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(self.layers(stats), 1).max(1).values

    def view_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled final features -> (N,) the view check's layer score."""
        return self.ood_view_scale * torch.exp((pooled @ self.ood_view_w + self.ood_view_b).clamp(max=30.0))

    def parts(self, taps: list[torch.Tensor], pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(N, P) each part's score: the tapped layers, then the view check if there is one."""
        cols = self.layers(tap_stats(taps))
        if self.view_check:
            cols.append(self.view_score(pooled))
        return torch.stack(cols, 1)

    def forward(self, taps: list[torch.Tensor], pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.parts(taps, pooled).max(1).values


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


def fit_view_check(cells: np.ndarray, views: np.ndarray, threshold: float, val_cells: np.ndarray,
                   pass_rate: float = 0.995, weight_decay: float = 1e-3, steps: int = 300) -> dict:
    """The view check: logistic regression, cells (label 0) vs views of several cells or background
    (label 1), on standardised pooled features (N, C); its cut lets `pass_rate` of `val_cells` pass.
    -> the `ood.view.*` arrays, with the standardisation folded into w and b."""
    x = np.concatenate([cells, views]).astype(np.float64)
    y = np.r_[np.zeros(len(cells)), np.ones(len(views))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd).float()
    yt = torch.from_numpy(y).float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    weight = torch.where(yt > 0, 0.5 / yt.mean(), 0.5 / (1 - yt.mean()))  # classes weighted equally
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="none")).mean() \
            + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    wf = w.detach().numpy().astype(np.float64) / sd
    bf = float(b.detach()) - float(mu @ wf)
    cut = float(np.quantile(val_cells.astype(np.float64) @ wf + bf, pass_rate))
    return {"ood.view.w": wf.astype(np.float32), "ood.view.b": np.array([bf - cut], np.float32),
            "ood.view.scale": np.array([threshold], np.float32)}


def leave_out(ood: dict, layers) -> dict:
    """A copy of the not-a-cell arrays whose tapped `layers` no longer count (their scale set to 0)."""
    out = {k: np.array(v, copy=True) for k, v in ood.items()}
    for i in layers:
        out[f"ood.{i}.scale"][:] = 0.0
    return out


def threshold(val_scores: np.ndarray, pass_rate: float = PASS_RATE) -> float:
    """The score above which an input is not a cell: `pass_rate` of the validation cells pass."""
    return float(np.quantile(val_scores, pass_rate))
