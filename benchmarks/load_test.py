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
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="server process id, for peak memory")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--heatmaps", choices=["on", "off"], default="on")
    ap.add_argument("--case", choices=["cell", "big"], default="cell",
                    help="cell: many small requests (default); big: one request of 64 huge solid PNGs")
    a = ap.parse_args()
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
