"""Ray itself, for the jobs of jobs.py: joining or starting a cluster, listing inputs (local paths and
URIs), reading their bytes inside the workers, and running an actor pool over rows with retries so
that every input gets its row. `import ray` happens only here."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import MalariaDetectError, UsageError
from ..imaging import IMAGE_EXTENSIONS, iter_image_paths

ADDRESS_HELP = ("local: start a Ray instance on this machine; auto: join the cluster this machine "
                "belongs to (ray start / KubeRay); ray://HOST:PORT: a remote cluster (Ray Client)")

TASK_RETRIES = 3          # a batch whose worker died is retried this many times, then run file by file


class RayUnavailable(MalariaDetectError, RuntimeError):
    pass


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--ray needs the [scale] extra: pip install 'malaria-detect[scale]' ({e})") from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join or start Ray. -> True when this call started it (and so should shut it down).
    A Ray already initialized in this process (a test, a notebook) is used as it is."""
    if address not in ("local", "auto") and not address.startswith("ray://"):
        raise UsageError(f"--ray {address!r}: use local, auto or ray://HOST:PORT")
    if num_cpus is not None and num_cpus < 1:
        raise UsageError(f"--ray-cpus must be at least 1, got {num_cpus}")
    ray = ray_module()
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


def read_all(batch_fs, batch_path, filesystems, threads: int = 8) -> list:
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


def read_error(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    return f"cannot read file: {e or type(e).__name__}"


def run_pool(rows: list[dict], worker, ctor: dict, *, batch_size: int, actors: int | None, cpus_per_actor: int,
         parquet: str | None, progress: bool, retries: int = TASK_RETRIES,
         one_at_a_time: bool = False) -> dict[int, dict]:
    """rows -> Ray Data -> actor pool -> {idx: output row}. Rows of a batch whose worker died
    `retries` + 1 times are absent: `complete` runs them again, one file at a time."""
    ray = ray_module()
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


def complete(rows, out, worker, ctor, run_kw, lost_row: Callable[[dict], dict], schema) -> list[dict]:
    """Every input gets its row, in input order: rows missing from `out` are run again one file per
    batch, so one bad file cannot take its neighbours with it; a file still missing gets `lost_row`.
    With Parquet, these rows are appended to the same folder."""
    missing = [r for r in rows if r["idx"] not in out]
    if not missing:
        return [out[r["idx"]] for r in rows]
    again = run_pool(missing, worker, ctor, **{**run_kw, "batch_size": 1, "parquet": None, "one_at_a_time": True})
    again = {r["idx"]: again.get(r["idx"]) or lost_row(r) for r in missing}
    if run_kw.get("parquet"):
        import pyarrow as pa

        table = pa.Table.from_pylist(list(again.values()), schema)
        ray_module().data.from_arrow(table).write_parquet(run_kw["parquet"])
    out.update(again)
    return [out[r["idx"]] for r in rows]
