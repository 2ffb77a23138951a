"""Shared fixtures: the committed sample of real NIH cells, the bundled model, a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
NIH = ROOT.parent / "shared" / "data" / "nih-cells"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def nih() -> Path:
    if not (NIH / "manifest.csv").exists():
        pytest.skip("the full NIH dataset is not at ../shared/data/nih-cells")
    return NIH


@pytest.fixture(scope="session")
def bundled():
    from malaria_detect.cells.predictor import Predictor

    return Predictor.load()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real (tiny) two-stage training run on the committed sample: 64 px, 1 + 1 epochs."""
    torch = pytest.importorskip("torch")
    from malaria_detect.training.config import TrainConfig
    from malaria_detect.training.loop import train

    torch.manual_seed(0)
    os.environ.setdefault("MALARIA_DETECT_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(data=str(SAMPLES), out=str(out), image_size=64, batch_size=32, head_epochs=1, epochs=1,
                      split=[0.6, 0.2, 0.2]), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory) -> Path:
    from malaria_detect.training.export import export

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export(tiny_run, out, sample_dir=SAMPLES)
    return out
