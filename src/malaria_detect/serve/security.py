"""Security headers on every answer (SecurityHeaders, pure ASGI, outermost: errors, static files and the
400 of a wrong Host header get them too), the page's Content-Security-Policy and the one of the API docs
(docs_csp: their inline script by its hash), and slow clients cut off (TimedH11Protocol: uvicorn's h11
protocol with a deadline for a request's headers; the body's deadline is UploadLimit's)."""

from __future__ import annotations

import base64
import hashlib
import re

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# The page: its own scripts and styles only (CSSOM .style changes are not inline styles); heatmaps are
# data: URLs, dropped files blob: URLs. Nothing may frame it, nothing leaves this origin.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")

HEADERS = {
    "content-security-policy": PAGE_CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
RAW_HEADERS = [(k.encode(), v.encode()) for k, v in HEADERS.items()]

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def docs_csp(html: str) -> str:
    """The CSP of a generated docs page (Swagger UI, ReDoc, the OAuth2 redirect): the page's, but its
    inline scripts allowed by their sha256, inline styles (ReDoc writes <style> elements; Swagger UI
    sets style attributes), data: images (Swagger UI's icons) and blob: workers (ReDoc's search)."""
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                      for s in _INLINE_SCRIPT.findall(html))
    return (f"default-src 'self'; script-src 'self' {hashes}".rstrip() + "; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    """Pure ASGI middleware: HEADERS on every HTTP answer, a header the app already set (a docs page's
    own CSP) kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [(k, v) for k, v in RAW_HEADERS if k not in have]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def timed_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers (`uvicorn.run(http=...)`)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(header_timeout)})


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a request's line and headers must all arrive within `header_timeout`
    seconds of the connection opening (or of the request's first byte on a kept-alive connection), else
    the connection is answered 408 and closed. uvicorn alone waits for ever: a client sending its headers
    a byte at a time (slowloris) holds the connection, and many of them the server. uvicorn's own 400 (an
    unparsable request) gets the security headers too."""

    header_timeout = 10.0
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for a request's line and headers
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is cut off
            msg = f"request timeout: the request's headers took more than {self.header_timeout:g} s\n".encode()
            head = [b"HTTP/1.1 408 Request Timeout", b"content-type: text/plain; charset=utf-8",
                    b"connection: close", b"content-length: %d" % len(msg)]
            self.transport.write(b"\r\n".join(head + [k + b": " + v for k, v in RAW_HEADERS]) + b"\r\n\r\n" + msg)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        event = h11.Response(status_code=400, reason=b"Bad Request", headers=[
            (b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"), *RAW_HEADERS])
        for e in (event, h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
            self.transport.write(self.conn.send(e))
        self.transport.close()
