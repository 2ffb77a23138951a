"""Cells/s of `predict` in one process vs on Ray (`--ray local`), side by side in one run.

    nice -n 19 .venv/bin/python benchmarks/scale_predict.py [--repeat 4] [--cpus 2]

Inputs: the 221 sample cells (WebP files in samples/Parasitized and samples/Uninfected), listed
`--repeat` times. Rows:
  - single process: Predictor.predict (ONNX Runtime on all cores, 2 decoding threads), as `predict`
  - Ray, cold: predict_ray(address="local") including starting and stopping Ray, as `--ray local`
  - Ray, warm, N actors: a Ray already running; pool of N actors of 1 CPU each (N = 1 .. --cpus)
  - the two CLI commands end to end (`predict DIR --csv` vs `predict DIR --csv --ray local`)
The warm 1-actor row is the per-actor throughput that a cluster multiplies: the estimate printed
for one more node is (its CPUs) x (per-actor cells/s), an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from malaria_detect.cells.predictor import Predictor
from malaria_detect.imaging import iter_image_paths

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cli(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "malaria_detect.cli", "predict", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", default=str(ROOT / "samples"))
    ap.add_argument("--repeat", type=int, default=4, help="list the sample this many times")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-cli", action="store_true", help="skip the two end-to-end CLI rows")
    a = ap.parse_args()

    import ray

    from malaria_detect.scale import predict_ray

    folders = [str(Path(a.sample) / c) for c in ("Parasitized", "Uninfected")]
    paths = [str(p) for p in iter_image_paths(folders)] * a.repeat
    n = len(paths)
    rows = []
    pred = Predictor.load()
    pred.predict(paths[:64])  # warm-up: page cache, ONNX Runtime's first run
    single, t = timed(lambda: pred.predict(paths, batch_size=a.batch_size))
    rows.append(("single process (ONNX Runtime on all cores, 2 decoding threads)", t))

    kw = dict(batch_size=a.batch_size, progress=False)
    cold, t = timed(lambda: predict_ray(paths, address="local", num_cpus=a.cpus, **kw))
    rows.append((f"Ray local, cold: start + {a.cpus} actors + stop", t))
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        predict_ray(paths[:64], actors=a.cpus, **kw)  # warm-up: workers, imports
        per_actor = None
        for k in range(1, a.cpus + 1):
            got, t = timed(lambda k=k: predict_ray(paths, actors=k, **kw))
            rows.append((f"Ray local, warm: {k} actor{'s' * (k > 1)} x 1 CPU", t))
            per_actor = per_actor or n / t
    finally:
        ray.shutdown()
    worst = max(abs(x.p_parasitized - y.p_parasitized) for x, y in zip(single, got) if x.p_parasitized is not None)
    same = all(x.label == y.label and x.error == y.error for x, y in zip(single, got)) and \
        all(x.label == y.label for x, y in zip(single, cold))

    if not a.no_cli:
        with tempfile.TemporaryDirectory() as d:
            t1 = cli([*folders, "--csv", f"{d}/one.csv"])
            t2 = cli([*folders, "--csv", f"{d}/ray.csv", "--ray", "local", "--ray-cpus", str(a.cpus)])
            r1, r2 = (list(csv.DictReader(open(f"{d}/{x}.csv"))) for x in ("one", "ray"))
            same = same and [(r["path"], r["label"]) for r in r1] == [(r["path"], r["label"]) for r in r2]
        m = len(r1)
        cli_rows = [("CLI `predict samples --csv`", t1, m), ("CLI `predict samples --csv --ray local`", t2, m)]
    else:
        cli_rows = []

    print(f"\n{n} cells ({a.repeat} x the sample), batch {a.batch_size}, {os.cpu_count()} CPU cores; "
          f"same labels and errors: {same}; max |dp| {worst:.1e}\n")
    print("| path | seconds | cells/s |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {n / t:.0f} |")
    for name, t, m in cli_rows:
        print(f"| {name} ({m} cells, whole command) | {t:.2f} | {m / t:.0f} |")
    print(f"\nper-actor throughput (warm, 1 actor, 1 CPU): {per_actor:.0f} cells/s. Estimate, not measured: "
          f"each added node of C CPUs adds about C x {per_actor:.0f} cells/s (e.g. 16 CPUs: ~{16 * per_actor:.0f}/s), "
          "while the files are read from storage that keeps up and the driver (listing, CSV) is not the limit.")


if __name__ == "__main__":
    main()
