"""The server's settings: limits and options from MALARIA_DETECT_* environment variables (or the
constructor), each checked at start with a one-line message naming the variable."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..errors import MalariaDetectError
from ..imaging import FIELD_MAX_PIXELS


class SettingsError(MalariaDetectError, ValueError):
    """A server setting (environment variable or option) that cannot be used; the message names it."""


def parse_hosts(value) -> list[str]:
    """'a.example, localhost' -> ['a.example', 'localhost']; empty -> ['*'] (any Host header)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    hosts = [h.strip() for h in (value or "").split(",") if h.strip()]
    return hosts or ["*"]


LOCAL_HOSTS = ["localhost", "127.0.0.1", "[::1]"]   # the Host headers of a server bound to this machine only


def is_loopback(host: str) -> bool:
    """Whether a bind address is this machine only (127.x.x.x, ::1, localhost)."""
    h = (host or "").strip().strip("[]").lower()
    return h in ("localhost", "::1") or h.startswith("127.")


def hosts_for(bind: str, allowed: list[str] | None) -> list[str]:
    """The Host headers answered: `allowed` when it was given (['*'] = any); else, bound to loopback,
    only this machine's names (a web page elsewhere cannot reach the server by DNS rebinding); else any."""
    if allowed is not None:
        return allowed
    return LOCAL_HOSTS if is_loopback(bind) else ["*"]


def default_field_workers() -> int:
    """Fields analysed at once: half the cores (each field's ONNX session uses the rest), at least 1."""
    return max(1, (os.cpu_count() or 1) // 2)


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
    target_cells: Limit = 2000                  # the stopping rule: red cells a sample needs (counting.TARGET_CELLS)
    db: str | None = None                       # the samples database (None: store.default_db_path())
    db_enabled: bool = True                     # save every /smear there; GET /samples reads it
    # comma-separated in the environment; None = by the bind address (run(): loopback -> LOCAL_HOSTS, else any)
    allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    # whole fields (POST /smear): fewer, larger images than single cells
    max_fields: Limit = 8
    max_field_bytes: Limit = 8 * 2**20
    max_field_pixels: Limit = FIELD_MAX_PIXELS   # as the command line's smear --max-field-pixels
    field_workers: Limit = Field(default_factory=default_field_workers)  # fields analysed at once
    field_queue: Limit = 8                       # fields waiting for a worker; past it: 503 + Retry-After
    field_arena: bool = True                     # ONNX Runtime's memory arena for the field model: off holds
    #                                              ~300 MB less when idle, but a field takes ~20 % longer
    # slow clients: seconds for a request's headers, and for its whole body
    header_timeout: Limit = 10
    body_timeout: Limit = 60

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v):
        return None if v is None else parse_hosts(v)

    @model_validator(mode="after")
    def _request_bytes(self):
        if self.max_request_bytes is None:  # default: the files allowed, capped at 64 MiB
            self.max_request_bytes = min(64 * 2**20, self.max_file_bytes * self.max_files + 2**20)
        return self

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError(settings_message(e, values)) from None

    def limits(self) -> dict:
        """The upload limits, as GET /model reports them."""
        return {k: getattr(self, k) for k in ("max_file_bytes", "max_files", "max_pixels", "max_request_bytes",
                                              "max_request_pixels", "max_fields", "max_field_bytes",
                                              "max_field_pixels", "field_workers", "field_queue",
                                              "header_timeout", "body_timeout", "target_cells", "db_enabled")}


def settings_message(e: ValidationError, given: dict) -> str:
    """One line for the first bad value, naming the environment variable it came from (or the
    constructor's argument)."""
    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "settings"
    var = "MALARIA_DETECT_" + name.upper()
    where = name if name in given else var
    value = err.get("input")
    if err["type"] == "greater_than_equal":
        return f"{where} must be at least 1, got {value!r}"
    if name in ("heatmaps", "field_arena"):
        return f"{where} must be 1 or 0 (true or false), got {value!r}"
    if err["type"] in ("int_parsing", "int_type", "int_from_float", "value_error"):
        return f"{where} must be a whole number of at least 1, got {value!r}"
    return f"{where}: {err['msg']}, got {value!r}"
