"""Train the robust model on a GPU machine from recipes/robust/gpu_pack.py's pack (run there, in the repo root).

    python3 recipes/robust/gpu_train.py            # OUT=folder for the run (default runs), EPOCHS (default 12)

Unpacks the images to /tmp/pack, loads the ImageNet weights from the fp16 pack (the weights package
need not be installed there), and runs `train()` as on the CPU, on the GPU: robust_aug, lab_stain_aug
0.5, 1 + 12 epochs, batch 64, the pack's split. 239 s on one H100 (2026-11-26). Then, back here, the
finishing steps are redone on the lossless images (recipes/robust/finish_run.py), and the thresholds and
the not-a-cell flag set as MODEL_CARD.md says.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import malaria_detect.training.loop as T
import malaria_detect.training.models as MM

ROOT = Path(__file__).resolve().parents[2]


def unpack(dst: Path, src: Path = ROOT / ".gpu") -> None:
    idx = json.loads((src / "pack_index.json").read_text())
    data = (src / "pack.bin").read_bytes()
    for c in ("Parasitized", "Uninfected"):
        (dst / c).mkdir(parents=True, exist_ok=True)
    for (name, _), (o, n) in zip(idx["rows"], idx["offsets"]):
        (dst / name).write_bytes(data[o:o + n])
    with open(dst / "patients.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient"])
        w.writerows(idx["rows"])
    (dst / "split.json").write_text(json.dumps(idx["split"]))


def main():
    pack = Path("/tmp/pack")
    unpack(pack)
    weights = ROOT / ".gpu" / "lite0_imagenet_fp16.safetensors"
    MM.load_imagenet_state = lambda name: {k: v.float() for k, v in load_file(str(weights)).items()}
    torch.backends.cudnn.benchmark = True   # train() runs on the GPU (Ranks picks it without torchrun)
    cfg = T.TrainConfig(data=str(pack), out=os.environ.get("OUT", "runs") + "/run",
                        patients_csv=str(pack / "patients.csv"), split_file=str(pack / "split.json"),
                        robust_aug=True, lab_stain_aug=0.5, head_epochs=1,
                        epochs=int(os.environ.get("EPOCHS", "12")), workers=os.cpu_count() or 2, patience=10)
    t = time.time()
    T.train(cfg, progress=False)
    print("total seconds", round(time.time() - t, 1), flush=True)


if __name__ == "__main__":
    main()
