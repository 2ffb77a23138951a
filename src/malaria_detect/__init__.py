"""malaria-detect: is a red blood cell in a Giemsa-stained thin-smear image parasitized or uninfected?
A research and screening aid, not a diagnosis.

    import malaria_detect as md

    model = md.load()                                  # the bundled model, or md.load("lab.onnx")
    p = model.predict("cell.png")                      # -> Prediction(label, p_parasitized, ood, ...)
    results = model.predict(["a.png", "cells/"])       # -> list[Prediction]; folders expanded
    report = model.smear(["field.jpg"])                # whole fields: every red cell, parasitemia

Torch-free: prediction runs on ONNX Runtime. Training (`malaria_detect.train`) needs the [train] extra.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .predict import Prediction, Predictor

try:
    __version__ = _metadata.version("malaria-detect")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Prediction", "Predictor", "__version__", "load"]


def load(model=None, threads: int | None = None) -> Predictor:
    """The model at `model` (an ONNX file written by `malaria-detect export` or `adapt`), or the
    bundled one, ready to predict. Raises `errors.ModelError` for a file that must not be used."""
    return Predictor.load(model, threads)
