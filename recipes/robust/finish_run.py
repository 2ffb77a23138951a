"""Redo a training run's finishing steps (temperature, threshold, not-a-cell model, record) on
another copy of its data, and write its best.safetensors again.

    .venv/bin/python recipes/robust/finish_run.py runs/labstain112 --data runs/data/combined

For a run trained elsewhere (the robust model trained on a GPU machine from a 112-px WebP copy of
the training set, to fit its transfer limit): its weights are kept, and what is fitted on the
validation cells is fitted again here on the lossless images. The split must be the run's own
(its split.json is checked against the data's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from malaria_detect import data as D
from malaria_detect.training.checkpoint import load_weights, save_checkpoint
from malaria_detect.training.distributed import Ranks
from malaria_detect.training.loop import finish, load_data, run_config
from malaria_detect.training.models import create_model

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--data", required=True, help="the training data folder (with patients.csv)")
    a = ap.parse_args()
    run = Path(a.run)
    trained_on = json.loads((run / "config.json").read_text())["data"]
    cfg = run_config(run, a.data)
    if D.load_split(run / "split.json") != D.load_split(Path(a.data) / "split.json"):
        raise SystemExit(f"{run}/split.json differs from {a.data}/split.json")
    data = load_data(cfg, True, Ranks(), print)
    model = create_model(cfg.model, pretrained=False, dropout=cfg.dropout)
    load_weights(run / "best_weights.safetensors", model)
    state = json.loads((run / "state.json").read_text())
    record, ood = finish(cfg, model, data, state)
    record.extra["trained_on"] = trained_on
    record.extra["finished_on"] = a.data
    save_checkpoint(run / "best.safetensors", model, record, ood)
    print(json.dumps({k: record.extra[k] for k in ("threshold_rule", "val_metrics", "best_epoch")}, indent=1))


if __name__ == "__main__":
    main()
