"""`malaria-detect benchmark`: latency and throughput on this CPU for ONNX fp32, ONNX int8 and
PyTorch eager, side by side in one run, with each one's accuracy on the labelled sample."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from .. import data as D
from ..evaluation import metrics as M

_PACKAGE = Path(__file__).resolve().parents[1]
REPO_SAMPLE = _PACKAGE.parents[1] / "samples"          # a source checkout: 221 test-patient cells, 4 fields
PACKAGED_SAMPLE = _PACKAGE / "assets" / "sample"       # any install: 24 of those cells
PAGE_FIELDS = _PACKAGE / "serve" / "static"            # any install: the page's two example fields


def default_sample() -> Path:
    """The labelled cells the benchmark scores: the repository's samples/ in a source checkout, else
    the small sample installed with the package (cells of the same test patients)."""
    return REPO_SAMPLE if (REPO_SAMPLE / "Parasitized").is_dir() else PACKAGED_SAMPLE


def sample_fields() -> list[Path]:
    """Whole fields for the field rows: samples/fields in a source checkout, else the page's examples."""
    if (REPO_SAMPLE / "fields").is_dir():
        return sorted((REPO_SAMPLE / "fields").glob("*.JPG"))
    return sorted(PAGE_FIELDS.glob("field-*.jpg"))


def _latency(fn, x1, n=200, warmup=20):
    for _ in range(warmup):
        fn(x1)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x1)
        ts.append(time.perf_counter() - t)
    return float(np.percentile(ts, 50) * 1e3), float(np.percentile(ts, 95) * 1e3)


def _throughput(fn, x, batch=64, min_seconds=3.0):
    fn(x[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        for i in range(0, len(x), batch):
            fn(x[i:i + batch])
            n += len(x[i:i + batch])
    return n / (time.perf_counter() - t0)


def run_benchmark(model=None, int8_model=None, checkpoint=None, sample=None, n_latency: int = 200) -> dict:
    from ..cells.predictor import Predictor
    from ..modelfile import bundled_field_model_path, bundled_model_path

    sample = Path(sample) if sample else default_sample()
    items = D.find_images(sample)
    fp32 = Predictor.load(model)
    rec = fp32.record
    x, y, kept, _ = D.load_arrays(items, rec.input_size, use_cache=False, progress=False)
    engines = {"onnx fp32": fp32}
    int8_path = Path(int8_model) if int8_model else bundled_model_path().with_name("malaria_lite0_int8.onnx")
    if int8_path.exists():
        engines["onnx int8"] = Predictor.load(int8_path)
    rows = []
    for name, pred in engines.items():
        p = pred.record.probability(pred.run(x)[0])
        acc = M.binary_metrics(y, p, pred.record.threshold)["accuracy"]
        p50, p95 = _latency(pred.run, x[:1], n_latency)
        thr = _throughput(pred.run, x)
        t = time.perf_counter()
        pred.predict([it.path for it in kept], workers=2)
        e2e = len(kept) / (time.perf_counter() - t)
        rows.append({"engine": name, "file": pred.path.name, "size_mb": round(pred.path.stat().st_size / 2**20, 2),
                     "accuracy_sample": acc, "latency_p50_ms": p50, "latency_p95_ms": p95,
                     "throughput_cells_s": thr, "end_to_end_files_cells_s": e2e})
    ckpt = checkpoint or os.environ.get("MALARIA_DETECT_CHECKPOINT")
    try:
        import torch

        from ..imaging import normalize
        from ..training.checkpoint import load_checkpoint
        from ..training.models import ExportWrapper
    except ImportError:
        torch = None
    if torch is not None and ckpt and Path(ckpt).exists():
        model_t, rec_t, ood = load_checkpoint(ckpt)
        w = ExportWrapper(model_t, ood).eval()

        def run_t(a):
            with torch.inference_mode():
                return w(torch.from_numpy(normalize(a, rec_t)))

        z = np.concatenate([run_t(x[i:i + 128])[0].numpy() for i in range(0, len(x), 128)])
        acc = M.binary_metrics(y, rec_t.probability(z), rec_t.threshold)["accuracy"]
        p50, p95 = _latency(run_t, x[:1], n_latency)
        rows.append({"engine": "pytorch eager", "file": Path(ckpt).name,
                     "size_mb": round(Path(ckpt).stat().st_size / 2**20, 2), "accuracy_sample": acc,
                     "latency_p50_ms": p50, "latency_p95_ms": p95, "throughput_cells_s": _throughput(run_t, x),
                     "end_to_end_files_cells_s": None})
    notes = []
    if "onnx int8" not in engines:
        notes.append(f"no int8 row: {int8_path.name} does not exist (make one with export --int8; give --int8-model)")
    if not any(r["engine"] == "pytorch eager" for r in rows):
        notes.append("no PyTorch row: " + ("PyTorch is not installed" if torch is None else
                                           f"checkpoint {ckpt} not found" if ckpt else
                                           "no checkpoint given (--checkpoint runs/NAME/best.safetensors)"))
    # whole fields run on the whole-field model (the bundled anylab one unless --model names another)
    fields = field_speed({"onnx fp32": fp32 if model else Predictor.load(bundled_field_model_path())})
    if not fields:
        notes.append("no whole-field rows: no sample fields found")
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "input_size": rec.input_size, "n_sample": len(x), "sample": str(sample), "rows": rows,
            "fields": fields, "notes": notes}


def field_speed(engines: dict, folder: Path | None = None, repeat: int = 3) -> list[dict]:
    """Whole fields, end to end (image file -> JSON record: decode, find the objects, crop, classify,
    count), per engine, on the sample fields, side by side: the classical segmenter (the baseline) and
    the learned detector (the default); with the time spent finding the objects."""
    from ..fields.analysis import SmearOptions, _objects, analyze_field
    from ..imaging import FIELD_MAX_PIXELS, open_rgb

    paths = sorted(folder.glob("*.JPG")) if folder else sample_fields()
    if not paths:
        return []
    out = []
    for objects, opts in (("classical", SmearOptions(detector=None)), ("detector", SmearOptions())):
        rgbs = [np.asarray(open_rgb(p, FIELD_MAX_PIXELS, max_side=None)) for p in paths]
        _objects(rgbs[0], opts)  # warm-up (the detector's session)
        t = time.perf_counter()
        for _ in range(repeat):
            for rgb in rgbs:
                _objects(rgb, opts)
        find = (time.perf_counter() - t) / (repeat * len(paths))
        for name, pred in engines.items():
            analyze_field(pred, paths[0], opts=opts)  # warm-up
            t, n_cells = time.perf_counter(), 0
            for _ in range(repeat):
                for p in paths:
                    n_cells += analyze_field(pred, p, opts=opts)["n_cells"]
            dt = time.perf_counter() - t
            out.append({"engine": name, "objects": objects, "file": pred.path.name, "fields": len(paths),
                        "fields_s": repeat * len(paths) / dt, "cells_s": n_cells / dt, "segment_s_per_field": find,
                        "cells_per_field": n_cells / (repeat * len(paths))})
    return out


def format_benchmark(r: dict) -> str:
    lines = [f"{r['n_sample']} sample cell{'s' * (r['n_sample'] != 1)} at {r['input_size']}px on {r['machine']}",
             "| engine | model file | MB | accuracy (sample) | latency p50 ms | p95 ms | batch cells/s | "
             "files->CSV cells/s |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        e2e = row["end_to_end_files_cells_s"]
        lines.append(f"| {row['engine']} | {row['file']} | {row['size_mb']} | {row['accuracy_sample']:.4f} | "
                     f"{row['latency_p50_ms']:.2f} | {row['latency_p95_ms']:.2f} | {row['throughput_cells_s']:.0f} | "
                     f"{'' if e2e is None else f'{e2e:.0f}'} |")
    if r.get("fields"):
        f0 = r["fields"][0]
        lines += ["", f"whole fields ({f0['fields']} sample fields, ~{f0['cells_per_field']:.0f} cells each; "
                      "image file -> JSON record):",
                  "| engine | objects | model file | fields/s | red cells/s | finding the objects s/field |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {f['engine']} | {f.get('objects', 'classical')} | {f['file']} | {f['fields_s']:.2f} | "
                  f"{f['cells_s']:.0f} | {f['segment_s_per_field']:.3f} |"
                  for f in r["fields"]]
    lines += [f"note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)
