"""Images as uint8 arrays at a model's input size, decoded once and cached on disk (keyed by the files)."""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..imaging import DECODE_VERSION, ImageError, load_uint8
from .folders import Item


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(items: list[Item]) -> str:
    """A short hash of (relative name, label, patient) of every image: identifies the training data."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.label, i.path.name)):
        h.update(f"{it.path.name}|{it.label}|{it.patient}\n".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("MALARIA_DETECT_CACHE", Path.home() / ".cache" / "malaria-detect"))


def load_arrays(items: list[Item], size: int, workers: int = 2, desc: str = "decoding",
                use_cache: bool = True, progress: bool = True):
    """Decode and resize every image once -> (uint8 N,S,S,3 array, labels, kept items, errors).

    Cached on disk by a hash of (absolute path, size, mtime, resize size, decoder version) so later
    runs start fast. Unreadable images (any decoder failure, any format but FORMATS) are reported
    and skipped: one bad file never stops train, evaluate or export.
    """
    key = hashlib.sha256()
    for it in items:
        st = it.path.stat() if it.path.exists() else None
        key.update(f"{it.path.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    key.update(f"size={size}|decode={DECODE_VERSION}".encode())
    cpath = cache_dir() / f"cells-{key.hexdigest()[:20]}.npz"
    if use_cache and cpath.exists():
        z = np.load(cpath, allow_pickle=False)
        keep = z["keep"]
        errors = [(items[i].path, "unreadable (cached)") for i in np.nonzero(~keep)[0]]
        return z["x"], np.array([it.label for it in items])[keep], [it for it, k in zip(items, keep) if k], errors

    def one(it):
        try:
            return load_uint8(it.path, size), None
        except ImageError as e:
            return None, str(e)

    x = np.zeros((len(items), size, size, 3), np.uint8)
    keep = np.ones(len(items), bool)
    errors = []
    with ThreadPoolExecutor(workers) as ex:
        for i, (arr, err) in enumerate(tqdm(ex.map(one, items), total=len(items), desc=desc, unit="img",
                                            leave=False, disable=not progress)):
            if err:
                keep[i] = False
                errors.append((items[i].path, err))
            else:
                x[i] = arr
    for p, err in errors:
        print(f"warning: skipped unreadable image {p}: {err}", file=sys.stderr)
    x = x[keep]
    if use_cache:
        cpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = cpath.with_suffix(".tmp.npz")
        np.savez(tmp, x=x, keep=keep)
        tmp.replace(cpath)
    return x, np.array([it.label for it in items])[keep], [it for it, k in zip(items, keep) if k], errors
