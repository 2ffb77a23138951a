"""Training, in plain view: a cached uint8 image array, torch augmentation, a two-stage loop
(frozen backbone -> fine-tune), resume, calibration, the not-a-cell model, a self-describing record.

`train()` reads top to bottom as its steps: the run folder, the data and its patient split, the
model, the epochs, then the finishing steps on the best weights (temperature and threshold on the
validation patients, the not-a-cell model, the record). Checkpoint files are `checkpoint.py`'s,
the not-a-cell maths `notacell.py`'s, the configuration `config.py`'s (all in `training/`).

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
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import data as D
from ..evaluation import metrics as M
from ..record import Record
from . import notacell as O
from .augment import to_input
from .checkpoint import load_resume as _load_resume
from .checkpoint import load_weights, save_checkpoint, save_weights
from .checkpoint import save_resume as _save_resume
from .config import TrainConfig
from .distributed import Ranks
from .models import LITE_MEAN, LITE_STD, LITE_VARIANTS, create_model


def forward_batches(model, x_uint8: np.ndarray, mean, std, batch_size: int = 256,
                    view: torch.Generator | None = None):
    """(final feature map, tapped maps) of each batch of a uint8 array, in eval mode, without gradients."""
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(x_uint8), batch_size):
        with torch.no_grad():
            yield model.forward_taps(to_input(x_uint8[i:i + batch_size], mean, std, view=view).to(device))


@torch.no_grad()
def predict_arrays(model, x_uint8: np.ndarray, mean, std, batch_size: int = 256, features: bool = False,
                   view: torch.Generator | None = None):
    """Logits (and the tapped layers' statistics, for the not-a-cell model) of a uint8 array; with
    `view` (a seeded generator), of a `lab_stain` view of each image instead."""
    logits, stats = [], []
    for f, taps in forward_batches(model, x_uint8, mean, std, batch_size, view):
        logits.append(model.forward_head(f).cpu())
        if features:
            stats.append([t.cpu() for t in O.tap_stats(taps)])
    z = torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)
    if not features:
        return z
    return z, [torch.cat([s[j] for s in stats]).numpy() for j in range(len(stats[0]))]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        return None


@dataclass
class Data:
    """The run's images as uint8 arrays, with the patient split they came from."""

    items: list                 # every image found (for the record's data fingerprint)
    parts: dict                 # the patient split: train / val / test patient ids
    split_sha: str
    xtr: np.ndarray
    ytr: np.ndarray
    xva: np.ndarray
    yva: np.ndarray


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


def run_config(run: str | Path, data: str | None = None) -> TrainConfig:
    """A run folder's configuration, with `out` the folder itself (wherever it was trained) and, with
    `data`, another copy of its training data (and that copy's patients.csv)."""
    cfg = TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    cfg = replace(cfg, out=str(run))
    return replace(cfg, data=data, patients_csv=str(Path(data) / "patients.csv")) if data else cfg


def open_run(cfg: TrainConfig, resume: bool, ranks: Ranks) -> TrainConfig:
    """The run folder: refuse to overwrite a run, or read back the configuration of the one resumed;
    write config.json. -> the configuration to train with."""
    run = Path(cfg.out)
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
    return cfg


def load_data(cfg: TrainConfig, resume: bool, ranks: Ranks, say) -> Data:
    """The images, the patient-disjoint split (made once, by rank 0, or read back) and the decoded
    training and validation arrays."""
    run = Path(cfg.out)
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
        xtr, ytr, _, _ = D.load_arrays(tr_items, cfg.image_size, cfg.workers, "decoding train")
        xva, yva, _, _ = D.load_arrays(va_items, cfg.image_size, cfg.workers, "decoding val")
    return Data(items, parts, D.file_sha256(split_path), xtr, ytr, xva, yva)


def normalization(cfg: TrainConfig) -> tuple[tuple, tuple]:
    """The mean/std the network expects: the ImageNet weights' convention, or 0.5 from scratch."""
    return (LITE_MEAN, LITE_STD) if cfg.model in LITE_VARIANTS else ((0.5,) * 3, (0.5,) * 3)


def build_model(cfg: TrainConfig, ranks: Ranks):
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=cfg.pretrained, dropout=cfg.dropout)
    model = model.to(ranks.device, memory_format=torch.channels_last)
    if ranks.rank:
        torch.manual_seed(cfg.seed + ranks.rank)  # other dropout masks than rank 0's
    return model


def fit(cfg: TrainConfig, model, data: Data, resume: bool, ranks: Ranks, progress: bool, say) -> dict:
    """The epochs: the head on a frozen backbone, then fine-tuning, with validation, early stopping,
    the best weights (best_weights.safetensors) and the resume state after every epoch. -> the state."""
    run = Path(cfg.out)
    mean, std = normalization(cfg)
    xtr, ytr, xva, yva = data.xtr, data.ytr, data.xva, data.yva
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
            xb = to_input(xtr[idx], mean, std, g, cfg.robust_aug, cfg.lab_stain_aug).to(ranks.device)
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
            vm = M.binary_metrics(yva, M.sigmoid(z))  # uncalibrated: only its ranking (ROC-AUC) decides
            row = {"epoch": ep + 1, "stage": s, "train_loss": total / seen, "val_auc": vm["roc_auc"],
                   "val_accuracy": vm["accuracy"], "val_balanced_accuracy": vm["balanced_accuracy"],
                   "seconds": round(time.time() - t0, 1)}
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"epoch {ep + 1}/{len(plan)} [{s}] loss {row['train_loss']:.4f}  val auc {vm['roc_auc']:.4f} "
                  f"acc {vm['accuracy']:.4f}  ({row['seconds']:.0f}s)", flush=True)
            if vm["roc_auc"] > state["best_auc"]:
                state.update(best_auc=vm["roc_auc"], best_epoch=ep + 1, bad_epochs=0)
                save_weights(run / "best_weights.safetensors", model)
            elif s == "finetune":
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= cfg.patience:
                    print(f"early stopping: no validation improvement for {cfg.patience} epochs", flush=True)
                    state["stopped"] = True
            state["next"] = ep + 1
            state["seconds"] = time.time() - t_start
            _save_resume(run, model, opt, state)
        state = ranks.share(state)
    return state


def calibrate(cfg: TrainConfig, record: Record, z_va: np.ndarray, yva: np.ndarray) -> str:
    """The record's temperature (minimum NLL) and threshold, fitted on the validation patients by the
    record's own rule -> how the threshold was chosen."""
    record.temperature = M.fit_temperature(z_va, yva)
    p_va = record.probability(z_va)
    if cfg.target_sensitivity:
        record.threshold = M.threshold_for_sensitivity(yva, p_va, cfg.target_sensitivity)
        return f"sensitivity >= {cfg.target_sensitivity} on validation"
    record.threshold = M.threshold_max_balanced_accuracy(yva, p_va)
    return "max balanced accuracy on validation"


def fit_not_a_cell(cfg: TrainConfig, model, data: Data, f_va: list[np.ndarray]) -> tuple[dict, np.ndarray]:
    """The not-a-cell model on (up to 6,000) training cells, and with `cfg.ood_stain_views` also on
    that many `lab_stain` views of each -> (its arrays, the validation cells' scores its threshold is
    set on: the cells as they are, and with stain views one view of each as well)."""
    mean, std = normalization(cfg)
    n_fit = min(len(data.xtr), 6000)
    sub = np.random.default_rng(cfg.seed).choice(len(data.xtr), n_fit, replace=False)
    _, f_tr = predict_arrays(model, data.xtr[sub], mean, std, features=True)
    y = data.ytr[sub]
    views = [predict_arrays(model, data.xtr[sub], mean, std, features=True,
                            view=torch.Generator().manual_seed(cfg.seed + 1 + k))[1]
             for k in range(cfg.ood_stain_views)]
    join = lambda a, b: [np.concatenate([p, q]) for p, q in zip(a, b)]  # noqa: E731
    for v in views:
        f_tr, y = join(f_tr, v), np.concatenate([y, data.ytr[sub]])
    ood = O.fit(f_tr, y, f_va)
    if cfg.ood_stain_views:
        f_va = join(f_va, predict_arrays(model, data.xva, mean, std, features=True,
                                         view=torch.Generator().manual_seed(cfg.seed + 1000))[1])
    return ood, O.score(ood, f_va)


def finish(cfg: TrainConfig, model, data: Data, state: dict) -> tuple[Record, dict]:
    """The best weights -> calibration, threshold, the not-a-cell model and the self-describing record."""
    mean, std = normalization(cfg)
    load_weights(Path(cfg.out) / "best_weights.safetensors", model)
    z_va, f_va = predict_arrays(model, data.xva, mean, std, features=True)
    record = Record(arch=cfg.model, input_size=cfg.image_size, mean=tuple(mean), std=tuple(std))
    rule = calibrate(cfg, record, z_va, data.yva)
    ood, s_va = fit_not_a_cell(cfg, model, data, f_va)
    record.ood_threshold = O.threshold(s_va)
    p_va = record.probability(z_va)
    record.extra = {
        "threshold_rule": rule,
        "val_metrics": M.binary_metrics(data.yva, p_va, record.threshold),
        "val_ece": M.ece(data.yva, p_va), "val_ece_uncalibrated": M.ece(data.yva, M.sigmoid(z_va)),
        "val_ood_pass_rate": float(np.mean(~record.is_ood(s_va))),
        "best_epoch": state["best_epoch"], "epochs_run": state["next"],
        "train_seconds": round(state.get("seconds", 0.0), 1),
        "split": data.parts, "split_sha256": data.split_sha, "data_fingerprint": D.fingerprint(data.items),
        "n_train_images": len(data.xtr), "n_val_images": len(data.xva),
        "config": asdict(cfg), "git_commit": git_commit(), "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return record, ood


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train a model in `cfg.out` (or continue the run there) -> its best.safetensors."""
    ranks = Ranks()  # torchrun's processes, or just this one
    say = print if ranks.is_main else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg = open_run(cfg, resume, ranks)
    run = Path(cfg.out)
    data = load_data(cfg, resume, ranks, say)
    model = build_model(cfg, ranks)
    state = fit(cfg, model, data, resume, ranks, progress, say)
    if not ranks.is_main:
        ranks.finish()  # waits for rank 0's checkpoint
        return run / "best.safetensors"
    record, ood = finish(cfg, model, data, state)
    save_checkpoint(run / "best.safetensors", model, record, ood)
    val = record.extra["val_metrics"]
    print(f"best epoch {state['best_epoch']}: val auc {val['roc_auc']:.4f}, accuracy {val['accuracy']:.4f} at "
          f"threshold {record.threshold:.3f} (T={record.temperature:.2f}); checkpoint {run / 'best.safetensors'}",
          flush=True)
    ranks.finish()
    return run / "best.safetensors"
