"""Red cells of other shapes than a healthy disc, made from real uninfected crops, taught as not
parasitized: what a lab whose patients have other blood disorders shows the classifier (the any-lab
issue found burr cells called parasitized). Torch-free: NumPy.

- crenated (echinocytes, burr cells): 10-24 short spicules around the rim, the cell a little denser;
- target cells: a pale ring inside the cell around a denser centre (haemoglobin in a bull's eye).

The cell in a box crop is found by its colour (darker than the crop's corners); a crop where no cell
stands out is returned as it is.
"""

from __future__ import annotations

import numpy as np


def _cell(crop: np.ndarray):
    """(centre x, centre y, radius, cell colour, background colour) of the cell in a box crop, or None."""
    a = crop.astype(np.float32)
    g = a.mean(2)
    S = g.shape[0]
    k = max(2, S // 10)
    corners = np.concatenate([a[:k, :k], a[:k, -k:], a[-k:, :k], a[-k:, -k:]]).reshape(-1, 3)
    bg = np.median(corners, 0)
    m = g < bg.mean() - 12
    if m.sum() < 0.1 * S * S:
        return None
    yy, xx = np.nonzero(m)
    return float(xx.mean()), float(yy.mean()), float(np.sqrt(m.sum() / np.pi)), np.median(a[m], 0), bg


def _disc(S: int, cx: float, cy: float, r: float, soft: float = 1.5) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S].astype(np.float32)
    return np.clip((r - np.hypot(xx - cx, yy - cy)) / soft + 0.5, 0, 1)


def _blend(out: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """`out` (float) painted with `colour` where `mask` (S, S) says, by its weight."""
    return out * (1 - mask[..., None]) + np.asarray(colour, np.float32) * mask[..., None]


def _painted(crop: np.ndarray, paint, rng) -> np.ndarray:
    """`crop` with `paint(out, cx, cy, r, colour, background, rng)` applied to its cell, if it has one."""
    found = _cell(crop)
    if found is None:
        return crop
    return np.clip(paint(crop.astype(np.float32), *found, rng), 0, 255).astype(np.uint8)


def _spicules(out, cx, cy, r, colour, bg, rng):
    S = out.shape[0]
    n = int(rng.integers(10, 25))
    phase = rng.uniform(0, 2 * np.pi)
    spikes = np.zeros((S, S), np.float32)
    for i in range(n):
        t = phase + 2 * np.pi * i / n + rng.normal(0, 0.08)
        d = r * rng.uniform(1.0, 1.08)
        spikes = np.maximum(spikes, _disc(S, cx + d * np.cos(t), cy + d * np.sin(t), r * rng.uniform(0.06, 0.1), 2.0))
    out = _blend(out, _disc(S, cx, cy, r * 0.98, 2.0) * rng.uniform(0.05, 0.2), colour * 0.85)  # a little denser
    return _blend(out, spikes * rng.uniform(0.6, 0.9), colour)  # the cell's own colour: bumps, not dots


def _bulls_eye(out, cx, cy, r, colour, bg, rng):
    S = out.shape[0]
    inner, outer = r * rng.uniform(0.18, 0.3), r * rng.uniform(0.5, 0.7)
    out = _blend(out, (_disc(S, cx, cy, outer, 5.0) - _disc(S, cx, cy, inner, 4.0)) * rng.uniform(0.3, 0.6), bg)
    return _blend(out, _disc(S, cx, cy, inner, 4.0) * rng.uniform(0.2, 0.45), colour * 0.8)


def crenate(crop: np.ndarray, rng) -> np.ndarray:
    """`crop` (S, S, 3 uint8) with its cell's rim spiculated (an echinocyte / burr cell)."""
    return _painted(crop, _spicules, rng)


def target(crop: np.ndarray, rng) -> np.ndarray:
    """`crop` with its cell made a target cell: a pale ring around a denser centre."""
    return _painted(crop, _bulls_eye, rng)
