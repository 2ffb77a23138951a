"""Option types and option groups shared by several commands, declared once."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields
from pathlib import Path

from ..modelfile import NAMES_HELP
from ..training.config import TrainConfig


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {x}")
    return x


def add_model(p, what: str = "ONNX model file", default: str = "anylab", checkpoints: bool = False) -> None:
    """--model: a file, or a bundled model by name (modelfile.BUNDLED_NAMES)."""
    if checkpoints:
        text = "model file (.onnx, or a training checkpoint .safetensors / run folder), " + NAMES_HELP + \
            "; default: the bundled model"
    else:
        text = f"{what}, {NAMES_HELP}; default: {default}"
    p.add_argument("--model", default=None, help=text)


def add_json_flag(p, text: str = "print one JSON object to stdout") -> None:
    p.add_argument("--json", action="store_true", help=text)


def add_ray(p, how: str, rows: str) -> None:
    """--ray, --ray-cpus, --parquet: the command on a Ray cluster (the scale package)."""
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help=f"run on Ray{how} (needs the [scale] extra): local (start one here), auto (the cluster "
                        "this machine is in) or ray://HOST:PORT; PATHs may then also be URIs (s3://, gs://, ...)")
    p.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N",
                   help="CPUs of a --ray local instance (default: all)")
    p.add_argument("--parquet", default=None, metavar="DIR",
                   help=f"with --ray: also write {rows} as Parquet files here (a folder or a URI)")


def check_ray(a, local_only: str) -> None:
    """Refuse option combinations that --ray cannot serve (`local_only`: the option that needs one process)."""
    if a.ray and getattr(a, local_only.lstrip("-").replace("-", "_")):
        raise SystemExit(f"error: {local_only} is not available with --ray; run without --ray for {local_only[2:]}")
    if not a.ray and (a.parquet or a.ray_cpus):
        raise SystemExit("error: --parquet and --ray-cpus go with --ray")


def output_folder(option: str, folder: str | None) -> None:
    """Create an output folder before any work, or refuse one that cannot be."""
    if not folder:
        return
    if Path(folder).exists() and not Path(folder).is_dir():
        raise SystemExit(f"error: {option} {folder}: exists and is not a folder")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {option} {folder}: cannot create the folder ({e.strerror or e})") from None


def output_file(option: str, file: str | None) -> None:
    """Refuse an output file that cannot be written before any work."""
    if not file:
        return
    out = Path(file)
    if out.is_dir():
        raise SystemExit(f"error: {option} {file}: is a folder; give a file name")
    if not out.resolve().parent.is_dir():
        raise SystemExit(f"error: {option} {file}: folder {out.parent} does not exist")
    if not os.access(out.resolve().parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise SystemExit(f"error: {option} {file}: not writable")


def add_config_options(p, skip=(), config=TrainConfig) -> None:
    """One option per field of a config dataclass (training/config.py: TrainConfig, DetConfig), its
    default and help the field's own: `train`, `cv` and `train-detector` never state a default of their own."""
    for f in fields(config):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        flag, text = meta.pop("flag", "--" + f.name.replace("_", "-")), meta.pop("help")
        if f.name == "target_sensitivity":
            meta["type"] = fraction
        if f.default is MISSING and f.default_factory is MISSING:
            p.add_argument(flag, dest=f.name, required=True, help=text, **meta)
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=text)
            continue
        if default is not None and not isinstance(default, list):
            meta.setdefault("type", type(default))
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        p.add_argument(flag, dest=f.name, default=default, help=text if default is None else
                       f"{text} (default: {shown})", **meta)


def progress_bar(total: int | None, desc: str, unit: str, quiet: bool = False):
    """A tqdm bar on a terminal (none when output is piped or `quiet`)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet or not sys.stderr.isatty())
