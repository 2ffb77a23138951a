"""Single cells: `POST /predict` (one answer per uploaded cell image, in upload order, with a heatmap
PNG) and `GET /model` (the loaded model's record, test metrics, the limits and the CSV columns)."""

from __future__ import annotations

import base64
import io

from fastapi import FastAPI, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from ..cells.heatmaps import heatmap_overlay
from ..cells.predictor import Prediction, Predictor
from ..fields.report import CSV_FIELDS
from ..imaging import ImageError, PixelBudget, open_rgb
from .settings import Settings
from .summary import MAX_SUMMARY_BYTES, MAX_SUMMARY_ENTRIES
from .uploads import read_uploads, trim_heap


class PredictionOut(BaseModel):
    filename: str
    label: str | None = None
    p_parasitized: float | None = None
    ood: bool | None = None
    ood_score: float | None = None
    kind: str | None = None     # with a model that has object heads: "red cell", "white cell", ...
    stage: str | None = None    # the life stage of a parasitized cell (such a model), with its probability
    p_stage: float | None = None
    heatmap: str | None = None  # data:image/png;base64,...
    error: str | None = None


def heatmap_png(img, cam, temperature: float) -> str:
    """The heatmap overlay of one cell as a PNG data URL."""
    buf = io.BytesIO()
    heatmap_overlay(img, cam, temperature).save(buf, format="PNG", optimize=False, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def classify(pred: Predictor, settings: Settings, names: list[str], blobs: list[bytes]) -> list[dict]:
    """One answer per blob, in the same order. Each image is shrunk as it is decoded; together they
    may not decode more than the request's pixel budget."""
    budget = PixelBudget(settings.max_request_pixels)
    out: list[dict | None] = [None] * len(blobs)
    images, where = [], []
    for k, blob in enumerate(blobs):
        try:
            images.append(open_rgb(blob, settings.max_pixels, budget=budget))
            where.append(k)
        except ImageError as e:
            out[k] = PredictionOut(filename=names[k], error=str(e)).model_dump()
    try:
        results: list[Prediction] = pred.predict(images, names=[names[k] for k in where],
                                                 heatmaps=settings.heatmaps, workers=1) if images else []
        for k, img, r in zip(where, images, results):
            out[k] = PredictionOut(
                filename=r.source, label=r.label, p_parasitized=r.p_parasitized, ood=r.ood,
                ood_score=r.ood_score, error=r.error, kind=r.kind, stage=r.stage, p_stage=r.p_stage,
                heatmap=heatmap_png(img, r.cam, pred.record.temperature) if r.cam is not None else None,
            ).model_dump()
    finally:
        del images
        if budget.total - budget.left > 4_000_000:
            trim_heap()
    return out


def add_cell_routes(app: FastAPI, settings: Settings) -> None:
    """Register GET /model and POST /predict on `app` (the Predictor is app.state.predictor)."""

    @app.get("/model", summary="the loaded model: architecture, preprocessing, operating point, test metrics")
    def model_info():
        pred: Predictor = app.state.predictor
        r, ex = pred.record, pred.record.extra
        return {
            "file": pred.path.name, "arch": r.arch, "input_size": r.input_size,
            "mean": r.mean, "std": r.std, "class_names": r.class_names,
            "threshold": r.threshold, "threshold_rule": ex.get("threshold_rule"),
            "temperature": r.temperature, "ood_threshold": r.ood_threshold,
            "test_metrics": ex.get("test_metrics"), "val_metrics": ex.get("val_metrics"),
            "limits": settings.limits() | {"max_summary_entries": MAX_SUMMARY_ENTRIES,
                                           "max_summary_bytes": MAX_SUMMARY_BYTES},
            # the CSV columns of the page's downloads, as the command line writes them
            "csv_columns": {"cells": pred.csv_fields, "fields": CSV_FIELDS},
            "intended_use": "research and screening aid, not a diagnosis",
        }

    @app.post("/predict", response_model=list[PredictionOut],
              summary="classify one or many cell images (multipart field 'files')",
              responses={413: {"description": "upload too large or too many files"},
                         415: {"description": "no file of a supported image type"},
                         422: {"description": "malformed request (no 'files' field, or not valid multipart)"}})
    async def predict(files: list[UploadFile] = File(..., description="cell images: png, jpg, webp, tif, bmp")):
        uploads = await read_uploads(files, max_files=settings.max_files, max_bytes=settings.max_file_bytes)
        # answers by upload position, never by name; a file of another type has its own error
        out = [None if u.error is None else PredictionOut(filename=u.name, error=u.error).model_dump()
               for u in uploads]
        todo = [i for i, u in enumerate(uploads) if u.error is None]
        if todo:
            answers = await run_in_threadpool(classify, app.state.predictor, settings,
                                              [uploads[i].name for i in todo], [uploads[i].data for i in todo])
            for i, r in zip(todo, answers):
                out[i] = r
        return out
