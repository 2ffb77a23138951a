"""Uploads, the same way for every route: the request body capped as it streams and given a deadline
(UploadLimit), one reader for multipart image files (read_uploads: the count, the bytes per file and the type rule of
POST /predict and POST /smear) and giving decode buffers back to the OS after large images."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from ..imaging import IMAGE_EXTENSIONS
from .errors import short

IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/tiff", "image/bmp", "image/x-ms-bmp",
               "image/jpg", "image/x-png"}


def supported(f: UploadFile) -> bool:
    """An image type the server reads: by its content type, or by its file name when the browser sent none."""
    ctype = (f.content_type or "").split(";")[0].strip().lower()
    ext = Path(f.filename or "").suffix.lower()
    return ctype in IMAGE_TYPES or (ctype in ("", "application/octet-stream") and ext in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Upload:
    """One uploaded file, at its upload position: its bytes, or why it is not read (`error`)."""

    name: str
    data: bytes = b""
    error: str | None = None


async def read_uploads(files: list[UploadFile], *, max_files: int, max_bytes: int, what: str = "files",
                       unnamed: str = "file", formats: str = "png, jpg, webp, tif or bmp") -> list[Upload]:
    """Read each file up to its byte limit, one Upload per file in upload order (never matched by name).

    Whole-request errors: more than `max_files` files (413 'too many {what}'), a file over `max_bytes`
    (413 naming the file) and no file of a supported type (415). A file of another type gets its own
    `error` and the others are still answered."""
    if len(files) > max_files:
        raise HTTPException(413, f"too many {what}: {len(files)} (limit {max_files} per request)")
    if not any(supported(f) for f in files):
        kinds = sorted({short(f.content_type or "unknown", 60) for f in files})
        more = f" and {len(kinds) - 3} more" if len(kinds) > 3 else ""
        raise HTTPException(415, f"unsupported file type ({', '.join(kinds[:3])}{more}); send {formats} images")
    out = []
    for i, f in enumerate(files):
        name = f.filename or f"{unnamed}{i}"
        data = await f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{short(name, 120)}: file too large (limit {max_bytes:,} bytes)")
        out.append(Upload(name, data) if supported(f) else
                   Upload(name, error=f"unsupported file type {short(f.content_type, 60)!r}"))
    return out


class _Refused(HTTPException):
    """413 (over the cap) or 408 (too slow), raised from inside the body read."""

    def __init__(self, detail: str, status: int = 413, headers: dict | None = None):
        super().__init__(status, detail, headers)


class UploadLimit:
    """Pure ASGI middleware: a request body over `max_bytes` (or over `per_path[path]` for those paths)
    gets 413. The bytes are counted as they arrive, so a chunked upload (no Content-Length) is stopped
    at the cap instead of being read, and spooled to disk, whole; a declared Content-Length over the
    cap is refused before reading. A body that has not all arrived `body_timeout` seconds after the
    request began (a client that stalls or trickles) gets 408 and the connection is closed."""

    def __init__(self, app, max_bytes: int, per_path: dict[str, int] | None = None,
                 body_timeout: float | None = None):
        self.app, self.max_bytes, self.per_path, self.body_timeout = app, max_bytes, per_path or {}, body_timeout

    def _cap(self, scope) -> int:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return self.per_path.get(path, self.max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self._cap(scope)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > cap:
            msg = f"upload too large: {int(length):,} bytes (limit {cap:,} per request)"
            return await JSONResponse({"detail": msg}, 413)(scope, receive, send)
        seen, started, done = 0, False, False
        deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout

        async def counting_receive():
            nonlocal seen, done
            if done or deadline is None:  # after the body: e.g. waiting for http.disconnect, no deadline
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise _Refused(f"request timeout: the body took more than {self.body_timeout:g} s",
                                    408, {"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > cap:
                    raise _Refused(f"upload too large: over {cap:,} bytes per request")
            else:
                done = True
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _Refused as e:  # normally answered by the app's HTTPException handler already
            if started:
                raise
            await JSONResponse({"detail": e.detail}, e.status_code, e.headers)(scope, receive, send)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if os.name == "posix" else None


def trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc keeps it otherwise, so the decode buffers of
    one request of large images would stay resident after it."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
