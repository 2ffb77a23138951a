"""FastAPI app: the screening page at /, a REST API at /predict, /model, /health (OpenAPI at /docs).

The Predictor is loaded once at start-up (lifespan); inference runs in worker threads, off the
event loop. ONNX Runtime sessions are safe to call from several threads at once.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import io
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..cells.heatmaps import heatmap_overlay
from ..cells.predictor import Prediction, Predictor
from ..errors import MalariaDetectError
from ..imaging import IMAGE_EXTENSIONS, ImageError, PixelBudget, open_rgb
from .docs import add_offline_docs
from .fields import add_smear_routes

STATIC = Path(__file__).parent / "static"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/tiff", "image/bmp", "image/x-ms-bmp",
               "image/jpg", "image/x-png"}


class SettingsError(MalariaDetectError, ValueError):
    """A server setting (environment variable or option) that cannot be used; the message names it."""


def parse_hosts(value) -> list[str]:
    """'a.example, localhost' -> ['a.example', 'localhost']; empty -> ['*'] (any Host header)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    hosts = [h.strip() for h in (value or "").split(",") if h.strip()]
    return hosts or ["*"]


def _reject_bool(v):
    if isinstance(v, bool):  # True is not a number of bytes
        raise ValueError("not a whole number")
    return v


Limit = Annotated[int, Field(ge=1), BeforeValidator(_reject_bool)]


class Settings(BaseSettings):
    """Server settings. Each field can be set by the environment variable MALARIA_DETECT_<FIELD>
    (e.g. MALARIA_DETECT_MAX_FILES=16, MALARIA_DETECT_HEATMAPS=false) or given to the constructor;
    a value that cannot be used raises SettingsError naming the variable."""

    model_config = SettingsConfigDict(env_prefix="MALARIA_DETECT_", env_ignore_empty=True, validate_default=True,
                                      protected_namespaces=())

    model: str | None = None                    # the ONNX model; None = the bundled one
    # whole-request limits: the body (counted as it streams) and the pixels decoded per request
    max_request_bytes: Limit | None = None      # None = files x bytes per file + 1 MiB, at most 64 MiB
    max_request_pixels: Limit = 64_000_000
    max_file_bytes: Limit = 10 * 2**20
    max_files: Limit = 64
    max_pixels: Limit = 4_000_000
    heatmaps: bool = True
    allowed_hosts: Annotated[list[str], NoDecode] = ["*"]   # comma-separated in the environment
    # whole fields (POST /smear): fewer, larger images than single cells
    max_fields: Limit = 8
    max_field_bytes: Limit = 8 * 2**20
    max_field_pixels: Limit = 40_000_000

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v):
        return parse_hosts(v)

    @model_validator(mode="after")
    def _request_bytes(self):
        if self.max_request_bytes is None:  # default: the files allowed, capped at 64 MiB
            self.max_request_bytes = min(64 * 2**20, self.max_file_bytes * self.max_files + 2**20)
        return self

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError(_settings_message(e, values)) from None


def _settings_message(e: ValidationError, given: dict) -> str:
    """One line for the first bad value, naming the environment variable it came from (or the
    constructor's argument)."""
    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "settings"
    var = "MALARIA_DETECT_" + name.upper()
    where = name if name in given else var
    value = err.get("input")
    if err["type"] == "greater_than_equal":
        return f"{where} must be at least 1, got {value!r}"
    if name == "heatmaps":
        return f"{where} must be 1 or 0 (true or false), got {value!r}"
    if err["type"] in ("int_parsing", "int_type", "int_from_float", "value_error"):
        return f"{where} must be a whole number of at least 1, got {value!r}"
    return f"{where}: {err['msg']}, got {value!r}"


class _TooLarge(HTTPException):
    def __init__(self, detail: str):
        super().__init__(413, detail)


class UploadLimit:
    """Pure ASGI middleware: a request body over `max_bytes` gets 413. The bytes are counted as they
    arrive, so a chunked upload (no Content-Length) is stopped at the cap instead of being read, and
    spooled to disk, whole; a declared Content-Length over the cap is refused before reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            msg = f"upload too large: {int(length):,} bytes (limit {self.max_bytes:,} per request)"
            return await JSONResponse({"detail": msg}, 413)(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(f"upload too large: over {self.max_bytes:,} bytes per request")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge as e:  # normally answered by the app's HTTPException handler already
            if started:
                raise
            await JSONResponse({"detail": e.detail}, 413)(scope, receive, send)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if os.name == "posix" else None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc keeps it otherwise, so the decode buffers of
    one request of large images would stay resident after it."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


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

    app = FastAPI(title="malaria-detect", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Screening aid for Giemsa-stained thin-smear red-cell crops: parasitized or "
                              "uninfected. Not a diagnosis.")
    app.state.settings = settings

    def classify(names: list[str], blobs: list[bytes]) -> list[dict]:
        """One answer per blob, in the same order. Each image is shrunk as it is decoded; together
        they may not decode more than the request's pixel budget."""
        pred: Predictor = app.state.predictor
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
                    ood_score=r.ood_score, error=r.error,
                    heatmap=_heatmap_png(img, r.cam, pred.record.temperature) if r.cam is not None else None,
                ).model_dump()
        finally:
            del images
            if budget.total - budget.left > 4_000_000:
                _trim_heap()
        return out

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # an unparsable body (e.g. broken multipart): 422, as documented
            return JSONResponse({"detail": f"malformed request: {exc.detail}"}, 422)
        return await http_exception_handler(request, exc)

    app.add_middleware(UploadLimit, max_bytes=settings.max_request_bytes)
    if settings.allowed_hosts != ["*"]:  # outermost: a wrong Host header (DNS rebinding) gets 400
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)

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
                       "max_pixels": settings.max_pixels, "max_request_bytes": settings.max_request_bytes,
                       "max_request_pixels": settings.max_request_pixels, "max_fields": settings.max_fields,
                       "max_field_bytes": settings.max_field_bytes, "max_field_pixels": settings.max_field_pixels},
            "intended_use": "research and screening aid, not a diagnosis",
        }

    @app.post("/predict", response_model=list[PredictionOut],
              summary="classify one or many cell images (multipart field 'files')",
              responses={413: {"description": "upload too large or too many files"},
                         415: {"description": "no file of a supported image type"},
                         422: {"description": "malformed request (no 'files' field, or not valid multipart)"}})
    async def predict(files: list[UploadFile] = File(..., description="cell images: png, jpg, webp, tif, bmp")):
        if len(files) > settings.max_files:
            raise HTTPException(413, f"too many files: {len(files)} (limit {settings.max_files} per request)")
        if not any(_supported(f) for f in files):
            kinds = ", ".join(sorted({f.content_type or "unknown" for f in files}))
            raise HTTPException(415, f"unsupported file type ({kinds}); send png, jpg, webp, tif or bmp images")
        out: list[dict | None] = [None] * len(files)  # answers by upload position, never by name
        todo, names, blobs = [], [], []
        for i, f in enumerate(files):
            name = f.filename or f"file{i}"
            data = await f.read(settings.max_file_bytes + 1)
            if len(data) > settings.max_file_bytes:
                raise HTTPException(413, f"{name}: file too large (limit {settings.max_file_bytes:,} bytes)")
            if not _supported(f):
                out[i] = PredictionOut(filename=name, error=f"unsupported file type {f.content_type!r}").model_dump()
            else:
                todo.append(i)
                names.append(name)
                blobs.append(data)
        if blobs:
            for i, r in zip(todo, await run_in_threadpool(classify, names, blobs)):
                out[i] = r
        return out

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_offline_docs(app)  # /docs and /redoc from local files (no CDN), /favicon.ico
    add_smear_routes(app, settings, _supported)  # POST /smear: whole fields (serve/fields.py)
    return app


def run(model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
        allowed_hosts: str | None = None) -> None:
    import uvicorn

    settings = Settings()
    if model:
        settings.model = model
    if allowed_hosts:
        settings.allowed_hosts = parse_hosts(allowed_hosts)
    predictor = Predictor.load(settings.model)  # fail fast with a clear message before binding the port
    print(f"malaria-detect: serving {predictor.path.name} at http://{host}:{port}  (API docs: /docs)", flush=True)
    uvicorn.run(create_app(settings, predictor), host=host, port=port, log_level="warning")
