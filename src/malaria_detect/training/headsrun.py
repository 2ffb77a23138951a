"""The `train-heads` run: crops -> features -> heads (training/heads.py) -> [a fine-tuned branch
(training/objectnet.py) with `--finetune-epochs`] -> runs/NAME/model.onnx with its record.

    malaria-detect train-heads --base robust --data ../shared/data --out runs/anylab [--finetune-epochs 6]

Everything a step makes is kept in the run folder (crops.npz, features.npz, finetune/), so `--resume`
after an interruption starts where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..record import STAIN_MAP, Record
from .config import HeadsConfig
from .heads import apply_heads, base_head, base_model_path, compute_features, fit_heads, write_heads
from .objectcrops import KIND_NAMES, RED, SOURCES, STAGE_NAMES, Crops, build_crops, loss_weights

# the options the cached crops (crops.npz) and features (features.npz) of a run folder depend on
CACHED_BY = ("base", "data", "nih_split", "nih_per_class", "iml_learn", "iml_choose", "iml_uninfected",
             "infected_views", "txl_red_per_field", "lookalikes", "background", "seed", "stain_norm", "cell_shapes")
# ... and the fine-tuned branch (finetune/) on these as well
TUNED_BY = CACHED_BY + ("steps", "lr", "weight_decay", "lookalike_weight", "anchor", "hidden", "finetune_epochs",
                        "finetune_lr", "finetune_lab_share")


def _metrics(logits, c: Crops, record: Record, m) -> dict:
    """Validation figures of the whole-field heads (their logits on the crops of `m`), per source (the
    whole-field head's cell threshold; kinds; stages)."""
    from ..evaluation import metrics as M

    zp, zk, zs = logits
    p = record.probability(zp, record.field_temperature)
    thr = record.field_cell_threshold
    out = {}
    src, kind, par, stage = c.source[m], c.kind[m], c.parasitized[m], c.stage[m]
    for s, name in enumerate(SOURCES):
        sm = (src == s) & (kind == RED) & (par >= 0)
        if sm.any() and len(set(par[sm])) == 2:
            out[f"{name} red cells"] = M.binary_metrics(par[sm], p[sm], thr)
        elif sm.any():
            out[f"{name} red cells called parasitized"] = float((p[sm] >= thr).mean())
    k = np.array([KIND_NAMES.index(n) for n in record.kinds(zk)[0]])  # the shipped rule (KIND_MIN_P)
    out["kind_recall"] = {KIND_NAMES[i]: float((k[kind == i] == i).mean()) for i in range(len(KIND_NAMES))
                          if (kind == i).any()}
    out["non_red_called_parasitized"] = {KIND_NAMES[i]: int((p[kind == i] >= thr).sum())
                                         for i in range(1, len(KIND_NAMES)) if (kind == i).any()}
    st = stage >= 0
    if st.any():
        pred = zs[st].argmax(1)
        rec = {STAGE_NAMES[i]: float((pred[stage[st] == i] == i).mean()) for i in range(len(STAGE_NAMES))
               if (stage[st] == i).any()}
        out["stage_recall"] = rec
        out["stage_balanced_accuracy"] = float(np.mean(list(rec.values())))
        out["stage_counts"] = {STAGE_NAMES[i]: int((stage[st] == i).sum()) for i in range(len(STAGE_NAMES))}
    return out


def _check_resume(out: Path, cfg: HeadsConfig) -> None:
    """--resume must not mix what a run folder holds with other options."""
    old = json.loads((out / "config.json").read_text())
    for keys, held, what in ((CACHED_BY, ("crops.npz", "features.npz"), "crops and features"),
                             (TUNED_BY, ("finetune/state.json",), "a fine-tuned branch")):
        differ = [k for k in keys if old.get(k, getattr(HeadsConfig(), k)) != getattr(cfg, k)]  # older runs
        if differ and any((out / h).exists() for h in held):
            raise UsageError(f"{out} holds {what} made with other {', '.join(differ)}: --resume would mix "
                             "them; give another --out")


def train_heads(cfg: HeadsConfig, resume: bool = False, progress: bool = True, say=print) -> Path:
    """Crops -> features -> heads [-> fine-tuned branch] -> runs/NAME/model.onnx with its record
    (temperature and threshold on the NIH validation patients). Returns the model's path."""
    from ..cells.predictor import Predictor
    from ..evaluation import metrics as M
    from ..modelfile import write_model_record

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise UsageError(f"{out} already holds a run: give --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / "config.json").is_file():
        _check_resume(out, cfg)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    base = base_model_path(cfg.base)
    base_record = Predictor.load(base).record
    if base_record.object_head is not None or base_record.kind_names:
        raise UsageError(f"--base {cfg.base} already has whole-field heads: give the cell model it was made from "
                         "(e.g. robust)")
    t0 = time.time()
    cpath, fpath = out / "crops.npz", out / "features.npz"
    if resume and cpath.exists():
        c = Crops.load(cpath)
        say(f"crops: {len(c.x)} (from {cpath})")
    else:
        c = build_crops(cfg, base_record.input_size, say)
        c.save(cpath)
    if resume and fpath.exists():
        z = np.load(fpath)
        f = z["f"]
    else:
        f, ood = compute_features(base, base_record, c.x, progress=progress)
        np.savez(fpath, f=f, ood=ood)
    heads = fit_heads(f, c, cfg, base_head(base), say)
    va = c.split == 1
    path = out / "model.onnx"
    finetune = {}
    if cfg.finetune_epochs:  # the heads start a fine-tuned copy of the base's last stages
        from . import objectnet

        trunk, branch = objectnet.finetune(base, heads, c, loss_weights(c, c.split == 0, cfg.lookalike_weight),
                                           base_record, out / "finetune", cfg.finetune_epochs, cfg.finetune_lr,
                                           resume=resume, seed=cfg.seed, progress=progress, say=say,
                                           lab_share=cfg.finetune_lab_share)
        objectnet.write_branch(base, branch, path, base_record.input_size)
        finetune = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, "lab_share": cfg.finetune_lab_share,
                    "from_block": objectnet.BRANCH_FROM,
                    "last_epoch": objectnet.describe(out / "finetune")}
    else:
        write_heads(base, heads, path)
    record = Record.from_json(base_record.to_json())  # single cells: the base's head and operating point
    record.kind_names, record.stage_names = KIND_NAMES, STAGE_NAMES
    record.object_head = {"temperature": 1.0, "threshold": 0.5}  # replaced below; lets the graph be read
    write_model_record(path, record)
    if cfg.finetune_epochs:  # the branch's logits on the validation crops, by the written graph
        got = Predictor.load(path).run_fields(c.x[va])
        logits = (got[0], got[3], got[4])
        err = objectnet.disagreement(path, trunk, branch, c.x[va][:64])
    else:
        logits = apply_heads(f[va], heads)
        got = Predictor.load(path).run_fields(c.x[:64])
        err = max(float(np.abs(g - w).max()) for g, w in zip((got[0], got[3], got[4]), apply_heads(f[:64], heads)))
    if err > 1e-2:  # the graph computes what was trained
        raise RuntimeError(f"the written graph disagrees with the trained heads (max |diff| {err:.3g})")
    nih_va = c.source[va] == SOURCES.index("NIH")
    zp, y = logits[0][nih_va], c.parasitized[va][nih_va]
    T = M.fit_temperature(zp, y)
    thr = M.threshold_max_balanced_accuracy(y, record.probability(zp, T))
    rule = "max balanced accuracy on the 16 NIH validation patients (temperature: min NLL there)"
    record.object_head = {"temperature": T, "threshold": thr, "rule": rule}
    # the base's provenance, operating point and figures hold for the cell head, which is the base's own;
    # its whole-field threshold was of that head: the whole-field head gets its own (field-threshold)
    record.extra = {k: v for k, v in base_record.extra.items() if not k.startswith("field_threshold")}
    record.extra["heads"] = {
        "base": f"{base.name} (sha256 of its weights in its metadata: backbone and not-a-cell flag kept as they are)",
        "config": asdict(cfg), "n_train": int((~va).sum()), "n_val": int(va.sum()),
        "n_train_by_source": {s: int(((c.source == i) & ~va).sum()) for i, s in enumerate(SOURCES)},
        "seconds": round(time.time() - t0, 1), **({"finetuned_branch": finetune} if finetune else {})}
    if cfg.stain_norm:  # the whole-field path maps each field's stain as the crops were (fields/stain.py)
        record.stain_norm = STAIN_MAP
    record.extra["val_metrics_heads"] = _metrics(logits, c, record, va)
    write_model_record(path, record)
    if record.extra.get("split", {}).get("test"):
        # single cells: the cell head on the base's held-out NIH test patients, kept in the record (shown
        # at /model), as export does; never used to choose anything
        from ..evaluation.evaluate import test_metrics

        record.extra["test_metrics"] = test_metrics(path, Path(cfg.data) / "nih-cells")
        write_model_record(path, record)
    (out / "metrics.json").write_text(json.dumps(record.extra["val_metrics_heads"], indent=1))
    say(json.dumps(record.extra["val_metrics_heads"], indent=1))
    say(f"wrote {path} (whole-field head: threshold {record.object_head['threshold']:.3f}, temperature {T:.3f}; "
        f"cell head: the base's, threshold {record.threshold:.3f})")
    return path
