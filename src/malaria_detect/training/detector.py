"""The object detector for whole fields: red cells, white cells and platelets, any lab, any scale.

    malaria-detect train-detector --data ../shared/data --out runs/det [--steps 3000] [--resume]
    malaria-detect export-detector --run runs/det --out detector.onnx

A centre-heatmap detector (CenterNet-style) on EfficientNet-Lite0 (ImageNet weights, the stages to
stride 16), one heatmap per kind and the box size at stride 8. Trained on crops in which the median red
cell is from 28 px up to 80 px or the field's own size, whichever is smaller (fields are never
enlarged), so it finds cells at any magnification once a field is brought near that scale
(fields/detect.py does it in two passes). Fields of the IML lab box only red cells and not those
cut by the image border: there the other kinds, the border band and `difficult` boxes teach nothing
(weight 0), so an unboxed white cell is never taught as background. Checkpoints every `val_every`
steps (last.safetensors, its progress in the file's metadata: --resume continues; state.json at the
end), the best by validation score (best.safetensors). CPU or GPU; no torchvision.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.folders import DataError
from ..data.objects import KINDS, LabelledField, detector_split, labelled_fields
from ..errors import UsageError
from ..imaging import FIELD_MAX_PIXELS, open_rgb
from .config import DetConfig
from .detector_data import STRIDE, _store, sample, to_tensor
from .models import LITE_MEAN, LITE_STD, EfficientNetLite, load_backbone_strict, load_imagenet_state

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


# ---------------------------------------------------------------- the loss (the data: detector_data.py)

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
    if opt is not None:  # by the parameter's index in the optimizer's groups (as _load reads it)
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for name, t in opt.state.get(p, {}).items():
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
            st = {name.split(".", 2)[2]: v if name.endswith(".step") else v.to(p.device)
                  for name, v in t.items() if name.startswith(f"opt.{i}.")}
            if st:
                opt.state[p] = st
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def train_detector(cfg: DetConfig, resume: bool = False, progress: bool = True) -> Path:
    if cfg.crop % 16:
        raise UsageError(f"--crop must be a multiple of 16 (the backbone's stride), got {cfg.crop}")
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
    from ..fields.detect import detect_two_pass

    model.eval()
    net = ExportedDetector(model)

    def run(img):
        heat, box = net(to_tensor(img[None]).to(device))
        return heat[0].cpu().numpy(), box[0].cpu().numpy()

    per_lab = {}
    for lab in ("IML", "TXL-PBC"):
        of_lab = [f for f in val_fields if f.lab == lab]
        if not of_lab:
            continue
        fields = of_lab[::max(1, len(of_lab) // limit)]
        tp = ngt = npred = wtp = nw = 0
        for f in fields:
            rgb = np.asarray(open_rgb(f.path, FIELD_MAX_PIXELS, max_side=None))
            boxes, kinds, _, _ = detect_two_pass(run, rgb)
            red_p = [b for b, k in zip(boxes, kinds) if k == "red cell"]
            red_g = [b for b, k in zip(f.boxes, f.kinds) if k == "red cell"]
            mp, mg = match(red_p, red_g, 0.5)
            tp, ngt, npred = tp + len(mg), ngt + len(red_g), npred + len(red_p)
            if "white cell" in f.labelled:
                wg = [b for b, k in zip(f.boxes, f.kinds) if k == "white cell"]
                wp = [b for b, k in zip(boxes, kinds) if k == "white cell"]
                wtp, nw = wtp + len(match(wp, wg, 0.3)[1]), nw + len(wg)
        R, P = tp / max(1, ngt), tp / max(1, npred)
        per_lab[lab] = {"f1": round(2 * P * R / max(1e-9, P + R), 4)}
        if nw:  # only a lab that boxes its white cells
            per_lab[lab]["wbc_recall"] = round(wtp / nw, 4)
    parts = [d["f1"] for d in per_lab.values()] + [d["wbc_recall"] for d in per_lab.values() if "wbc_recall" in d]
    score = sum(parts) / max(1, len(parts))
    return {"score": round(score, 4), **{f"{lab}_{k}": v for lab, d in per_lab.items() for k, v in d.items()}}


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
