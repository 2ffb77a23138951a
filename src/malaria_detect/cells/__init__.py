"""Single cells: the Predictor (ONNX Runtime) and its heatmaps. No torch."""

from __future__ import annotations

from .predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]

