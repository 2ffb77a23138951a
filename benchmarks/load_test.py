"""Load test of the web API: C concurrent clients x R requests of one sample cell each.

    .venv/bin/python benchmarks/load_test.py                 # starts its own server on 127.0.0.1
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --pid PID
    .venv/bin/python benchmarks/load_test.py --case big      # one request of 64 huge-but-small PNGs

Reports p50/p95/max latency, errors, throughput and the server's peak resident memory (VmHWM).
`--case big` sends 64 copies of a ~55 KB solid 3999x4000 PNG in one request (a 3.6 MB upload that
decodes to 3 GB) and reports the request's seconds, the server's peak RSS, the answer's size and the
memory the server still holds afterwards. The server inherits this process's environment, so
MALARIA_DETECT_* settings apply (e.g. MALARIA_DETECT_MAX_PIXELS=16000000 to let the images through).
Only loopback addresses are used; the loop is bounded (clients x requests) and stops by itself.

Hardening 2 (issue 17), each case on a fresh server, `--old SRC` also on a server run from SRC (e.g.
a `git worktree add /tmp/old ffc7244` checkout's src/) in the same run, for a before/after table:

    .venv/bin/python benchmarks/load_test.py --case hardening2 --old /tmp/old/src

    strip     item 1: a 1 x 10,000 PNG (~100 bytes) on /predict: answer, seconds, memory
    diameter  item 2: /smear?cell_diameter=6 on a 2400 x 1800 field (PA171771 resized): seconds, memory, note
    burst     item 3: 20 concurrent clients, one field each on /smear?overlay=true (as the page sends it);
              a client answered 503 waits its Retry-After and tries again (at most 30 tries): p50/p95
              of each client's time to its answer, peak RSS and the RSS after 5 s idle
    nameless  item 4: 60 parts of 1 MiB (zero bytes) without a filename on /predict: the error body's size

A watchdog kills a server whose memory passes --max-rss-gb (default 12) and says so in the table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(pid: int, field: str = "VmHWM") -> float | None:
    """The server's peak (VmHWM) or current (VmRSS) resident memory in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _multipart_many(parts: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """(name, bytes, content type) of each file -> multipart body with field 'files', its content type."""
    b = uuid.uuid4().hex
    body = b"".join(f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: {ctype}\r\n\r\n".encode() + blob + b"\r\n" for name, blob, ctype in parts)
    return body + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def _multipart(name: str, blob: bytes, ctype: str) -> tuple[bytes, str]:
    return _multipart_many([(name, blob, ctype)])


def big_upload(u, pid: int | None, n: int = 64) -> int:
    """One request of n copies of a solid 3999x4000 PNG: seconds, peak/held RSS, answer size."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3999, 4000), (200, 120, 150)).save(buf, "PNG")
    png = buf.getvalue()
    body, ctype = _multipart_many([(f"field{i}.png", png, "image/png") for i in range(n)])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    cell = sorted((ROOT / "samples" / "Parasitized").iterdir())[0]
    warm, warm_type = _multipart(cell.name, cell.read_bytes(), "image/webp")
    conn.request("POST", "/predict", warm, {"Content-Type": warm_type})  # warm up: RSS before = a served cell
    conn.getresponse().read()
    rss0 = _rss_mb(pid, "VmRSS") if pid else None
    t = time.perf_counter()
    conn.request("POST", "/predict", body, {"Content-Type": ctype})
    r = conn.getresponse()
    data = r.read()
    secs = time.perf_counter() - t
    conn.close()
    time.sleep(1.0)
    answers = json.loads(data) if r.status == 200 else []
    n_err = sum(bool(a.get("error")) for a in answers)
    print(f"{n} x {len(png):,}-byte solid 3999x4000 PNG in one {len(body) / 1e6:.1f} MB request -> HTTP {r.status}")
    print("| seconds | server peak RSS MB | answer bytes | server RSS MB before -> after | answers with error |")
    print("|---|---|---|---|---|")
    fmt = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    print(f"| {secs:.1f} | {fmt(_rss_mb(pid) if pid else None)} | {len(data):,} | "
          f"{fmt(rss0)} -> {fmt(_rss_mb(pid, 'VmRSS') if pid else None)} | {n_err} of {len(answers)} |")
    return 0 if r.status == 200 else 1



# ---------------------------------------------------------------- hardening 2 (issue 17): items 1-4

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """`malaria-detect serve` on a free loopback port, from this checkout or from `src` (another
    checkout's src/ folder, put first on PYTHONPATH), with a watchdog on its memory."""

    def __init__(self, src: str | None = None, env: dict | None = None, max_rss_gb: float = 12.0):
        self.port = _free_port()
        env = dict(os.environ, **(env or {}))
        if src:
            env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen([sys.executable, "-m", "malaria_detect.cli", "serve", "--port", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid, self.killed, self.max_rss = self.proc.pid, None, max_rss_gb * 1024
        for _ in range(240):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server from {src or 'this checkout'} exited at start") from None
                time.sleep(0.25)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self._stop.wait(0.1):
            rss = _rss_mb(self.pid, "VmRSS")
            if rss is not None and rss > self.max_rss:
                self.killed = f"killed at {rss / 1024:.1f} GB"
                self.proc.kill()
                return

    def rss(self, field: str = "VmRSS") -> float | None:
        return _rss_mb(self.pid, field)

    def reset_peak(self) -> None:
        """Start VmHWM again from the current RSS (Linux: clear_refs 5), so 'peak' is the case's own."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def post(self, path: str, body: bytes, ctype: str, timeout: float = 300) -> tuple[int, bytes, float, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t = time.perf_counter()
        try:
            conn.request("POST", path, body, {"Content-Type": ctype})
            r = conn.getresponse()
            data = r.read()
            return r.status, data, time.perf_counter() - t, dict(r.getheaders())
        except (OSError, http.client.HTTPException) as e:
            return 0, repr(e).encode(), time.perf_counter() - t, {}
        finally:
            conn.close()

    def warm(self):
        """One sample cell on /predict and one small field on /smear: RSS 'before' is a server that has
        answered both (models loaded)."""
        cell = sorted((ROOT / "samples" / "Parasitized").iterdir())[0]
        self.post("/predict", *_multipart(cell.name, cell.read_bytes(), "image/webp"))
        self.post("/smear", *_multipart("f.jpg", _field_jpeg((640, 480)), "image/jpeg"))

    def close(self):
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


FIELD = ROOT / "samples" / "fields" / "PA171771.JPG"


def _field_jpeg(size: tuple[int, int] | None = None) -> bytes:
    """PA171771.JPG (1280 x 960), or resized to `size`, as JPEG bytes."""
    import io

    from PIL import Image

    if size is None:
        return FIELD.read_bytes()
    buf = io.BytesIO()
    Image.open(FIELD).convert("RGB").resize(size, Image.LANCZOS).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _mb(v) -> str:
    return "" if v is None else f"{v:,.0f}"


def case_strip(srv: Server) -> dict:
    """Item 1: a 1 x 10,000 PNG on /predict."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 10000), (180, 180, 180)).save(buf, "PNG")
    png = buf.getvalue()
    rss0 = srv.rss()
    status, data, secs, _ = srv.post("/predict", *_multipart("strip.png", png, "image/png"))
    time.sleep(1.0)
    try:
        a = json.loads(data)[0]
        what = (f"error: {a['error'][:70]}" if a.get("error") else
                f"label {a['label']}, heatmap {len(a.get('heatmap') or ''):,} chars")
    except (ValueError, LookupError, TypeError):
        what = data[:80].decode(errors="replace")
    return {"request": f"{len(png)}-byte 1x10000 PNG", "status": status, "seconds": f"{secs:.2f}",
            "answer": f"{len(data):,} B; {what}", "rss": (rss0, srv.rss("VmHWM"), srv.rss())}


def case_diameter(srv: Server) -> dict:
    """Item 2: /smear?cell_diameter=6 on a 2400 x 1800 field."""
    jpg = _field_jpeg((2400, 1800))
    rss0 = srv.rss()
    status, data, secs, _ = srv.post("/smear?cell_diameter=6", *_multipart("big.jpg", jpg, "image/jpeg"), timeout=600)
    time.sleep(1.0)
    try:
        f = json.loads(data)["fields"][0]
        what = f"{f['n_cells']} cells; note: {(f.get('note') or f.get('error') or '')[:90]}"
    except (ValueError, LookupError, TypeError):
        what = data[:80].decode(errors="replace")
    return {"request": f"{len(jpg) / 1e6:.1f} MB 2400x1800 JPEG", "status": status, "seconds": f"{secs:.1f}",
            "answer": what, "rss": (rss0, srv.rss("VmHWM"), srv.rss())}


def case_burst(srv: Server, clients: int = 20, tries: int = 30) -> dict:
    """Item 3: `clients` concurrent clients, one field each, retrying after a 503's Retry-After."""
    body, ctype = _multipart("field.jpg", _field_jpeg(), "image/jpeg")
    rss0 = srv.rss()
    start = threading.Barrier(clients)

    def client(_):
        start.wait()
        t, n503 = time.perf_counter(), 0
        for _ in range(tries):
            status, data, _, headers = srv.post("/smear?overlay=true", body, ctype)
            if status != 503:
                break
            n503 += 1
            time.sleep(min(30.0, float(headers.get("Retry-After") or headers.get("retry-after") or 1)))
        ok = status == 200 and "error" not in json.loads(data)["fields"][0]
        return time.perf_counter() - t, ok, n503

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    peak = srv.rss("VmHWM")
    time.sleep(5.0)
    lat = np.array([r[0] for r in res])
    n503 = sum(r[2] for r in res)
    return {"request": f"{clients} clients x 1 field", "status": f"{sum(r[1] for r in res)}/{clients} answered",
            "seconds": f"p50 {np.percentile(lat, 50):.1f}, p95 {np.percentile(lat, 95):.1f} (all {wall:.1f})",
            "answer": f"{n503} answers 503 (retried), {sum(r[2] > 0 for r in res)} clients told to wait",
            "rss": (rss0, peak, srv.rss())}


def case_nameless(srv: Server, n: int = 60, size: int = 2**20) -> dict:
    """Item 4: n parts of `size` zero bytes named 'files' but without a filename -> 422: the body's size.
    (A zero byte is 6 bytes in JSON, \\u0000: the old answer echoed each part back that way.)"""
    b = uuid.uuid4().hex
    part = f"--{b}\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\n".encode() + bytes(size) + b"\r\n"
    body = part * n + f"--{b}--\r\n".encode()
    rss0 = srv.rss()
    status, data, secs, _ = srv.post("/predict", body, f"multipart/form-data; boundary={b}")
    time.sleep(1.0)
    try:
        detail = json.loads(data)["detail"]
        first = detail if isinstance(detail, str) else detail[0].get("msg", "")
    except (ValueError, LookupError, TypeError):
        first = ""
    return {"request": f"{n} x {size / 2**20:.0f} MiB nameless parts ({len(body) / 2**20:.0f} MiB)", "status": status,
            "seconds": f"{secs:.2f}", "answer": f"{len(data):,} B error body; {first[:70]}",
            "rss": (rss0, srv.rss("VmHWM"), srv.rss())}


CASES = {"strip": ("1", case_strip), "diameter": ("2", case_diameter), "burst": ("3", case_burst),
         "nameless": ("4", case_nameless)}


def hardening2(names: list[str], old: str | None, max_rss_gb: float, clients: int) -> int:
    """Each case on a fresh server: the old code's (from `old`, if given) then this checkout's."""
    print("| item | case | server | HTTP | seconds | answer | server RSS MB: before -> peak -> after |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        item, fn = CASES[name]
        for label, src in ([("old", old)] if old else []) + [("new", None)]:
            srv = Server(src, max_rss_gb=max_rss_gb)
            try:
                srv.warm()
                time.sleep(1.0)
                srv.reset_peak()
                r = fn(srv, clients) if name == "burst" else fn(srv)
            finally:
                srv.close()
            b, p, a = r["rss"]
            mem = f"{_mb(b)} -> {_mb(p)} -> {_mb(a)}" + (f" ({srv.killed})" if srv.killed else "")
            print(f"| {item} | {r['request']} | {label} | {r['status']} | {r['seconds']} | {r['answer']} | {mem} |",
                  flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="server process id, for peak memory")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--heatmaps", choices=["on", "off"], default="on")
    ap.add_argument("--case", choices=["cell", "big", "hardening2", *CASES], default="cell",
                    help="cell: many small requests (default); big: one request of 64 huge solid PNGs; "
                         "hardening2: issue 17's cases (strip, diameter, burst, nameless), or one of them")
    ap.add_argument("--old", default=None, metavar="SRC",
                    help="hardening2 cases: also run each against a server from this src/ folder (the old code)")
    ap.add_argument("--max-rss-gb", type=float, default=12.0, help="hardening2: kill a server past this memory")
    ap.add_argument("--smear-clients", type=int, default=20, help="burst: concurrent /smear clients")
    a = ap.parse_args()
    if a.case in ("hardening2", *CASES):
        names = list(CASES) if a.case == "hardening2" else [a.case]
        sys.exit(hardening2(names, a.old, a.max_rss_gb, a.smear_clients))
    proc = None
    if a.url is None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = dict(os.environ, MALARIA_DETECT_HEATMAPS="1" if a.heatmaps == "on" else "0")
        proc = subprocess.Popen([sys.executable, "-m", "malaria_detect.cli", "serve", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a.url, a.pid = f"http://127.0.0.1:{port}", proc.pid
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                time.sleep(0.25)
    u = urlparse(a.url)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "load tests only target this machine"
    if a.case == "big":
        rc = big_upload(u, a.pid)
        if proc:
            proc.terminate()
            proc.wait(10)
        sys.exit(rc)
    cell = sorted((ROOT / "samples" / "Parasitized").iterdir())[0]
    body, ctype = _multipart(cell.name, cell.read_bytes(), "image/webp")

    def client(_):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        lat, errors = [], 0
        for _ in range(a.requests):
            t = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": ctype})
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200 and json.loads(data)[0]["label"] is not None
            except Exception:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            lat.append(time.perf_counter() - t)
            errors += not ok
        conn.close()
        return lat, errors

    # single-client latency first (the figure a technician feels), then the concurrent run
    single, _ = client(0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as ex:
        results = list(ex.map(client, range(a.clients)))
    wall = time.perf_counter() - t0
    lat = np.array([x for r, _ in results for x in r]) * 1e3
    errors = sum(e for _, e in results)
    single = np.array(single) * 1e3
    print(f"server {a.url}, heatmaps {a.heatmaps}, one {cell.stat().st_size}-byte cell per request")
    print("| load | requests | errors | p50 ms | p95 ms | max ms | requests/s | server peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 client sequential | {len(single)} | 0 | {np.percentile(single, 50):.1f} | "
          f"{np.percentile(single, 95):.1f} | {single.max():.1f} | {len(single) / single.sum() * 1e3:.0f} | |")
    peak = _rss_mb(a.pid) if a.pid else None
    print(f"| {a.clients} clients x {a.requests} | {len(lat)} | {errors} | {np.percentile(lat, 50):.1f} | "
          f"{np.percentile(lat, 95):.1f} | {lat.max():.1f} | {len(lat) / wall:.0f} | "
          f"{'' if peak is None else f'{peak:.0f}'} |")
    if proc:
        proc.terminate()
        proc.wait(10)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
