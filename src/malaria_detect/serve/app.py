"""FastAPI app: the screening page at /, a REST API (OpenAPI at /docs), wired from one module per
family of routes:

    cells.py    POST /predict (single cells), GET /model
    fields.py   POST /smear (whole fields), in the bounded pool of pool.py
    summary.py  POST /summary (pooled counts of answers the page has, by counting.py)
    uploads.py  the body cap and deadline (UploadLimit), the one upload reader, the type rule
    errors.py   short error answers (a 422 names the problem, never echoes the upload)
    security.py security headers and CSPs (SecurityHeaders), the header deadline (TimedH11Protocol)
    settings.py Settings (MALARIA_DETECT_* environment variables)

The Predictor is loaded once at start-up (lifespan); inference runs in worker threads, off the
event loop. ONNX Runtime sessions are safe to call from several threads at once.

Middleware, outermost first: SecurityHeaders (every answer, even a 500), TrustedHostMiddleware (a
wrong Host header: 400), PoolGate (/smear while its pool is full: 503 before the body is read),
UploadLimit (the body's size and deadline: 413 / 408).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..cells.predictor import Predictor
from .cells import add_cell_routes
from .docs import add_offline_docs
from .errors import http_error, invalid_request
from .fields import add_smear_routes
from .pool import PoolGate
from .samples import add_sample_routes
from .security import SecurityHeaders, timed_protocol
from .settings import Settings, SettingsError, hosts_for, parse_hosts
from .summary import MAX_SUMMARY_BYTES, add_summary_routes
from .uploads import UploadLimit

__all__ = ["STATIC", "Settings", "SettingsError", "create_app", "parse_hosts", "run"]

STATIC = Path(__file__).parent / "static"


class _App(FastAPI):
    def build_middleware_stack(self):
        # outside Starlette's ServerErrorMiddleware, so that a 500 gets the security headers too
        return SecurityHeaders(super().build_middleware_stack())


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """The app. `settings.allowed_hosts` None answers any Host header here; run() chooses by the bind
    address (loopback: this machine's names only)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.predictor = predictor or Predictor.load(settings.model)
        yield
        pool.shutdown()

    app = _App(title="malaria-detect", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
               description="Screening aid for Giemsa-stained thin-smear red-cell crops: parasitized or "
                           "uninfected. Not a diagnosis.")
    app.state.settings = settings
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_middleware(UploadLimit, max_bytes=settings.max_request_bytes, per_path={"/summary": MAX_SUMMARY_BYTES},
                       body_timeout=settings.body_timeout)

    @app.get("/health", summary="liveness and model status")
    def health():
        return {"status": "ok", "model_loaded": getattr(app.state, "predictor", None) is not None}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    add_cell_routes(app, settings)          # POST /predict, GET /model
    pool = add_smear_routes(app, settings)  # POST /smear: whole fields, in a bounded pool
    add_summary_routes(app)                 # POST /summary: the page's pooled counts
    add_sample_routes(app, settings)        # GET /samples, GET /samples/{id}: the samples database
    app.add_middleware(PoolGate, pool=pool)
    hosts = settings.allowed_hosts or ["*"]
    if hosts != ["*"]:  # a wrong Host header (DNS rebinding) gets 400
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_offline_docs(app)  # /docs and /redoc from local files (no CDN), /favicon.ico
    return app


def run(model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
        allowed_hosts: str | None = None) -> None:
    import uvicorn

    settings = Settings()
    if model:
        settings.model = model
    if allowed_hosts:
        settings.allowed_hosts = parse_hosts(allowed_hosts)
    # bound to this machine only: only its names in the Host header (unless told otherwise)
    settings.allowed_hosts = hosts_for(host, settings.allowed_hosts)
    predictor = Predictor.load(settings.model)  # fail fast with a clear message before binding the port
    print(f"malaria-detect: serving {predictor.path.name} at http://{host}:{port}  (API docs: /docs)", flush=True)
    # slow clients: headers within header_timeout (TimedH11Protocol), the body within body_timeout
    # (UploadLimit), 5 s idle between requests on a kept-alive connection, headers at most 16 KiB
    uvicorn.run(create_app(settings, predictor), host=host, port=port, log_level="warning",
                http=timed_protocol(settings.header_timeout), timeout_keep_alive=5,
                h11_max_incomplete_event_size=16 * 1024, server_header=False)
