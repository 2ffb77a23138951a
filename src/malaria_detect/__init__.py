"""malaria-detect: is a red blood cell in a Giemsa-stained thin-smear image parasitized or uninfected?
A research and screening aid, not a diagnosis.

    import malaria_detect as md

    model = md.load()                                  # the bundled model, or md.load("lab.onnx"), md.load("anylab")
    p = model.predict("cell.png")                      # -> Prediction(label, p_parasitized, ood, ...)
    results = model.predict(["a.png", "cells/"])       # -> list[Prediction]; folders expanded
    report = md.smear(["field.jpg"])                   # whole fields: every red cell, parasitemia
    md.available_models()                              # the bundled models with their records

Torch-free: prediction runs on ONNX Runtime. Training (`malaria_detect.training`) needs the [train]
extra. The layout of the package: docs/architecture.md.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .cells.predictor import Prediction, Predictor
from .modelfile import available_models

try:
    __version__ = _metadata.version("malaria-detect")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Prediction", "Predictor", "__version__", "available_models", "load", "smear"]


def load(model=None, threads: int | None = None) -> Predictor:
    """The model at `model` (an ONNX file written by `malaria-detect export` or `adapt`, or a bundled
    model's name: "anylab", "robust", "nih"), or the bundled default (anylab), ready to predict. Raises
    `errors.ModelError` for a file that must not be used."""
    return Predictor.load(model, threads)


def smear(fields, model=None, **options) -> dict:
    """Whole microscope fields (images or folders of them) -> the `malaria-detect smear --json` report:
    every red cell with its box and answer, counts and parasitemia per field and pooled. `model`: a
    Predictor, a model file or name (default: the bundled whole-field model); `options` are those of
    `fields.analysis.SmearOptions` (cell_diameter, batch_size, rbc_per_ul)."""
    from .fields.analysis import SmearOptions, analyze_fields  # OpenCV loads with the first field, not here
    from .modelfile import bundled_field_model_path

    pred = model if isinstance(model, Predictor) else Predictor.load(model or bundled_field_model_path())
    return analyze_fields(pred, fields, SmearOptions(**options))
