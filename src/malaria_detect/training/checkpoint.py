"""Checkpoints that describe themselves, and the state that lets a killed run resume.

    best.safetensors   the model's weights, plus the not-a-cell arrays (`ood.*`); the Record (JSON)
                       in its metadata (`record`), and the same Record readable in best.json
    last.safetensors   weights (`model.*`) and optimizer state (`opt.{param}.{name}`) of the last
                       finished epoch, with state.json (epoch, best score, ...): what --resume reads
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MissingFileError, ModelError
from ..record import Record
from .models import create_model

FORMAT = "malaria-detect/1"


def save_checkpoint(path: Path, model, record: Record, extra_tensors: dict | None = None) -> None:
    """Weights (+ optional arrays) as safetensors; the Record in its metadata and in a JSON sidecar."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = torch.as_tensor(v).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"record": record.to_json(), "format": FORMAT})
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(json.loads(record.to_json()), indent=1) + "\n")


def load_checkpoint(path: str | Path):
    """-> (model in eval mode, Record, not-a-cell arrays `ood.*`). Every weight key must match (strict)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.exists():
        raise MissingFileError(f"{path}: no checkpoint (train one with 'malaria-detect train')")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "record" not in meta:
        raise ModelError(f"{path}: not a malaria-detect checkpoint (no record in its metadata)")
    record = Record.from_json(meta["record"])
    tensors = load_file(str(path))
    extra = {k: v.numpy() for k, v in tensors.items() if k.startswith("ood.")}
    model = create_model(record.arch, pretrained=False)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("ood.")}, strict=True)
    return model.eval(), record, extra


def save_weights(path: Path, model) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(path: Path, model) -> None:
    model.load_state_dict(load_file(str(path)), strict=True)


def save_resume(run: Path, model, opt, state: dict) -> None:
    """The last finished epoch: weights and optimizer state, then state.json (written last)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    tmp = run / "last.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(run / "last.safetensors")
    (run / "state.json").write_text(json.dumps(state, indent=1))


def load_resume(run: Path, model, opt) -> dict:
    """Restore what save_resume wrote into `model` and `opt` -> the run's state."""
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
