"""Load test of the web API: C concurrent clients x R requests of one sample cell each.

    .venv/bin/python benchmarks/load_test.py                 # starts its own server on 127.0.0.1
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --pid PID

Reports p50/p95/max latency, errors, throughput and the server's peak resident memory (VmHWM).
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


def _multipart(name: str, blob: bytes, ctype: str) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + blob + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="server process id, for peak memory")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--heatmaps", choices=["on", "off"], default="on")
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
    peak = _peak_rss_mb(a.pid) if a.pid else None
    print(f"| {a.clients} clients x {a.requests} | {len(lat)} | {errors} | {np.percentile(lat, 50):.1f} | "
          f"{np.percentile(lat, 95):.1f} | {lat.max():.1f} | {len(lat) / wall:.0f} | "
          f"{'' if peak is None else f'{peak:.0f}'} |")
    if proc:
        proc.terminate()
        proc.wait(10)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
