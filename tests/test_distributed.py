"""Training under torchrun: 2 processes on CPU (gloo, DDP) on a tiny sample, killed after its first
epoch and resumed; both ranks must hold identical weights after every optimizer step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from conftest import SAMPLES

from malaria_detect.data import load_split
from malaria_detect.training.checkpoint import load_checkpoint
from malaria_detect.training.distributed import Ranks

# Runs `malaria-detect train` (cli.main) in each rank, recording a hash of the model's weights after
# every optimizer step; DIE_AFTER_EPOCH makes rank 0 exit once that epoch's resume state is saved.
WORKER = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    from malaria_detect import cli
    from malaria_detect.training import loop as T

    log = open(os.environ["STEP_LOG"] + "." + os.environ["RANK"], "a")
    real_optimizer, real_save = T._optimizer, T._save_resume

    def optimizer(model, cfg, stage):
        opt, lr = real_optimizer(model, cfg, stage)
        step = opt.step

        def logged_step(*a, **k):
            out = step(*a, **k)
            h = hashlib.sha256()
            for p in model.parameters():
                h.update(p.detach().cpu().contiguous().numpy().tobytes())
            log.write(json.dumps({"stage": stage, "weights": h.hexdigest(),
                                  "world": torch.distributed.get_world_size()}) + "\\n")
            log.flush()
            return out

        opt.step = logged_step
        return opt, lr

    def save_then_die(run, model, opt, state):
        real_save(run, model, opt, state)
        if state["next"] == int(os.environ.get("DIE_AFTER_EPOCH", "0")):
            os._exit(17)  # a killed job: torchrun stops the other rank

    T._optimizer, T._save_resume = optimizer, save_then_die
    sys.exit(cli.main(sys.argv[1:]))
''')


def torchrun(tmp_path, args, **env):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), "train", *args]
    env = {**os.environ, "MALARIA_DETECT_CACHE": str(tmp_path / "cache"), "STEP_LOG": str(tmp_path / "steps"),
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def steps(tmp_path, rank):
    return [json.loads(line) for line in (tmp_path / f"steps.{rank}").read_text().splitlines()]


def test_two_ranks_step_in_lockstep_resume_and_write_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(SAMPLES), "--out", str(run), "--image-size", "48", "--batch-size", "16",
            "--head-epochs", "1", "--epochs", "1", "--split", "0.6", "0.2", "0.2", "--max-train-images", "64"]
    killed = torchrun(tmp_path, args, DIE_AFTER_EPOCH="1")
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert json.loads((run / "state.json").read_text())["next"] == 1
    assert not (run / "best.safetensors").exists()

    done = torchrun(tmp_path, args + ["--resume"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = steps(tmp_path, 0), steps(tmp_path, 1)
    # 64 images, a global batch of 16 split 8 + 8: 4 steps per epoch, in each of the 2 stages
    assert [s["stage"] for s in r0] == ["head"] * 4 + ["finetune"] * 4 and {s["world"] for s in r0} == {2}
    assert [s["weights"] for s in r0] == [s["weights"] for s in r1]  # identical after every step
    assert len({s["weights"] for s in r0}) == 8                        # and every step changed them

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"]) for r in rows] == [(1, "head"), (2, "finetune")]  # rank 0 wrote, once
    model, rec, ood = load_checkpoint(run)
    assert rec.arch == "efficientnet_lite0" and rec.input_size == 48 and rec.extra["epochs_run"] == 2
    assert rec.extra["split"] == load_split(run / "split.json") and rec.extra["n_train_images"] == 64
    assert set(ood) == {f"ood.{i}.{k}" for i in (0, 1) for k in ("means", "prec", "scale")}
    assert done.stdout.count("best epoch") == 1  # one rank reports


def test_without_torchrun_training_uses_the_gpu_when_there_is_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = Ranks()
    assert not r.active and r.device.type == "cuda" and r.world == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Ranks().device.type == "cpu"
