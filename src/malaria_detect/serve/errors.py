"""Error answers that name the problem in a few hundred bytes, whatever was sent.

FastAPI's own 422 copies each error's `input` back: 60 parts named 'files' without a filename, 1 MiB
of zero bytes each, came back as a 377 MB body (each zero byte is 6 bytes of JSON, \\u0000). Here:

    422  {"detail": [{"type", "loc", "msg"} of the first MAX_ERRORS errors], "n_errors": N}
         (no input, no ctx; each loc part and msg shortened), in FastAPI's HTTPValidationError shape
    413  a JSON list over its limit (POST /summary's), without echoing the list back
    400  an unparsable body (broken multipart) -> 422 "malformed request: ..."
    any  an HTTPException's detail is shortened to MAX_DETAIL characters
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_ERRORS = 3      # errors listed in a 422 (n_errors counts them all)
MAX_MSG = 160       # characters of one error's message
MAX_LOC = 64        # characters of one part of an error's location
MAX_DETAIL = 400    # characters of an HTTPException's detail


def short(text, limit: int = MAX_MSG) -> str:
    """`text` as a string of at most `limit` characters ('...' marks a cut)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _loc(loc) -> list:
    return [p if isinstance(p, int) else short(p, MAX_LOC) for p in list(loc or ())[:8]]


def _message(e: dict) -> str:
    loc = tuple(e.get("loc") or ())
    if loc[:1] == ("body",) and "UploadFile" in str(e.get("msg", "")):  # a form part that is not a file
        return (f"not a file: a part named {str(loc[1]) if len(loc) > 1 else 'files'!r} without a filename "
                "(send each image as a file)")
    return short(e.get("msg", "invalid"))


def validation_detail(errors: list[dict]) -> dict:
    """FastAPI's validation errors -> a body of a few hundred bytes."""
    body = {"detail": [{"type": short(e.get("type", "invalid"), MAX_LOC), "loc": _loc(e.get("loc")),
                        "msg": _message(e)} for e in errors[:MAX_ERRORS]]}
    if len(errors) > MAX_ERRORS:
        body["n_errors"] = len(errors)
    return body


async def invalid_request(request: Request, exc: RequestValidationError):
    """422 with short errors; a JSON list over its limit (POST /summary) is too large: 413."""
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "too_long" and tuple(e.get("loc", ()))[:1] == ("body",):
            where, ctx = ".".join(short(p, MAX_LOC) for p in map(str, e["loc"][1:])) or "body", e.get("ctx", {})
            n, cap = ctx.get("actual_length"), ctx.get("max_length")
            return JSONResponse({"detail": f"too many entries in {where}: " + (f"{n:,}" if n else "too many")
                                           + (f" (limit {cap:,} per request)" if cap else "")}, 413)
    return JSONResponse(validation_detail(errors), 422)


async def http_error(request: Request, exc: StarletteHTTPException):
    """An unparsable body (e.g. broken multipart) is 422, as documented; every detail is short."""
    if exc.status_code == 400:
        return JSONResponse({"detail": short(f"malformed request: {exc.detail}", MAX_DETAIL)}, 422)
    if isinstance(exc.detail, str) and len(exc.detail) > MAX_DETAIL:
        exc = StarletteHTTPException(exc.status_code, short(exc.detail, MAX_DETAIL), exc.headers)
    return await http_exception_handler(request, exc)
