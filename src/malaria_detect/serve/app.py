"""FastAPI app: the screening page at /, a REST API at /predict, /model, /health (OpenAPI at /docs).

The Predictor is loaded once at start-up (lifespan); inference runs in worker threads, off the
event loop. ONNX Runtime sessions are safe to call from several threads at once.
"""

from __future__ import annotations

import base64
import io
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ..data import IMAGE_EXTENSIONS
from ..predict import Prediction, Predictor, heatmap_overlay
from ..preprocess import ImageError, open_rgb
from .docs import add_offline_docs

STATIC = Path(__file__).parent / "static"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/tiff", "image/bmp", "image/x-ms-bmp",
               "image/jpg", "image/x-png"}


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


@dataclass
class Settings:
    """Server settings; each can be overridden by an environment variable (MALARIA_DETECT_...)."""

    model: str | None = field(default_factory=lambda: os.environ.get("MALARIA_DETECT_MODEL") or None)
    max_file_bytes: int = field(default_factory=lambda: _env_int("MALARIA_DETECT_MAX_FILE_BYTES", 10 * 2**20))
    max_files: int = field(default_factory=lambda: _env_int("MALARIA_DETECT_MAX_FILES", 64))
    max_pixels: int = field(default_factory=lambda: _env_int("MALARIA_DETECT_MAX_PIXELS", 16_000_000))
    heatmaps: bool = field(default_factory=lambda: os.environ.get("MALARIA_DETECT_HEATMAPS", "1") != "0")

    @property
    def max_request_bytes(self) -> int:
        return self.max_file_bytes * self.max_files + 2**20


class PredictionOut(BaseModel):
    filename: str
    label: str | None = None
    p_parasitized: float | None = None
    ood: bool | None = None
    ood_score: float | None = None
    heatmap: str | None = None  # data:image/png;base64,...
    error: str | None = None


def _heatmap_png(img, cam, temperature: float) -> str:
    buf = io.BytesIO()
    heatmap_overlay(img, cam, temperature).save(buf, format="PNG", optimize=False, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _supported(f: UploadFile) -> bool:
    ctype = (f.content_type or "").split(";")[0].strip().lower()
    ext = Path(f.filename or "").suffix.lower()
    return ctype in IMAGE_TYPES or (ctype in ("", "application/octet-stream") and ext in IMAGE_EXTENSIONS)


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.predictor = predictor or Predictor.load(settings.model)
        yield

    app = FastAPI(title="malaria-detect", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Screening aid for Giemsa-stained thin-smear red-cell crops: parasitized or "
                              "uninfected. Not a diagnosis.")
    app.state.settings = settings

    def classify(blobs: list[tuple[str, bytes]]) -> list[dict]:
        pred: Predictor = app.state.predictor
        out, images, names = [], [], []
        for name, blob in blobs:
            try:
                images.append(open_rgb(blob, settings.max_pixels))
                names.append(name)
            except ImageError as e:
                out.append(PredictionOut(filename=name, error=str(e)).model_dump())
        if images:
            results: list[Prediction] = pred.predict(images, names=[f"{i}" for i in range(len(images))],
                                                     heatmaps=settings.heatmaps, workers=1)
            for img, name, r in zip(images, names, results):
                out.append(PredictionOut(
                    filename=name, label=r.label, p_parasitized=r.p_parasitized, ood=r.ood,
                    ood_score=r.ood_score, error=r.error,
                    heatmap=_heatmap_png(img, r.cam, pred.record.temperature) if r.cam is not None else None).model_dump())
        return out

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_request_bytes:
                return JSONResponse({"detail": f"upload too large: {int(length):,} bytes "
                                               f"(limit {settings.max_request_bytes:,} per request)"}, 413)
        return await call_next(request)

    @app.get("/health", summary="liveness and model status")
    def health():
        return {"status": "ok", "model_loaded": getattr(app.state, "predictor", None) is not None}

    @app.get("/model", summary="the loaded model: architecture, preprocessing, operating point, test metrics")
    def model_info():
        r = app.state.predictor.record
        ex = r.extra
        return {
            "file": app.state.predictor.path.name, "arch": r.arch, "input_size": r.input_size,
            "mean": r.mean, "std": r.std, "class_names": r.class_names,
            "threshold": r.threshold, "threshold_rule": ex.get("threshold_rule"),
            "temperature": r.temperature, "ood_threshold": r.ood_threshold,
            "test_metrics": ex.get("test_metrics"), "val_metrics": ex.get("val_metrics"),
            "limits": {"max_file_bytes": settings.max_file_bytes, "max_files": settings.max_files,
                       "max_pixels": settings.max_pixels},
            "intended_use": "research and screening aid, not a diagnosis",
        }

    @app.post("/predict", response_model=list[PredictionOut],
              summary="classify one or many cell images (multipart field 'files')",
              responses={413: {"description": "upload too large or too many files"},
                         415: {"description": "no file of a supported image type"},
                         422: {"description": "malformed request (no 'files' field)"}})
    async def predict(files: list[UploadFile] = File(..., description="cell images: png, jpg, webp, tif, bmp")):
        if len(files) > settings.max_files:
            raise HTTPException(413, f"too many files: {len(files)} (limit {settings.max_files} per request)")
        if not any(_supported(f) for f in files):
            kinds = ", ".join(sorted({f.content_type or "unknown" for f in files}))
            raise HTTPException(415, f"unsupported file type ({kinds}); send png, jpg, webp, tif or bmp images")
        names, blobs, entries = [], [], {}
        for i, f in enumerate(files):
            name = f.filename or f"file{i}"
            if name in names:
                name = f"{name} ({i})"
            names.append(name)
            data = await f.read(settings.max_file_bytes + 1)
            if len(data) > settings.max_file_bytes:
                raise HTTPException(413, f"{name}: file too large (limit {settings.max_file_bytes:,} bytes)")
            if not _supported(f):
                entries[name] = PredictionOut(filename=name, error=f"unsupported file type "
                                                                   f"{f.content_type!r}").model_dump()
            else:
                blobs.append((name, data))
        results = await run_in_threadpool(classify, blobs) if blobs else []
        by_name = {r["filename"]: r for r in results} | entries
        return [by_name[n] for n in names]  # upload order

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_offline_docs(app)  # /docs and /redoc from local files (no CDN), /favicon.ico
    return app


def run(model: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    settings = Settings()
    if model:
        settings.model = model
    predictor = Predictor.load(settings.model)  # fail fast with a clear message before binding the port
    print(f"malaria-detect: serving {predictor.path.name} at http://{host}:{port}  (API docs: /docs)", flush=True)
    uvicorn.run(create_app(settings, predictor), host=host, port=port, log_level="warning")
