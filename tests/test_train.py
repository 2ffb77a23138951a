"""Training: a real two-stage run on the sample, self-describing checkpoints, resume after a kill."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from malaria_detect.data import load_split
from malaria_detect.training import loop as T
from malaria_detect.training.augment import augment
from malaria_detect.training.checkpoint import load_checkpoint
from malaria_detect.training.config import TrainConfig


def test_tiny_run_writes_a_self_describing_checkpoint(tiny_run):
    model, rec, ood = load_checkpoint(tiny_run / "best.safetensors")
    assert rec.arch == "efficientnet_lite0" and rec.input_size == 64
    assert rec.mean == (0.5, 0.5, 0.5) and rec.class_names == ("Uninfected", "Parasitized")
    assert 0 < rec.threshold < 1 and rec.temperature > 0 and rec.ood_threshold > 0
    ex = rec.extra
    assert ex["split"] == load_split(tiny_run / "split.json")
    assert ex["split_sha256"] == T.D.file_sha256(tiny_run / "split.json")
    assert ex["config"]["image_size"] == 64 and "val_metrics" in ex and "data_fingerprint" in ex
    assert set(ood) == {f"ood.{i}.{k}" for i in (0, 1) for k in ("means", "prec", "scale")}
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["head", "finetune"]
    sidecar = json.loads((tiny_run / "best.json").read_text())
    assert sidecar["arch"] == "efficientnet_lite0"


def test_checkpoint_loading_is_strict(tiny_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_run / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny_run / "best.safetensors"))
    tensors.pop("head.fc.bias")
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=meta)
    with pytest.raises(RuntimeError, match="head.fc.bias"):
        load_checkpoint(tmp_path / "broken.safetensors")


def test_augmentation_keeps_shape_range_and_changes_colour():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    y = augment(x.clone(), g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(x.mean((2, 3)), y.mean((2, 3)), atol=1e-3)


def test_killed_run_resumes_from_its_last_epoch(samples, tmp_path, monkeypatch):
    cfg = TrainConfig(data=str(samples), out=str(tmp_path / "run"), image_size=48, batch_size=32,
                        head_epochs=1, epochs=2, split=[0.6, 0.2, 0.2], max_train_images=64)
    real_save = T._save_resume
    calls = []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(T, "_save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["next"] == 2 and not (tmp_path / "run" / "best.safetensors").exists()
    with pytest.raises(T.D.DataError, match="--resume"):
        T.train(cfg, progress=False)  # refuses to overwrite a run
    monkeypatch.setattr(T, "_save_resume", real_save)
    T.train(TrainConfig(data=str(samples), out=str(tmp_path / "run")), resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    _, rec, _ = load_checkpoint(tmp_path / "run")
    assert rec.extra["epochs_run"] == 3 and rec.input_size == 48


def test_simple_cnn_baseline_trains_end_to_end(samples, tmp_path):
    out = T.train(TrainConfig(data=str(samples), out=str(tmp_path / "cnn"), model="simple_cnn", image_size=32,
                                epochs=1, batch_size=32, split=[0.6, 0.2, 0.2], max_train_images=64),
                  progress=False)
    _, rec, _ = load_checkpoint(out)
    assert rec.arch == "simple_cnn" and rec.extra["config"]["pretrained"] is False
    rows = (tmp_path / "cnn" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["stage"] for r in rows] == ["finetune"]


def test_cv_trains_one_model_per_patient_fold(samples, tmp_path):
    from malaria_detect.evaluation.crossval import cross_validate, format_cv

    r = cross_validate(samples, folds=2, model="simple_cnn", out=tmp_path / "cv", epochs=1, head_epochs=0,
                       image_size=32, max_train_images=48)
    assert [f["fold"] for f in r["per_fold"]] == [1, 2] and r["leaked_patients"] == []
    tested = [set(json.loads((tmp_path / "cv" / f"fold{i}_split.json").read_text())["parts"]["test"]) for i in (1, 2)]
    assert not tested[0] & tested[1] and len(tested[0] | tested[1]) == 32
    assert sum(f["n_images"] for f in r["per_fold"]) == 221
    assert "accuracy" in format_cv(r) and set(r["summary"]["accuracy"]) == {"mean", "sd"}
