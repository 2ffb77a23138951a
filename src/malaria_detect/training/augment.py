"""Augmentation on batches, in torch: flips, rotations, colour and stain jitter, another lab's stain."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _hue_rotate(x, angle):
    """Rotate hue by `angle` radians per sample (N,) on RGB in [0,1] via the YIQ colour space."""
    c, s = torch.cos(angle), torch.sin(angle)
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    rot = torch.zeros(len(angle), 3, 3, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = from_yiq @ rot @ to_yiq  # (N,3,3)
    return torch.einsum("nij,njhw->nihw", m, x)


def augment(x: torch.Tensor, g: torch.Generator, robust: bool = False, lab_share: float = 0.0) -> torch.Tensor:
    """Cells have no orientation and smears differ in stain colour: flips, 90-degree rotations and
    brightness / contrast / saturation / hue jitter. With `robust`, also what differs between labs
    and microscopes (`robust_jitter`); with `lab_share`, that share of the images as another lab's
    cell (`lab_stain`). x: (N,3,H,W) float in [0,1]."""
    n = x.shape[0]
    u = lambda lo, hi: torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=g)  # noqa: E731
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    k = torch.randint(0, 4, (n,), generator=g)
    x = torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k)])
    if robust:
        x = robust_jitter(x, g)
    if lab_share > 0:
        pick = torch.rand(n, generator=g) < lab_share
        if pick.any():
            x = x.clone()
            x[pick] = lab_stain(x[pick].contiguous(), g)
    x = x * u(0.75, 1.25)                                            # brightness
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.75, 1.25) + mean                            # contrast
    gray = (x * x.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    x = gray + (x - gray) * u(0.6, 1.4)                              # saturation
    x = _hue_rotate(x, torch.empty(n).uniform_(-0.35, 0.35, generator=g))  # hue, +-20 degrees
    return x.clamp_(0, 1)


def robust_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Other labs' stains, lamps, optics and magnifications, on (N,3,H,W) in [0,1]:
    - stain: each channel's optical density (-log of transmitted light, which is what a stain's
      amount changes linearly) scaled by 0.7-1.3 and shifted by +-0.05;
    - gamma 0.7-1.4 (camera response);
    - focus: Gaussian blur (sigma 0.5-1.5 px) on 30 % of the images;
    - magnification: zoom 0.8-1.2 (black outside, like a segmented crop) on half of the images."""
    n = x.shape[0]
    u = lambda lo, hi, *s: torch.empty(n, *s).uniform_(lo, hi, generator=g)  # noqa: E731
    black = x.amax(1, keepdim=True) < 0.02          # the mask's black surround stays black
    od = -torch.log(x.clamp(1 / 255, 1))
    od = od * u(0.7, 1.3, 3, 1, 1) + u(-0.05, 0.05, 3, 1, 1)
    x = torch.exp(-od.clamp_min(0)).clamp(0, 1) ** u(0.7, 1.4, 1, 1, 1)
    x = torch.where(black, torch.zeros_like(x), x)
    blur = torch.rand(n, generator=g) < 0.3
    if blur.any():
        sig = u(0.5, 1.5)[blur]
        r = torch.arange(-3, 4, dtype=x.dtype)
        k1 = torch.exp(-(r[None] ** 2) / (2 * sig[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)                              # (m, 7)
        xb = x[blur]
        m = xb.shape[0]
        kh = k1.repeat_interleave(3, 0)[:, None, None, :]              # (3m,1,1,7)
        kv = k1.repeat_interleave(3, 0)[:, None, :, None]
        y = xb.reshape(1, 3 * m, *xb.shape[2:])
        y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kh, groups=3 * m)
        y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kv, groups=3 * m)
        x = x.clone()
        x[blur] = y.reshape_as(xb)
    zoom = torch.rand(n, generator=g) < 0.5
    if zoom.any():
        s = u(0.8, 1.2)[zoom]
        theta = torch.zeros(len(s), 2, 3, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
        grid = F.affine_grid(theta, list(x[zoom].shape), align_corners=False)
        x = x.clone()
        x[zoom] = F.grid_sample(x[zoom], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


def lab_stain(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Another lab's cell, broadly, on (N,3,H,W) in [0,1]: the spread of Giemsa stains, lamps and
    crops that the classifier (`lab_stain_aug`) must see through and the not-a-cell flag
    (`ood_stain_views`) must let pass; wider than `robust_jitter`:
    - stain: optical densities mixed by a random matrix near the identity (sd 0.15: the stains'
      colours themselves differ) and scaled 0.6-1.5 per channel;
    - hue rotated by up to +-45 degrees, saturation 0.5-1.6, gamma 0.7-1.4;
    - background: on half of the masked cells the black surround first becomes a pale plasma colour,
      as in a crop cut by its box (users crop cells with their background), and is then stained and
      lit like the cell."""
    n = x.shape[0]
    u = lambda lo, hi, *s: torch.empty(n, *s).uniform_(lo, hi, generator=g)  # noqa: E731
    black = x.amax(1, keepdim=True) < 0.02
    plasma = (u(0.75, 0.95, 1, 1, 1) + 0.04 * torch.randn(n, 3, 1, 1, generator=g)).clamp(0, 1)
    fill = (torch.rand(n, generator=g) < 0.5)[:, None, None, None] & black
    x = torch.where(fill, plasma.expand_as(x), x)   # the background then takes the same stain and lamp
    od = -torch.log(x.clamp(1 / 255, 1))
    mix = torch.eye(3)[None] + 0.15 * torch.randn(n, 3, 3, generator=g)
    od = torch.einsum("nij,njhw->nihw", mix, od) * u(0.6, 1.5, 3, 1, 1)
    x = _hue_rotate(torch.exp(-od.clamp_min(0)).clamp(0, 1), u(-0.8, 0.8)).clamp(0, 1)
    gray = (x * x.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    x = (gray + (x - gray) * u(0.5, 1.6, 1, 1, 1)).clamp(0, 1) ** u(0.7, 1.4, 1, 1, 1)
    return torch.where(black & ~fill, torch.zeros_like(x), x)


def to_input(xb_uint8: np.ndarray, mean, std, g: torch.Generator | None = None,
             robust: bool = False, lab_share: float = 0.0, view: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N,H,W,3) -> the network's input: augmented with `g` (training), or with `view` (a seeded
    generator) one `lab_stain` view of each image; then scaled with mean/std."""
    x = torch.from_numpy(xb_uint8).permute(0, 3, 1, 2).float().div_(255)
    if g is not None:
        x = augment(x, g, robust, lab_share)
    if view is not None:
        x = lab_stain(x.contiguous(), view)
    x = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    return x.contiguous(memory_format=torch.channels_last)
