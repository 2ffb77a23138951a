"""The object detector for whole fields: red cells, white cells and platelets, any lab, any scale.

    malaria-detect train-detector --data ../shared/data --out runs/det [--steps 3000] [--resume]
    malaria-detect export-detector --run runs/det --out detector.onnx

A centre-heatmap detector (CenterNet-style) on EfficientNet-Lite0 (ImageNet weights, the stages to
stride 16), one heatmap per kind and the box size at stride 8. Trained on crops in which the median red
cell is 28-80 px (`cell_px`), so it finds cells at any magnification once a field is brought near that
scale (fields/detect.py does it in two passes). Fields of the IML lab box only red cells and not those
cut by the image border: there the other kinds, the border band and `difficult` boxes teach nothing
(weight 0), so an unboxed white cell is never taught as background. Checkpoints every `val_every`
steps (last.safetensors + state.json: --resume continues), the best by validation score
(best.safetensors). CPU or GPU; no torchvision.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.folders import DataError
from ..data.objects import KINDS, LabelledField, detector_split, labelled_fields
from ..imaging import FIELD_MAX_PIXELS, open_rgb
from .augment import lab_stain
from .config import DetConfig
from .models import LITE_MEAN, LITE_STD, EfficientNetLite, load_backbone_strict, load_imagenet_state

STRIDE = 8
STORE_CELL = 80      # fields are kept in memory scaled so that their median red cell is at most this
N_OUT = len(KINDS) + 4   # heatmaps, then log(w / STRIDE), log(h / STRIDE), offset x, offset y


class CellDetector(nn.Module):
    """Lite0 to stride 16, fused with stride 8 -> (N, len(KINDS) + 4, H / 8, W / 8)."""

    def __init__(self, pretrained: bool = True):
        super().__init__()
        base = EfficientNetLite()
        if pretrained:
            load_backbone_strict(base, load_imagenet_state("efficientnet_lite0"))
        self.stem, self.bn0 = base._conv_stem, base._bn0
        self.blocks = nn.ModuleList(base._blocks[:11])     # stages 1-5: stride 16, 112 channels
        self.s8 = 4                                        # the last block at stride 8 (40 channels)
        self.lateral = nn.Conv2d(112, 64, 1)
        self.fuse = nn.Sequential(nn.Conv2d(40 + 64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(64, N_OUT, 1)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[:len(KINDS)] = -math.log((1 - 0.05) / 0.05)   # heatmap prior 0.05

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        s8 = None
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == self.s8:
                s8 = x
        up = F.interpolate(self.lateral(x), size=s8.shape[2:], mode="nearest")
        return self.out(self.fuse(torch.cat([s8, up], 1)))


class ExportedDetector(nn.Module):
    """The ONNX graph: image (N, 3, H, W) normalised -> heat (N, K, h, w) in [0, 1], box (N, 4, h, w)."""

    def __init__(self, net: CellDetector):
        super().__init__()
        self.net = net

    def forward(self, image):
        y = self.net(image)
        return torch.sigmoid(y[:, :len(KINDS)]), y[:, len(KINDS):]


# ---------------------------------------------------------------- data

@dataclass
class Stored:
    rgb: np.ndarray
    boxes: np.ndarray        # (n, 4) at the stored scale
    kinds: np.ndarray        # (n,) index into KINDS
    ignore: np.ndarray       # (m, 4)
    cell: float              # median red-cell size at the stored scale
    labelled: tuple
    border_boxed: bool


def _store(f: LabelledField) -> Stored | None:
    red = [b for b, k in zip(f.boxes, f.kinds) if k == "red cell"]
    if not red:
        return None
    cell = float(np.median([math.sqrt((b[2] - b[0]) * (b[3] - b[1])) for b in red]))
    rgb = np.asarray(open_rgb(f.path, FIELD_MAX_PIXELS, max_side=None))
    s = min(1.0, STORE_CELL / cell)
    if s < 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * s), round(rgb.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return Stored(rgb, np.asarray(f.boxes, np.float32).reshape(-1, 4) * s,
                  np.asarray([KINDS.index(k) for k in f.kinds], np.int64),
                  np.asarray(f.ignore, np.float32).reshape(-1, 4) * s, cell * s, f.labelled, f.border_boxed)


def targets(boxes: np.ndarray, kinds: np.ndarray, ignore: np.ndarray, size: tuple[int, int],
            labelled: tuple, border: float = 0.0):
    """Heatmaps (K, h, w), their weights, box targets (4, h, w) and where they count (h, w), at STRIDE.
    `border`: a band (pixels) along the image's own edges where unboxed cells may be (weight 0)."""
    H, W = size
    h, w = H // STRIDE, W // STRIDE
    heat = np.zeros((len(KINDS), h, w), np.float32)
    weight = np.ones_like(heat)
    for k, kind in enumerate(KINDS):
        if kind not in labelled:
            weight[k] = 0
    box_t = np.zeros((4, h, w), np.float32)
    box_m = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    for (x0, y0, x1, y1), k in zip(boxes, kinds):
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        if not (0 <= cx < w and 0 <= cy < h):
            continue
        bw, bh = max(x1 - x0, 2.0), max(y1 - y0, 2.0)
        sigma = max(0.6, 0.12 * min(bw, bh) / STRIDE)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma))
        ix, iy = int(cx), int(cy)
        g[iy, ix] = 1.0
        heat[k] = np.maximum(heat[k], g)
        box_t[:, iy, ix] = (math.log(bw / STRIDE), math.log(bh / STRIDE), cx - ix, cy - iy)
        box_m[iy, ix] = 1.0
    for x0, y0, x1, y1 in ignore:
        a, b = max(0, int(x0 / STRIDE)), max(0, int(y0 / STRIDE))
        weight[:, b:int(math.ceil(y1 / STRIDE)), a:int(math.ceil(x1 / STRIDE))] = 0
    if border > 0:
        n = int(math.ceil(border / STRIDE))
        for sl in (np.s_[:, :n, :], np.s_[:, -n:, :], np.s_[:, :, :n], np.s_[:, :, -n:]):
            weight[sl] = np.where(heat[sl] >= 1.0, weight[sl], 0)  # keep boxed cells' own peaks
    return heat, weight, box_t, box_m


def sample(st: Stored, cfg: DetConfig, rng: np.random.Generator):
    """One training crop of a stored field at a random cell scale, flipped and rotated, with targets."""
    s = rng.uniform(cfg.cell_min, cfg.cell_max) / st.cell
    s = min(s, 1.0)   # never enlarge past the stored scale
    rgb = cv2.resize(st.rgb, (max(1, round(st.rgb.shape[1] * s)), max(1, round(st.rgb.shape[0] * s))),
                     interpolation=cv2.INTER_AREA)
    H, W = rgb.shape[:2]
    c = cfg.crop
    x0 = int(rng.integers(0, max(1, W - c + 1)))
    y0 = int(rng.integers(0, max(1, H - c + 1)))
    crop = np.empty((c, c, 3), np.uint8)
    crop[:] = np.median(rgb[::8, ::8].reshape(-1, 3), axis=0).astype(np.uint8)  # the field's background
    part = rgb[y0:y0 + c, x0:x0 + c]
    crop[:part.shape[0], :part.shape[1]] = part
    boxes = st.boxes * s - np.array([x0, y0, x0, y0], np.float32)
    ignore = st.ignore * s - np.array([x0, y0, x0, y0], np.float32)
    border = 0.0
    if not st.border_boxed:  # the image's own edges inside the crop: unboxed cut cells there
        edge = np.zeros((c, c), bool)
        band = int(0.6 * st.cell * s)
        if x0 < band:
            edge[:, :band - x0] = True
        if y0 < band:
            edge[:band - y0, :] = True
        if x0 + c > W - band:
            edge[:, max(0, W - band - x0):] = True
        if y0 + c > H - band:
            edge[max(0, H - band - y0):, :] = True
        if edge.any():
            ignore = np.concatenate([ignore, _edge_boxes(edge)])
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    crop, boxes, ignore = _rotate(crop, boxes, ignore, k, flip)
    heat, weight, box_t, box_m = targets(boxes, st.kinds, ignore, (c, c), st.labelled, border)
    return crop, heat, weight, box_t, box_m


def _edge_boxes(edge: np.ndarray) -> np.ndarray:
    """The edge band of a crop as boxes (rows and columns that are fully edge)."""
    out = []
    rows, cols = edge.all(1), edge.all(0)
    for mask, horizontal in ((rows, True), (cols, False)):
        idx = np.nonzero(mask)[0]
        if len(idx):
            for run in np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1):
                a, b = int(run[0]), int(run[-1]) + 1
                out.append([0, a, edge.shape[1], b] if horizontal else [a, 0, b, edge.shape[0]])
    return np.asarray(out, np.float32).reshape(-1, 4)


def _rotate(img, boxes, ignore, k: int, flip: bool):
    c = img.shape[0]

    def tf(b):
        b = b.copy()
        if flip:
            b[:, [0, 2]] = c - b[:, [2, 0]]
        for _ in range(k):  # rot90 counter-clockwise: (x, y) -> (y, c - x)
            b = np.stack([b[:, 1], c - b[:, 2], b[:, 3], c - b[:, 0]], 1)
        return b

    if flip:
        img = img[:, ::-1]
    img = np.ascontiguousarray(np.rot90(img, k))
    return img, tf(boxes), tf(ignore)


def to_tensor(batch_uint8: np.ndarray, g: torch.Generator | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W); with `g`, colour and stain jitter for training."""
    x = torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div_(255)
    if g is not None:
        n = x.shape[0]
        pick = torch.rand(n, generator=g) < 0.5
        if pick.any():
            x[pick] = lab_stain(x[pick].contiguous(), g)
        x = (x * torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=g)).clamp_(0, 1)
    mean, std = torch.tensor(LITE_MEAN)[None, :, None, None], torch.tensor(LITE_STD)[None, :, None, None]
    return ((x - mean) / std).contiguous()


def loss_fn(y, heat, weight, box_t, box_m):
    """Penalty-reduced focal loss on the heatmaps (CenterNet), L1 on log size and offset at centres."""
    p = torch.sigmoid(y[:, :len(KINDS)]).clamp(1e-4, 1 - 1e-4)
    pos = (heat >= 1).float() * weight
    neg = (1 - (heat >= 1).float()) * weight
    pos_l = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_l = -(torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * neg).sum()
    n = pos.sum().clamp_min(1)
    m = box_m[:, None]
    reg = (F.l1_loss(y[:, len(KINDS):len(KINDS) + 2] * m, box_t[:, :2] * m, reduction="sum")
           + F.l1_loss(y[:, len(KINDS) + 2:] * m, box_t[:, 2:] * m, reduction="sum")) / box_m.sum().clamp_min(1)
    return (pos_l + neg_l) / n + 0.5 * reg


# ---------------------------------------------------------------- the run

def _save(path: Path, model, opt, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if opt is not None:
        for i, s in enumerate(opt.state.values()):
            for name, t in s.items():
                if torch.is_tensor(t):
                    tensors[f"opt.{i}.{name}"] = t.detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
    tmp.replace(path)


def _load(path: Path, model, opt=None) -> dict:
    from safetensors import safe_open

    t = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=True)
    if opt is not None:
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            st = {name.split(".", 2)[2]: v for name, v in t.items() if name.startswith(f"opt.{i}.")}
            if st:
                opt.state[p] = st
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def train_detector(cfg: DetConfig, resume: bool = False, progress: bool = True) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    train_f, val_f = detector_split(labelled_fields(cfg.data))
    say = print if progress else (lambda *a, **k: None)
    t0 = time.time()
    iml = [s for f in train_f if f.lab == "IML" and (s := _store(f))]
    txl = [s for f in train_f if f.lab != "IML" and (s := _store(f))]
    if not iml and not txl:
        raise DataError(f"{cfg.data}: no annotated training fields (iml-fields/, txl-pbc/)")
    say(f"data: {len(iml)} IML + {len(txl)} TXL-PBC training fields, {len(val_f)} validation fields "
        f"({time.time() - t0:.0f} s to decode)", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CellDetector(cfg.pretrained).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "best": -1.0, "history": []}
    if resume and (out / "last.safetensors").is_file():
        state = _load(out / "last.safetensors", model, opt)
        say(f"resumed at step {state['step']}", flush=True)
    rng = np.random.default_rng(cfg.seed + state["step"])
    g = torch.Generator().manual_seed(cfg.seed + state["step"])
    model.train()
    while state["step"] < cfg.steps:
        step = state["step"]
        lr = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        pool = [(iml if rng.random() < cfg.iml_share else txl) if iml and txl else (iml or txl)
                for _ in range(cfg.batch_size)]
        items = [sample(p[rng.integers(len(p))], cfg, rng) for p in pool]
        x = to_tensor(np.stack([i[0] for i in items]), g).to(device)
        heat, weight, box_t, box_m = (torch.from_numpy(np.stack([i[j] for i in items])).to(device) for j in range(1, 5))
        loss = loss_fn(model(x), heat, weight, box_t, box_m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        state["step"] = step + 1
        if progress and state["step"] % 25 == 0:
            say(f"step {state['step']}/{cfg.steps} loss {loss.item():.3f} lr {lr:.2e} ({time.time() - t0:.0f} s)",
                flush=True)
        if state["step"] % cfg.val_every == 0 or state["step"] == cfg.steps:
            score = validate(model, val_f, device)
            state["history"].append({"step": state["step"], **score})
            say(f"validation at step {state['step']}: {score}", flush=True)
            if score["score"] > state["best"]:
                state["best"] = score["score"]
                _save(out / "best.safetensors", model, None, state)
            _save(out / "last.safetensors", model, opt, state)
            model.train()
    (out / "state.json").write_text(json.dumps(state, indent=1))
    return out / "best.safetensors"


@torch.no_grad()
def validate(model, val_fields: list[LabelledField], device, limit: int = 24) -> dict:
    """Red-cell F1 and white-cell recall (score_smear's matching) on validation fields of each lab,
    detected the way fields/detect.py detects them."""
    from ..data.annotations import match

    model.eval()
    per_lab = {}
    for lab in ("IML", "TXL-PBC"):
        of_lab = [f for f in val_fields if f.lab == lab]
        if not of_lab:
            continue
        fields = of_lab[::max(1, len(of_lab) // limit)]
        tp = ngt = npred = wtp = nw = 0
        for f in fields:
            rgb = np.asarray(open_rgb(f.path, FIELD_MAX_PIXELS, max_side=None))

            def run(img):
                x = to_tensor(img[None]).to(device)
                heat, box = ExportedDetector(model)(x)
                return heat[0].cpu().numpy(), box[0].cpu().numpy()

            boxes, kinds, _, _ = detect_with(run, rgb)
            red_p = [b for b, k in zip(boxes, kinds) if k == "red cell"]
            red_g = [b for b, k in zip(f.boxes, f.kinds) if k == "red cell"]
            mp, mg = match(red_p, red_g, 0.5)
            tp, ngt, npred = tp + len(mg), ngt + len(red_g), npred + len(red_p)
            if "white cell" in f.labelled:
                wg = [b for b, k in zip(f.boxes, f.kinds) if k == "white cell"]
                wp = [b for b, k in zip(boxes, kinds) if k == "white cell"]
                wtp, nw = wtp + len(match(wp, wg, 0.3)[1]), nw + len(wg)
        R, P = tp / max(1, ngt), tp / max(1, npred)
        per_lab[lab] = {"f1": round(2 * P * R / max(1e-9, P + R), 4), "wbc_recall": round(wtp / max(1, nw), 4)}
    parts = [d["f1"] for d in per_lab.values()] + ([per_lab["TXL-PBC"]["wbc_recall"]] if "TXL-PBC" in per_lab else [])
    score = sum(parts) / max(1, len(parts))
    return {"score": round(score, 4), **{f"{lab}_{k}": v for lab, d in per_lab.items() for k, v in d.items()}}


def detect_with(run, rgb):
    """fields/detect.py's two passes around a `run(frame uint8) -> (heat, box)` function."""
    from ..fields.detect import detect_two_pass

    return detect_two_pass(run, rgb)


def export_detector(run_dir: str | Path, out: str | Path) -> Path:
    """best.safetensors of a run -> ONNX (dynamic batch, height and width) with its record."""
    from ..fields.detect import DETECTOR_KEY, FRAME, TARGET_CELL, THRESHOLDS
    from ..modelfile import write_metadata

    run_dir, out = Path(run_dir), Path(out)
    model = CellDetector(pretrained=False)
    state = _load(run_dir / "best.safetensors", model)
    wrapper = ExportedDetector(model.eval()).eval()
    x = torch.zeros(1, 3, 256, 320)
    torch.onnx.export(wrapper, (x,), str(out), input_names=["image"], output_names=["heat", "box"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "heat": {0: "n", 2: "gh", 3: "gw"},
                                    "box": {0: "n", 2: "gh", 3: "gw"}}, opset_version=17, dynamo=False)
    record = {"arch": "efficientnet_lite0-centernet-s8", "kinds": list(KINDS), "stride": STRIDE,
              "mean": list(LITE_MEAN), "std": list(LITE_STD), "frame": FRAME, "target_cell": TARGET_CELL,
              "thresholds": THRESHOLDS, "trained": {"steps": state["step"], "validation": state["history"][-1:]}}
    write_metadata(out, {DETECTOR_KEY: json.dumps(record)})
    return out
