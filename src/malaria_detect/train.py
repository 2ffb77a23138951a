"""Training, in plain view: a cached uint8 image array, torch augmentation, a two-stage loop
(frozen backbone -> fine-tune), checkpoints that describe themselves, resume, calibration.

Run directory layout (runs/NAME/):
    config.json        the training configuration
    split.json         the patient-disjoint split (its sha256 goes into every checkpoint)
    metrics.jsonl      one line per epoch
    last.safetensors   weights + optimizer state of the last finished epoch (for --resume)
    state.json         progress of the run (epoch, best score, ...)
    best.safetensors   the best weights by validation ROC-AUC, with the Record in its metadata
    best.json          the same Record, readable
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import data as D
from . import metrics as M
from .models import IMAGENET_MEAN, IMAGENET_STD, LITE_VARIANTS, create_model
from .data import load_arrays
from .preprocess import Record


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 112
    batch_size: int = 64
    head_epochs: int = 1          # stage 1: frozen backbone, head only
    epochs: int = 5               # stage 2: fine-tuning (the scratch model trains only this stage)
    lr_head: float = 3e-3
    lr: float = 1e-3              # fine-tuning peak learning rate (cosine decay, 1 epoch... warm-up)
    weight_decay: float = 1e-4
    finetune_blocks: int = 0      # 0 = fine-tune everything; N = only the top N blocks + conv head
    label_smoothing: float = 0.05
    dropout: float = 0.2
    patience: int = 3             # early stopping on validation ROC-AUC (fine-tuning stage)
    seed: int = 0
    split: list = field(default_factory=lambda: [0.7, 0.1, 0.2])
    split_file: str | None = None  # reuse a saved split (e.g. the shipped model's) instead of making one
    patients_csv: str | None = None
    max_train_images: int = 0     # >0: subsample training images (quick runs, tests)
    target_sensitivity: float | None = None  # else threshold = max balanced accuracy on validation
    workers: int = 2
    threads: int = 0              # torch threads (0 = all cores)
    robust_aug: bool = False      # + stain (optical density), gamma, blur and scale jitter: for other labs


# ---------------------------------------------------------------- augmentation (on batches, in torch)

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


def augment(x: torch.Tensor, g: torch.Generator, robust: bool = False) -> torch.Tensor:
    """Cells have no orientation and smears differ in stain colour: flips, 90-degree rotations and
    brightness / contrast / saturation / hue jitter. With `robust`, also what differs between labs
    and microscopes (`robust_jitter`). x: (N,3,H,W) float in [0,1]."""
    n = x.shape[0]
    u = lambda lo, hi: torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=g)  # noqa: E731
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    k = torch.randint(0, 4, (n,), generator=g)
    x = torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k)])
    if robust:
        x = robust_jitter(x, g)
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


def to_input(xb_uint8: np.ndarray, mean, std, g: torch.Generator | None = None,
             robust: bool = False) -> torch.Tensor:
    x = torch.from_numpy(xb_uint8).permute(0, 3, 1, 2).float().div_(255)
    if g is not None:
        x = augment(x, g, robust)
    x = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_arrays(model, x_uint8: np.ndarray, mean, std, batch_size: int = 256, features: bool = False):
    """Logits (and the tapped layers' statistics, for the not-a-cell model) of a uint8 array."""
    model.eval()
    device = next(model.parameters()).device
    logits, stats = [], []
    for i in range(0, len(x_uint8), batch_size):
        f, taps = model.forward_taps(to_input(x_uint8[i:i + batch_size], mean, std).to(device))
        logits.append(model.forward_head(f).cpu())
        if features:
            stats.append([t.cpu() for t in tap_stats(taps)])
    z = torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)
    if not features:
        return z
    return z, [torch.cat([s[j] for s in stats]).numpy() for j in range(len(stats[0]))]


# ---------------------------------------------------------------- not-a-cell score

def tap_stats(taps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-channel mean and standard deviation of each tapped feature map: (N, 2C) per tap."""
    out = []
    for t in taps:
        m = t.mean((2, 3))
        v = (t * t).mean((2, 3)) - m * m
        out.append(torch.cat([m, torch.sqrt(v.clamp_min(1e-6))], 1))
    return out


def fit_ood(train_stats: list[np.ndarray], train_y: np.ndarray, val_stats: list[np.ndarray],
            shrink: float = 0.05) -> dict:
    """The not-a-cell model: for each tapped layer (low- and mid-level statistics of the network's
    own features), a class-conditional Gaussian with a shared, shrunk covariance fitted on training
    cells. A layer's score is the Mahalanobis distance to the nearer class, divided by its median on
    validation cells; the image's score is the maximum over layers. Photos, noise, screenshots and
    smear fields differ from segmented cells in exactly these statistics."""
    ood = {}
    for i, (ftr, fva) in enumerate(zip(train_stats, val_stats)):
        f = ftr.astype(np.float64)
        mus = np.stack([f[train_y == c].mean(0) for c in (0, 1)])
        c = f - mus[train_y]
        cov = c.T @ c / len(f)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
        prec = np.linalg.inv(cov)
        part = {f"ood.{i}.means": mus.astype(np.float32), f"ood.{i}.prec": prec.astype(np.float32),
                f"ood.{i}.scale": np.ones(1, np.float32)}
        part[f"ood.{i}.scale"][0] = 1.0 / np.median(_ood_layer(fva, part, i))
        ood.update(part)
    return ood


def _ood_layer(f: np.ndarray, ood: dict, i: int) -> np.ndarray:
    d = f.astype(np.float64)[:, None, :] - ood[f"ood.{i}.means"][None].astype(np.float64)  # (N,2,D)
    q = np.einsum("ncd,de,nce->nc", d, ood[f"ood.{i}.prec"].astype(np.float64), d)
    return q.min(1) * float(ood[f"ood.{i}.scale"][0])


def ood_score_np(stats: list[np.ndarray], ood: dict) -> np.ndarray:
    """NumPy twin of the in-graph score (used at training time to set the threshold)."""
    return np.max([_ood_layer(f, ood, i) for i, f in enumerate(stats)], 0)


# ---------------------------------------------------------------- checkpoints

def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


def save_checkpoint(path: Path, model, record: Record, extra_tensors: dict | None = None) -> None:
    """Weights (+ optional arrays) as safetensors; the Record in its metadata and in a JSON sidecar."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = torch.as_tensor(v).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"record": record.to_json(), "format": "malaria-detect/1"})
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(json.loads(record.to_json()), indent=1) + "\n")


def load_checkpoint(path: str | Path):
    """-> (model in eval mode, Record, extra arrays). Every weight key must match (strict)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint (train one with 'malaria-detect train')")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "record" not in meta:
        raise ValueError(f"{path}: not a malaria-detect checkpoint (no record in its metadata)")
    record = Record.from_json(meta["record"])
    tensors = load_file(str(path))
    extra = {k: v.numpy() for k, v in tensors.items() if k.startswith("ood.")}
    model = create_model(record.arch, pretrained=False)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("ood.")}, strict=True)
    return model.eval(), record, extra


def _save_resume(run: Path, model, opt, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    tmp = run / "last.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(run / "last.safetensors")
    (run / "state.json").write_text(json.dumps(state, indent=1))


def _load_resume(run: Path, model, opt) -> dict:
    tensors = load_file(str(run / "last.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    sd = opt.state_dict()
    sd["state"] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    return json.loads((run / "state.json").read_text())


# ---------------------------------------------------------------- several processes (torchrun)

class Ranks:
    """This process's place among torchrun's processes. Without torchrun every method is a no-op
    and train() is exactly the single-process loop.

    Under `torchrun --nproc-per-node N -m malaria_detect.cli train ...` (DDP; gloo on CPU, nccl
    with one GPU per process): rank 0 makes the patient split and fills the image cache while the
    others wait, then they read both; every rank takes its shard of each batch of the shared
    per-epoch permutation (the global batch stays --batch-size, so the schedule is the
    single-process one) and DistributedDataParallel averages the gradients; rank 0 alone
    validates, writes the run folder and decides early stopping, which it sends to the others.
    Several nodes: --out must be a folder that every node sees (split.json, resume state)."""

    def __init__(self):
        self.active = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
        self.rank = int(os.environ["RANK"]) if self.active else 0
        self.world = int(os.environ["WORLD_SIZE"]) if self.active else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.active else 0
        self.is_main = self.rank == 0
        self.device = torch.device("cpu")
        self.started = False
        if self.active:
            import torch.distributed as dist

            if torch.cuda.is_available():
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.started = True

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @contextmanager
    def in_turn(self):
        """Rank 0 runs the block first, then the first process of every other node, then the rest:
        what the block writes (split.json, a node's image cache) is written by one process and
        read by those after it."""
        turn = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        for _ in range(turn):
            self.barrier()
        yield
        for _ in range(2 - turn):
            self.barrier()

    def batch(self, batch_size: int) -> int:
        return -(-batch_size // self.world)

    def shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's part of a permutation, as DistributedSampler does it (padded by wrapping
        around, so every rank takes the same number of steps)."""
        if self.world == 1:
            return order
        order = np.concatenate([order, order[:(-len(order)) % self.world]])
        return order[self.rank::self.world]

    def wrap(self, model):
        """DDP over the parameters that train now (built again when the stage changes them)."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, *xs: float) -> tuple:
        if not self.active:
            return xs
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return tuple(t.tolist())

    def share(self, obj):
        """Rank 0's object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self) -> None:
        self.barrier()
        if self.started:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the loop

def _optimizer(model, cfg: TrainConfig, stage: str):
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == "head":
        params = list(model.head.parameters())
        lr = cfg.lr_head
    else:
        body = model.backbone_parameters() if cfg.finetune_blocks == 0 or not hasattr(model, "top_parameters") \
            else model.top_parameters(cfg.finetune_blocks)
        params = body + list(model.head.parameters())
        lr = cfg.lr
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay), lr


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    run = Path(cfg.out)
    ranks = Ranks()  # torchrun's processes, or just this one
    say = print if ranks.is_main else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume:
        if not (run / "state.json").exists():
            raise D.DataError(f"{run}: nothing to resume (no state.json); start without --resume")
        saved = json.loads((run / "config.json").read_text())
        cfg = TrainConfig(**{**saved, "data": cfg.data or saved["data"]})
    elif (run / "state.json").exists():
        raise D.DataError(f"{run} already holds a run; use --resume to continue it or choose another --out")
    if cfg.model == "simple_cnn":
        cfg.pretrained, cfg.head_epochs = False, 0
    if ranks.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.tmp").write_text(json.dumps(asdict(cfg), indent=1))
        (run / "config.tmp").replace(run / "config.json")  # whole, for ranks reading it to resume

    # --- data and the patient-disjoint split
    items = D.find_images(cfg.data, cfg.patients_csv)
    split_path = run / "split.json"
    with ranks.in_turn():  # the split is made once, by rank 0; the other ranks read it
        if not ranks.is_main:
            parts = D.load_split(split_path)
        elif resume or cfg.split_file:
            parts = D.load_split(split_path if resume else cfg.split_file)
            if not resume:
                D.save_split(parts, split_path, source=str(cfg.split_file), seed=cfg.seed)
        else:
            parts = D.split_patients(items, tuple(cfg.split), cfg.seed)
            D.save_split(parts, split_path, fractions=cfg.split, seed=cfg.seed,
                         data_fingerprint=D.fingerprint(items))
    split_sha = D.file_sha256(split_path)
    D.assert_disjoint(parts)
    tr_items, va_items = D.select(items, parts["train"]), D.select(items, parts["val"])
    if not tr_items or not va_items:
        raise D.DataError("the split left no training or no validation images; add patients or change --split")
    if cfg.max_train_images and len(tr_items) > cfg.max_train_images:
        rng = np.random.default_rng(cfg.seed)
        tr_items = [tr_items[i] for i in sorted(rng.choice(len(tr_items), cfg.max_train_images, replace=False))]
    say(f"data: {len(items)} images, {len({i.patient for i in items})} patients; "
        f"train {len(tr_items)} images / {len(parts['train'])} patients, "
        f"val {len(va_items)} / {len(parts['val'])}, test patients held out: {len(parts['test'])}", flush=True)
    with ranks.in_turn():  # each node's cache is filled by one process; the others then read it
        xtr, ytr, tr_items, _ = load_arrays(tr_items, cfg.image_size, cfg.workers, "decoding train")
        xva, yva, va_items, _ = load_arrays(va_items, cfg.image_size, cfg.workers, "decoding val")

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.model in LITE_VARIANTS else ((0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=cfg.pretrained, dropout=cfg.dropout)
    model = model.to(ranks.device, memory_format=torch.channels_last)
    if ranks.rank:
        torch.manual_seed(cfg.seed + ranks.rank)  # other dropout masks than rank 0's

    stages = [("head", cfg.head_epochs)] * (cfg.head_epochs > 0) + [("finetune", cfg.epochs)]
    plan = [(s, e) for s, n in stages for e in range(n)]  # one entry per epoch
    state = {"next": 0, "best_auc": -1.0, "best_epoch": -1, "bad_epochs": 0, "stopped": False}
    opt, stage, net = None, None, None
    if resume:
        stage = plan[min(json.loads((run / "state.json").read_text())["next"], len(plan)) - 1][0]
        opt, _ = _optimizer(model, cfg, stage)
        state = _load_resume(run, model, opt)
        say(f"resuming {run} at epoch {state['next'] + 1}/{len(plan)}", flush=True)

    batch = ranks.batch(cfg.batch_size)  # per rank
    steps_per_epoch = math.ceil(len(ranks.shard(np.arange(len(xtr)))) / batch)
    t_start = time.time() - state.get("seconds", 0.0)
    while state["next"] < len(plan) and not state["stopped"]:
        ep = state["next"]
        s, e_in_stage = plan[ep]
        if s != stage:
            opt, base_lr = _optimizer(model, cfg, s)
            stage, net = s, None
        if net is None:
            net = ranks.wrap(model)  # after _optimizer: DDP averages the gradients of what trains now
        base_lr = cfg.lr_head if s == "head" else cfg.lr
        n_stage = dict(stages)[s]
        g = torch.Generator().manual_seed(cfg.seed * 1000 + ep)  # deterministic per epoch: resume-safe
        order = ranks.shard(torch.randperm(len(xtr), generator=g).numpy())  # this rank's part
        if ranks.rank:  # the same permutation on every rank, other augmentations than rank 0's
            g.manual_seed(cfg.seed * 1000 + ep + 7919 * ranks.rank)
        net.train()
        if s == "head":
            net.eval()              # frozen backbone keeps its ImageNet batch-norm statistics
            model.head.train()
        total, seen, t0 = 0.0, 0, time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {ep + 1}/{len(plan)} {s}", unit="batch",
                   disable=not progress or not ranks.is_main, leave=False)
        for step in bar:
            # cosine decay over the stage, linear warm-up over the first 100 steps of fine-tuning
            t = (e_in_stage * steps_per_epoch + step) / max(n_stage * steps_per_epoch, 1)
            lr = base_lr * 0.5 * (1 + math.cos(math.pi * t))
            if s == "finetune" and cfg.pretrained and e_in_stage == 0:
                lr *= min(1.0, (step + 1) / 100)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[step * batch:(step + 1) * batch]
            xb = to_input(xtr[idx], mean, std, g, cfg.robust_aug).to(ranks.device)
            yb = torch.from_numpy(ytr[idx]).float().to(ranks.device)
            target = yb * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            loss = F.binary_cross_entropy_with_logits(net(xb), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{lr:.1e}")
        bar.close()
        total, seen = ranks.sum(total, seen)  # the epoch's loss over every rank's shard
        if ranks.is_main:  # validation, the run folder and early stopping: rank 0's
            z = predict_arrays(model, xva, mean, std)
            vm = M.binary_metrics(yva, M.sigmoid(z))
            row = {"epoch": ep + 1, "stage": s, "train_loss": total / seen, "val_auc": vm["roc_auc"],
                   "val_accuracy": vm["accuracy"], "val_balanced_accuracy": vm["balanced_accuracy"],
                   "seconds": round(time.time() - t0, 1)}
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"epoch {ep + 1}/{len(plan)} [{s}] loss {row['train_loss']:.4f}  val auc {vm['roc_auc']:.4f} "
                  f"acc {vm['accuracy']:.4f}  ({row['seconds']:.0f}s)", flush=True)
            if vm["roc_auc"] > state["best_auc"]:
                state.update(best_auc=vm["roc_auc"], best_epoch=ep + 1, bad_epochs=0)
                save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                          str(run / "best_weights.safetensors"))
            elif s == "finetune":
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= cfg.patience:
                    print(f"early stopping: no validation improvement for {cfg.patience} epochs", flush=True)
                    state["stopped"] = True
            state["next"] = ep + 1
            state["seconds"] = time.time() - t_start
            _save_resume(run, model, opt, state)
        state = ranks.share(state)

    if not ranks.is_main:
        ranks.finish()  # waits for rank 0's checkpoint
        return run / "best.safetensors"

    # --- finalize: best weights -> calibration, threshold, not-a-cell statistics, self-describing record
    model.load_state_dict(load_file(str(run / "best_weights.safetensors")), strict=True)
    z_va, f_va = predict_arrays(model, xva, mean, std, features=True)
    T = M.fit_temperature(z_va, yva)
    p_va = M.sigmoid(z_va / T)
    if cfg.target_sensitivity:
        thr, rule = M.threshold_for_sensitivity(yva, p_va, cfg.target_sensitivity), \
            f"sensitivity >= {cfg.target_sensitivity} on validation"
    else:
        thr, rule = M.threshold_max_balanced_accuracy(yva, p_va), "max balanced accuracy on validation"
    n_fit = min(len(xtr), 6000)
    sub = np.random.default_rng(cfg.seed).choice(len(xtr), n_fit, replace=False)
    _, f_tr = predict_arrays(model, xtr[sub], mean, std, features=True)
    ood = fit_ood(f_tr, ytr[sub], f_va)
    s_va = ood_score_np(f_va, ood)
    ood_thr = float(np.quantile(s_va, 0.99))  # 99% of validation cells pass
    val = M.binary_metrics(yva, p_va, thr)
    record = Record(
        arch=cfg.model, input_size=cfg.image_size, mean=tuple(mean), std=tuple(std),
        threshold=thr, temperature=T, ood_threshold=ood_thr,
        extra={
            "threshold_rule": rule,
            "val_metrics": {k: v for k, v in val.items()},
            "val_ece": M.ece(yva, p_va), "val_ece_uncalibrated": M.ece(yva, M.sigmoid(z_va)),
            "val_ood_pass_rate": float((s_va <= ood_thr).mean()),
            "best_epoch": state["best_epoch"], "epochs_run": state["next"],
            "train_seconds": round(state.get("seconds", 0.0), 1),
            "split": parts, "split_sha256": split_sha, "data_fingerprint": D.fingerprint(items),
            "n_train_images": len(xtr), "n_val_images": len(xva),
            "config": asdict(cfg), "git_commit": git_commit(), "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    save_checkpoint(run / "best.safetensors", model, record, ood)
    print(f"best epoch {state['best_epoch']}: val auc {val['roc_auc']:.4f}, accuracy {val['accuracy']:.4f} at "
          f"threshold {thr:.3f} (T={T:.2f}); checkpoint {run / 'best.safetensors'}", flush=True)
    ranks.finish()
    return run / "best.safetensors"
