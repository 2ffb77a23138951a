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

Nothing in the single-machine path imports this module; `import ray` happens only here.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from ..cells.predictor import Prediction, Predictor
from ..errors import MalariaDetectError, MissingFileError, UsageError
from ..imaging import IMAGE_EXTENSIONS, iter_image_paths

ADDRESS_HELP = ("local: start a Ray instance on this machine; auto: join the cluster this machine "
                "belongs to (ray start / KubeRay); ray://HOST:PORT: a remote cluster (Ray Client)")
TASK_RETRIES = 3          # a batch whose worker died is retried this many times, then run file by file
LOST = "the Ray worker processing this file died repeatedly (out of memory or a crash in a decoder)"
CELL_COLUMNS = ["idx", "path", "label", "p_parasitized", "ood", "ood_score", "error"]


class RayUnavailable(MalariaDetectError, RuntimeError):
    pass


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--ray needs the [scale] extra: pip install 'malaria-detect[scale]' ({e})") from None
    return ray


# ---------------------------------------------------------------- cluster

def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join or start Ray. -> True when this call started it (and so should shut it down).
    A Ray already initialized in this process (a test, a notebook) is used as it is."""
    if address not in ("local", "auto") and not address.startswith("ray://"):
        raise UsageError(f"--ray {address!r}: use local, auto or ray://HOST:PORT")
    if num_cpus is not None and num_cpus < 1:
        raise UsageError(f"--ray-cpus must be at least 1, got {num_cpus}")
    ray = _ray()
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="warning")
    elif num_cpus:
        raise UsageError("--ray-cpus sets the CPUs of --ray local only: a cluster has its own")
    else:
        ray.init(address=address, log_to_driver=False, logging_level="warning")
    return True


# ---------------------------------------------------------------- listing

def _is_uri(s) -> bool:
    return isinstance(s, str) and "://" in s


def list_sources(paths: Iterable) -> tuple[list[dict], list]:
    """Inputs -> (one {"name", "fs", "path"} per file in the single-process order, filesystems).

    Local paths: exactly `iter_image_paths` (files as given, folders recursively, sorted); "fs" is
    -1 and the Predictor reads the path itself, as in the single-process path. URIs: resolved once
    per argument by pyarrow (credentials come from the usual environment of each worker); folders
    are listed recursively, image extensions only, sorted by path; "fs" indexes the filesystems."""
    from pyarrow import fs as pafs

    rows, filesystems = [], []
    for p in paths:
        if not _is_uri(p):
            rows += [{"name": str(q), "fs": -1, "path": str(q)} for q in iter_image_paths([p])]
            continue
        fs, root = pafs.FileSystem.from_uri(p)
        filesystems.append(fs)
        k = len(filesystems) - 1
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            rows.append({"name": p, "fs": k, "path": root})  # a missing file is reported in its row
            continue
        base, _, query = p.partition("?")
        base, root = base.rstrip("/"), root.rstrip("/")
        found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in IMAGE_EXTENSIONS)
        rows += [{"name": base + f[len(root):] + (f"?{query}" if query else ""), "fs": k, "path": f} for f in found]
    for i, r in enumerate(rows):
        r["idx"] = i
    return rows, filesystems


def _read_all(batch_fs, batch_path, filesystems, threads: int = 8) -> list:
    """Per file: the local path as it is, the bytes of a URI, or an Exception (its error row)."""
    def one(k, path):
        if k < 0:
            return path
        try:
            with filesystems[k].open_input_stream(path) as f:
                return f.read()
        except Exception as e:  # noqa: BLE001 - a missing or unreadable object is this file's error
            return e

    pairs = list(zip((int(k) for k in batch_fs), (str(p) for p in batch_path)))
    if all(k < 0 for k, _ in pairs):
        return [p for _, p in pairs]
    with ThreadPoolExecutor(threads) as ex:  # object stores answer slowly but in parallel
        return list(ex.map(lambda kp: one(*kp), pairs))


def _read_error(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    return f"cannot read file: {e or type(e).__name__}"


# ---------------------------------------------------------------- workers

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
        sources = _read_all(batch["fs"], batch["path"], self.filesystems)
        return self.run(batch, sources)


class CellWorker(_Worker):
    def run(self, batch, sources):
        import pyarrow as pa

        names = [str(n) for n in batch["name"]]
        ok = [i for i, s in enumerate(sources) if not isinstance(s, Exception)]
        got = self.pred.predict([sources[i] for i in ok], names=[names[i] for i in ok],
                                batch_size=self.opts["batch_size"], tta=self.opts["tta"], workers=1)
        preds = [Prediction(n, error=_read_error(s)) if isinstance(s, Exception) else None
                 for n, s in zip(names, sources)]
        for i, r in zip(ok, got):
            preds[i] = r
        return pa.Table.from_pylist([_cell_row(int(i), r) for i, r in zip(batch["idx"], preds)], cell_schema())


def cell_schema():
    import pyarrow as pa

    return pa.schema([("idx", pa.int64()), ("path", pa.string()), ("label", pa.string()),
                      ("p_parasitized", pa.float64()), ("ood", pa.bool_()), ("ood_score", pa.float64()),
                      ("error", pa.string())])


def _cell_row(idx: int, r: Prediction) -> dict:
    return {"idx": idx, "path": r.source, "label": r.label, "p_parasitized": r.p_parasitized, "ood": r.ood,
            "ood_score": r.ood_score, "error": r.error}


class FieldWorker(_Worker):
    def run(self, batch, sources):
        import pyarrow as pa

        from ..fields.analysis import SmearOptions, analyze_field, failed_field

        opts = SmearOptions(**self.opts["smear"])
        recs = [failed_field(name, _read_error(src), opts) if isinstance(src, Exception)
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


# ---------------------------------------------------------------- the pipeline

def _run(rows: list[dict], worker, ctor: dict, *, batch_size: int, actors: int | None, cpus_per_actor: int,
         parquet: str | None, progress: bool, retries: int = TASK_RETRIES,
         one_at_a_time: bool = False) -> dict[int, dict]:
    """rows -> Ray Data -> actor pool -> {idx: output row}. Rows of a batch whose worker died
    `retries` + 1 times are absent: `_complete` runs them again, one file at a time."""
    ray = _ray()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start", "max_errored_blocks")}
    ctx.enable_progress_bars = ctx.print_on_execution_start = progress
    ctx.max_errored_blocks = -1  # a batch that failed all its retries is left out here, not the whole run
    try:
        return _execute(ray, rows, worker, ctor, batch_size, actors, cpus_per_actor, parquet, retries, one_at_a_time)
    finally:
        for k, v in saved.items():  # this process's Ray Data settings as they were
            setattr(ctx, k, v)


def _execute(ray, rows, worker, ctor, batch_size, actors, cpus_per_actor, parquet, retries, one_at_a_time):
    from ray.data import ActorPoolStrategy

    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
    actors = max(1, min(actors, -(-len(rows) // batch_size)))  # no idle actors on small inputs
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * actors)))
    # one_at_a_time: an actor holds one task, so a dying worker takes no queued neighbour with it
    pool = ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1 if one_at_a_time else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # retries are set as remote args, deprecated (see _retries)
        ds = ds.map_batches(worker, batch_size=batch_size, batch_format="numpy",
                            compute=pool, num_cpus=cpus_per_actor,
                            fn_constructor_kwargs={**ctor, "threads": cpus_per_actor}, **_retries(ray, retries))
    if parquet:
        ds = ds.materialize()  # computed once: written by the workers, then read back here
        ds.write_parquet(parquet)
    out = {}
    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in t.to_pylist():
            out[r["idx"]] = r
    return out


def _retries(ray, retries: int) -> dict:
    """A dead worker's actor is restarted (always) and its batch retried `retries` times, not
    forever as by Ray Data's default: a file that kills its worker every time must not stop the run.
    Ray 2.60 takes these only as (deprecated) remote args; a Ray without them keeps its defaults."""
    import inspect

    params = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"max_restarts": -1, "max_task_retries": retries}
    return {}


def _complete(rows, out, worker, ctor, run_kw, lost_row: Callable[[dict], dict], schema) -> list[dict]:
    """Every input gets its row, in input order: rows missing from `out` are run again one file per
    batch, so one bad file cannot take its neighbours with it; a file still missing gets `lost_row`.
    With Parquet, these rows are appended to the same folder."""
    missing = [r for r in rows if r["idx"] not in out]
    if not missing:
        return [out[r["idx"]] for r in rows]
    again = _run(missing, worker, ctor, **{**run_kw, "batch_size": 1, "parquet": None, "one_at_a_time": True})
    again = {r["idx"]: again.get(r["idx"]) or lost_row(r) for r in missing}
    if run_kw.get("parquet"):
        import pyarrow as pa

        _ray().data.from_arrow(pa.Table.from_pylist(list(again.values()), schema)).write_parquet(run_kw["parquet"])
    out.update(again)
    return [out[r["idx"]] for r in rows]


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
        out = _run(rows, CellWorker, ctor, **run_kw)
        done = _complete(rows, out, CellWorker, ctor, run_kw,
                         lambda r: _cell_row(r["idx"], Prediction(r["name"], error=LOST)), cell_schema())
    finally:
        if started:
            _ray().shutdown()
    return [Prediction(r["path"], r["label"], r["p_parasitized"], r["ood"], r["ood_score"], r["error"])
            for r in done]


def analyze_fields_ray(paths: Iterable, *, address: str = "local", model=None, opts=None, actors: int | None = None,
                       cpus_per_actor: int = 1, num_cpus: int | None = None, parquet: str | None = None,
                       progress: bool = True, retries: int = TASK_RETRIES, _fault_hook=None) -> dict:
    """Whole fields on Ray, one field per task, `fields.analysis.analyze_field` on each -> the same dict as
    `fields.analysis.analyze_fields`: {"fields": [...], "summary": {...}, "model": {...}}. Parquet: one row
    per field (counts as columns, the whole record with its cells as JSON)."""
    from ..counting import summarize
    from ..fields.analysis import SmearOptions, analyze_fields, failed_field

    opts = opts or SmearOptions()
    rows, pred, ctor, started = _prepare(paths, model, address, num_cpus)
    ctor |= {"fault_hook": _fault_hook, "smear": asdict(opts)}
    try:
        run_kw = dict(batch_size=1, actors=actors, cpus_per_actor=cpus_per_actor, parquet=parquet,
                      progress=progress, retries=retries)
        out = _run(rows, FieldWorker, ctor, **run_kw)
        lost = lambda r: _field_row(r["idx"], failed_field(r["name"], LOST, opts))  # noqa: E731
        fields = [json.loads(r["json"]) for r in _complete(rows, out, FieldWorker, ctor, run_kw, lost,
                                                           field_schema())]
    finally:
        if started:
            _ray().shutdown()
    model_entry = analyze_fields(pred, [], opts)["model"]  # the smear report's own, whatever it holds
    return {"fields": fields, "summary": summarize(fields, opts.rbc_per_ul), "model": model_entry}
