"""A bounded pool for whole-field work (POST /smear): `workers` threads analyse fields, at most `queue`
more fields wait for one, and a request that would go past that is answered 503 at once, with a
Retry-After from the recent time per field. A field in analysis holds ~300 MB (the decoded field, its
masks, its cell crops, the model's buffers): without a bound, 20 clients at once held 20 of them.

Slots are counted in fields (a request of k fields takes k), reserved before the upload is read and
given back when the work is over, even when the client has gone away meanwhile. PoolGate answers 503
before the body is read at all when the pool is already full."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import HTTPException
from fastapi.responses import JSONResponse


class Busy(HTTPException):
    """503: the pool is full; `Retry-After` says when to try again."""

    def __init__(self, detail: str, retry_after: int):
        super().__init__(503, detail, {"Retry-After": str(retry_after)})


class FieldPool:
    def __init__(self, workers: int, queue: int, seconds_per_field: float = 2.0):
        self.workers, self.queue, self.capacity = workers, queue, workers + queue
        self.pending = 0                      # fields running or waiting
        self.seconds_per_field = seconds_per_field
        self._lock = threading.Lock()
        self._ex: ThreadPoolExecutor | None = None

    def full(self) -> bool:
        return self.pending >= self.capacity

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the fields past the capacity, at the recent time per
        field shared by the workers; 1 to 300."""
        over = max(1, self.pending - self.capacity + 1)
        return max(1, min(300, math.ceil(over * self.seconds_per_field / self.workers)))

    def busy(self) -> Busy:
        s = self.retry_after()
        return Busy(f"busy: {self.pending} fields are being analysed or waiting (limit {self.capacity}: "
                    f"{self.workers} at a time, {self.queue} waiting); try again in {s} s", s)

    def reserve(self, n: int) -> None:
        """Take n slots or raise Busy. A request larger than the whole pool still runs when it is idle."""
        with self._lock:
            if self.pending and self.pending + n > self.capacity:
                raise self.busy()
            self.pending += n

    def release(self, n: int) -> None:
        with self._lock:
            self.pending -= n

    async def run(self, n: int, fn, *args):
        """fn(*args) on a worker thread; the n reserved slots are given back when it ends (or when it
        is dropped before it started)."""
        if self._ex is None:
            self._ex = ThreadPoolExecutor(self.workers, thread_name_prefix="field")

        def job():
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                per = (time.perf_counter() - t) / max(1, n)
                self.seconds_per_field = 0.8 * self.seconds_per_field + 0.2 * per
                self.release(n)

        fut = self._ex.submit(job)
        fut.add_done_callback(lambda f: f.cancelled() and self.release(n))
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=False, cancel_futures=True)
            self._ex = None


class PoolGate:
    """Pure ASGI middleware: a POST to `path` while `pool` is full gets 503 before its body is read."""

    def __init__(self, app, pool: FieldPool, path: str = "/smear"):
        self.app, self.pool, self.path = app, pool, path

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and self.pool.full():
            p, root = scope.get("path", ""), scope.get("root_path", "")
            if (p[len(root):] if root and p.startswith(root) else p) == self.path:
                b = self.pool.busy()
                return await JSONResponse({"detail": b.detail}, 503, b.headers)(scope, receive, send)
        await self.app(scope, receive, send)
