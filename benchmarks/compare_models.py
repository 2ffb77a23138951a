"""Accuracy of the shipped model against baselines, all on the same patient-disjoint test patients.

    .venv/bin/python benchmarks/compare_models.py --data ../shared/data/nih-cells

Rows (each trained on the shipped model's training patients, scored on its test patients):
  - the shipped EfficientNet-Lite0 transfer model (bundled ONNX, 112 px)
  - frozen ImageNet backbone + linear head only (no fine-tuning), 96 px runs/frozen
  - simple_cnn trained from scratch, 96 px                             runs/scratch
  - EMFET 2.0 (hand-crafted features + random forest), in its own venv  benchmarks/.emfet-venv
Missing runs are trained first (CPU: ~5 min frozen, ~15 min scratch); existing ones are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from malaria_detect.cells.predictor import Predictor
from malaria_detect.evaluation.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]

COLS = ["accuracy", "recall", "specificity", "precision", "f1", "mcc", "roc_auc"]


def _train(args: list[str]):
    subprocess.run([sys.executable, "-m", "malaria_detect.cli", "train", *args], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nih-cells"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--skip-emfet", action="store_true")
    a = ap.parse_args()
    runs = Path(a.runs)
    runs.mkdir(exist_ok=True)
    shipped = Predictor.load()
    split = runs / "shipped_split.json"
    split.write_text(json.dumps({"parts": shipped.record.extra["split"]}))
    rows = [("EfficientNet-Lite0, fine-tuned (shipped, ONNX)", evaluate(None, a.data, n_boot=0, progress=False))]

    frozen = runs / "frozen"
    if not (frozen / "best.safetensors").exists():
        _train(["--data", a.data, "--out", str(frozen), "--split-file", str(split), "--head-epochs", "3",
                "--image-size", "96", "--epochs", "0"] + (["--resume"] if (frozen / "state.json").exists() else []))
    rows.append(("EfficientNet-Lite0, frozen backbone + linear head", evaluate(frozen, a.data, n_boot=0,
                                                                                 progress=False)))
    scratch = runs / "scratch"
    if not (scratch / "best.safetensors").exists():
        _train(["--data", a.data, "--out", str(scratch), "--split-file", str(split), "--model", "simple_cnn",
                "--image-size", "96", "--epochs", "8", "--lr", "3e-3"]
               + (["--resume"] if (scratch / "state.json").exists() else []))
    rows.append(("simple_cnn from scratch", evaluate(scratch, a.data, n_boot=0, progress=False)))

    if not a.skip_emfet:
        venv = ROOT / "benchmarks" / ".emfet-venv"
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "emfet==2.0.0"], check=True)
        out = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "benchmarks" / "emfet_baseline.py"),
                              "--data", a.data, "--split", str(split)], check=True, capture_output=True, text=True)
        rows.append(("EMFET 2.0 (hand-crafted features + random forest)", json.loads(out.stdout.splitlines()[-1])))

    n = rows[0][1]
    print(f"test patients: {n['n_patients']}, cells: {n['n_images']} (patient-disjoint from training)")
    print("| model | " + " | ".join(COLS) + " |")
    print("|---|" + "---|" * len(COLS))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in COLS) + " |")
    (runs / "compare_models.json").write_text(json.dumps({name: r for name, r in rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
