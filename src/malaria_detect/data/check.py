"""`check-data`: counts per class and patient, unreadable files, duplicates, sizes."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..imaging import ImageError, open_rgb
from .folders import LABEL_NAMES, POSITIVE, find_images
from .splits import _patient_table


def _inspect(path: Path):
    try:
        im = open_rgb(path, max_side=None)  # full size: the size statistics are the files' own
        return path, (im.size, hashlib.sha1(im.tobytes()).hexdigest()), None
    except ImageError as e:  # any decoder error: report and skip
        return path, None, str(e)


def check_data(root: str | Path, patient_csv=None, workers: int = 2, progress: bool = True) -> dict:
    """Counts per class and patient, unreadable files, exact duplicates (pixel hash), size statistics."""


    items = find_images(root, patient_csv)
    by_path = {it.path: it for it in items}
    bad, sizes, hashes = [], [], defaultdict(list)
    with ThreadPoolExecutor(workers) as ex:
        it = ex.map(_inspect, [i.path for i in items])
        for path, info, err in tqdm(it, total=len(items), desc="checking", disable=not progress, unit="img"):
            if err:
                bad.append({"file": str(path), "error": err})
                continue
            sizes.append(info[0])
            hashes[info[1]].append(str(path))
    dups = [v for v in hashes.values() if len(v) > 1]
    conflicting = [v for v in dups if len({by_path[Path(p)].label for p in v}) > 1]
    table = _patient_table(items)
    w = np.array([s[0] for s in sizes] or [0])
    h = np.array([s[1] for s in sizes] or [0])
    return {
        "root": str(root),
        "n_images": len(items),
        "per_class": {LABEL_NAMES[k]: v for k, v in sorted(Counter(i.label for i in items).items())},
        "n_patients": len(table),
        "per_patient": {p: {LABEL_NAMES[k]: c[k] for k in (1, 0)} for p, c in sorted(table.items())},
        "patients_without_id": sum(p.startswith("?") for p in table),
        "unreadable": bad,
        "duplicate_groups": dups,
        "duplicates_with_conflicting_labels": conflicting,
        "size": {"width": [int(w.min()), float(np.median(w)), int(w.max())],
                 "height": [int(h.min()), float(np.median(h)), int(h.max())]},
    }


def format_check(r: dict) -> str:
    """check_data's report as the terminal shows it."""
    infected = sum(1 for c in r["per_patient"].values() if c[POSITIVE])
    w, h = r["size"]["width"], r["size"]["height"]
    lines = [f"{r['root']}: {r['n_images']} images, {r['n_patients']} patients"]
    lines += [f"  {k:<12} {v}" for k, v in r["per_class"].items()]
    lines.append(f"  patients with parasitized cells: {infected}; healthy-only: {r['n_patients'] - infected}")
    if r["patients_without_id"]:
        lines.append(f"  WARNING: {r['patients_without_id']} images have no patient id: splits cannot be "
                     "patient-disjoint")
    lines.append(f"  width min/median/max {w[0]}/{w[1]:.0f}/{w[2]}, height {h[0]}/{h[1]:.0f}/{h[2]}")
    lines.append(f"  unreadable: {len(r['unreadable'])}")
    lines += [f"    {b['file']}: {b['error']}" for b in r["unreadable"][:20]]
    lines.append(f"  exact duplicate groups (same pixels): {len(r['duplicate_groups'])}, "
                 f"with conflicting labels: {len(r['duplicates_with_conflicting_labels'])}")
    lines += ["    " + "  =  ".join(g) for g in r["duplicate_groups"][:10]]
    return "\n".join(lines)
