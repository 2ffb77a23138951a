"""Shared fixtures: the committed sample of real NIH cells, the bundled model, a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every smear of the tests (and of the commands they start) writes its samples database here, never into
# the user's data directory
os.environ["MALARIA_DETECT_DB"] = str(Path(__import__("tempfile").mkdtemp(prefix="md-db-")) / "samples.sqlite3")
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve(port: int, env: dict | None = None):
    """The real `malaria-detect serve` on 127.0.0.1:port, once it answers /health; a generator for
    fixtures (the server is stopped after the yield)."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "malaria_detect.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(160):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("server exited: " + proc.stdout.read())
            time.sleep(0.25)
    yield proc
    proc.terminate()
    proc.wait(10)
