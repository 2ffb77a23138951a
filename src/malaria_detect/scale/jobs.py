"""Beyond one machine: batch screening on a Ray cluster (the optional `[scale]` extra).

    malaria-detect predict cells/ --csv out.csv --ray local          # a local Ray instance
    malaria-detect predict s3://bucket/cells/ --csv out.csv --ray auto   # the cluster this node is in

    from malaria_detect.scale import predict_ray
    results = predict_ray(["cells/"], address="local")   # list[Prediction], in the input order

The same Predictor as the single-process path, on shards of files:

    driver   list the files (local paths as `predict` lists them; URIs through pyarrow's filesystems:
             s3://, gs://, abfs://, hdfs://, file://) ─► a Ray Data dataset of (index, name, path)
    actors   a pool, one ONNX Runtime session each: read the batch's files ─► Predictor.predict
             (decode, network, temperature, threshold, not-a-cell score) ─► one row per file; a file
             that cannot be read or decoded gets its error row
    driver   rows back in the input order ─► the CLI's CSV and summary; Parquet (--parquet DIR) is
             written by the workers themselves

Listing happens on the driver, as Ray Data's own file readers do it; the bytes are read inside
the Ray Data workers, one try per file, so one bad file never fails its batch (Ray Data's
`read_binary_files` would fail the whole dataset on an unreadable file). A worker that dies is
restarted by Ray and its batch retried; a batch that still fails after the retries is run again
one file at a time, and a file that keeps failing gets an error row: every input has its row.

Nothing in the single-machine path imports this package; `import ray` happens only in cluster.py.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from ..cells.predictor import Prediction, Predictor
from ..errors import MissingFileError
from .cluster import TASK_RETRIES, complete, connect, list_sources, ray_module, read_all, read_error, run_pool

LOST = "the Ray worker processing this file died repeatedly (out of memory or a crash in a decoder)"



def _load_predictor(model_blob: bytes | None, model_name: str | None, threads: int) -> Predictor:
    """The bundled model (each node has the package), or the driver's model file shipped as bytes
    (verified again here by Predictor.load, under its own name)."""
    if model_blob is None:
        return Predictor.load(None, threads=threads)
    with tempfile.TemporaryDirectory(prefix="malaria-detect-") as d:
        path = Path(d) / (model_name or "model.onnx")
        path.write_bytes(model_blob)
        return Predictor.load(path, threads=threads)


class _Worker:
    """One actor: one ONNX Runtime session, `threads` threads (the CPUs Ray gave it)."""

    def __init__(self, model_blob, model_name, filesystems, threads, fault_hook=None, **opts):
        self.pred = _load_predictor(model_blob, model_name, threads)
        self.filesystems, self.fault_hook, self.opts = filesystems, fault_hook, opts

    def __call__(self, batch):
        if self.fault_hook:  # tests only: simulates a worker that dies
            self.fault_hook([str(n) for n in batch["name"]])
        sources = read_all(batch["fs"], batch["path"], self.filesystems)
        return self.run(batch, sources)


class CellWorker(_Worker):
    def run(self, batch, sources):
        import pyarrow as pa

        names = [str(n) for n in batch["name"]]
        ok = [i for i, s in enumerate(sources) if not isinstance(s, Exception)]
        got = self.pred.predict([sources[i] for i in ok], names=[names[i] for i in ok],
                                batch_size=self.opts["batch_size"], tta=self.opts["tta"], workers=1)
        preds = [Prediction(n, error=read_error(s)) if isinstance(s, Exception) else None
                 for n, s in zip(names, sources)]
        for i, r in zip(ok, got):
            preds[i] = r
        return pa.Table.from_pylist([_cell_row(int(i), r) for i, r in zip(batch["idx"], preds)], cell_schema())


def cell_schema():
    import pyarrow as pa

    return pa.schema([("idx", pa.int64()), ("path", pa.string()), ("label", pa.string()),
                      ("p_parasitized", pa.float64()), ("ood", pa.bool_()), ("ood_score", pa.float64()),
                      ("kind", pa.string()), ("stage", pa.string()), ("p_stage", pa.float64()),
                      ("error", pa.string())])


def _cell_row(idx: int, r: Prediction) -> dict:
    return {"idx": idx, "path": r.source, "label": r.label, "p_parasitized": r.p_parasitized, "ood": r.ood,
            "ood_score": r.ood_score, "kind": r.kind, "stage": r.stage, "p_stage": r.p_stage, "error": r.error}


class FieldWorker(_Worker):
    def run(self, batch, sources):
        import pyarrow as pa

        from ..fields.analysis import SmearOptions, analyze_field, failed_field

        opts = SmearOptions(**self.opts["smear"])
        recs = [failed_field(name, read_error(src), opts) if isinstance(src, Exception)
                else analyze_field(self.pred, src, name, opts)
                for name, src in zip((str(n) for n in batch["name"]), sources)]
        return pa.Table.from_pylist([_field_row(int(i), r) for i, r in zip(batch["idx"], recs)], field_schema())


def field_schema():
    import pyarrow as pa

    return pa.schema([("idx", pa.int64()), ("image", pa.string()), ("n_cells", pa.int64()),
                      ("n_parasitized", pa.int64()), ("parasitemia", pa.float64()), ("error", pa.string()),
                      ("json", pa.string())])


def _field_row(idx: int, rec: dict) -> dict:
    """A field's Parquet row: its counts as columns, the whole record (cells, boxes) as JSON."""
    return {"idx": idx, "image": rec["image"], "n_cells": rec["n_cells"], "n_parasitized": rec["n_parasitized"],
            "parasitemia": rec["parasitemia"], "error": rec.get("error"),
            "json": json.dumps(rec, default=_jsonable)}


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _model_ctor(model) -> tuple[Predictor, dict]:
    """Load the model here first (a bad model fails before any cluster work), then ship it."""
    pred = Predictor.load(model)
    if model is None:
        return pred, {"model_blob": None, "model_name": None}
    return pred, {"model_blob": Path(pred.path).read_bytes(), "model_name": Path(pred.path).name}


def _prepare(paths, model, address, num_cpus):
    rows, filesystems = list_sources(paths)
    if not rows:
        raise MissingFileError("no images found in " + " ".join(map(str, paths)))
    if address.startswith("ray://") and any(r["fs"] < 0 for r in rows):
        warnings.warn("local paths on a remote cluster: its workers must see them at the same path (a shared "
                      "filesystem); otherwise give object-store URIs (s3://...)", stacklevel=2)
    pred, ctor = _model_ctor(model)
    return rows, pred, ctor | {"filesystems": filesystems}, connect(address, num_cpus)


def predict_ray(paths: Iterable, *, address: str = "local", model=None, batch_size: int = 64, tta: bool = False,
                actors: int | None = None, cpus_per_actor: int = 1, num_cpus: int | None = None,
                parquet: str | None = None, progress: bool = True, retries: int = TASK_RETRIES,
                _fault_hook=None) -> list[Prediction]:
    """Predict every image in `paths` (files, folders, URIs) on Ray -> Predictions in input order:
    the same rows as `Predictor.predict` on the same files. `actors`: pool size (default: one per
    `cpus_per_actor` CPUs of the cluster). `num_cpus`: CPUs of a `local` instance (default: all).
    `parquet`: also write the rows (plus `idx`, the input order, and `ood_score`) as Parquet files
    into this folder or URI, from the workers. `retries`: times a batch whose worker died is tried
    again before its files are run one by one. `_fault_hook(names)`: tests only, runs in the worker."""
    rows, _, ctor, started = _prepare(paths, model, address, num_cpus)
    ctor |= {"fault_hook": _fault_hook, "batch_size": batch_size, "tta": tta}
    try:
        run_kw = dict(batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor, parquet=parquet,
                      progress=progress, retries=retries)
        out = run_pool(rows, CellWorker, ctor, **run_kw)
        done = complete(rows, out, CellWorker, ctor, run_kw,
                         lambda r: _cell_row(r["idx"], Prediction(r["name"], error=LOST)), cell_schema())
    finally:
        if started:
            ray_module().shutdown()
    return [Prediction(r["path"], r["label"], r["p_parasitized"], r["ood"], r["ood_score"], r["error"],
                       kind=r.get("kind"), stage=r.get("stage"), p_stage=r.get("p_stage")) for r in done]


def analyze_fields_ray(paths: Iterable, *, address: str = "local", model=None, opts=None, actors: int | None = None,
                       cpus_per_actor: int = 1, num_cpus: int | None = None, parquet: str | None = None,
                       progress: bool = True, retries: int = TASK_RETRIES, _fault_hook=None) -> dict:
    """Whole fields on Ray, one field per task, `fields.analysis.analyze_field` on each -> the same dict as
    `fields.analysis.analyze_fields`: {"fields": [...], "summary": {...}, "model": {...}}. Parquet: one row
    per field (counts as columns, the whole record with its cells as JSON)."""
    from ..fields.analysis import SmearOptions, failed_field, report_of
    from ..imaging import sample_names

    opts = opts or SmearOptions()
    paths = list(paths)
    names = sample_names(paths) if opts.sample is None else {}
    rows, pred, ctor, started = _prepare(paths, model, address, num_cpus)
    ctor |= {"fault_hook": _fault_hook, "smear": asdict(opts)}
    try:
        run_kw = dict(batch_size=1, actors=actors, cpus_per_actor=cpus_per_actor, parquet=parquet,
                      progress=progress, retries=retries)
        out = run_pool(rows, FieldWorker, ctor, **run_kw)
        lost = lambda r: _field_row(r["idx"], failed_field(r["name"], LOST, opts))  # noqa: E731
        fields = [json.loads(r["json"]) for r in complete(rows, out, FieldWorker, ctor, run_kw, lost,
                                                           field_schema())]
    finally:
        if started:
            ray_module().shutdown()
    for f in fields:  # the same sample as a local run gives
        f["sample"] = opts.sample if opts.sample is not None else names.get(f["image"], Path(f["image"]).parent.name)
    return report_of(pred, fields, opts)
