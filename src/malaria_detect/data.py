"""Finding labelled cell images, patient ids, patient-disjoint splits, k-fold, dataset checks, download.

No torch here: the inference side imports this module too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import sys
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import MalariaDetectError, UsageError
from .preprocess import DECODE_VERSION, ImageError, load_uint8, open_rgb

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
# Folder names accepted for each class (matched case-insensitively).
CLASS_FOLDERS = {
    "parasitized": 1, "infected": 1,
    "uninfected": 0,
}
POSITIVE, NEGATIVE = "Parasitized", "Uninfected"
LABEL_NAMES = (NEGATIVE, POSITIVE)  # index = label

# NIH names: C100P61ThinF_IMG_..., C1_thinF_IMG_..., C39P4thinF_original_..., C167P128ReThinF_...
# The patient id is the prefix before the first '_', 'thin' or 'Thin'.
_NIH_PATIENT = re.compile(r"^(C\d+[A-Za-z0-9]*?)(?:_|thin|Thin)")


class DataError(MalariaDetectError):
    """A problem with the user's data, reported without a traceback by the CLI."""


@dataclass(frozen=True)
class Item:
    path: Path
    label: int  # 1 = Parasitized, 0 = Uninfected
    patient: str | None

    @property
    def label_name(self) -> str:
        return LABEL_NAMES[self.label]


def patient_from_name(name: str) -> str | None:
    """Patient id from an NIH file name: 'C100P61ThinF_IMG_x.png' -> 'C100P61', 'C1_thinF_x' -> 'C1'."""
    m = _NIH_PATIENT.match(Path(name).name)
    return m.group(1) if m else None


def read_patient_csv(path: str | Path) -> dict[str, str]:
    """A user-supplied CSV with columns file,patient (file: a name or a path relative to the data dir)."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "patient"} <= set(reader.fieldnames):
            raise DataError(f"{path}: the patient CSV needs the columns 'file,patient'")
        for row in reader:
            out[row["file"].strip()] = row["patient"].strip()
    return out


def find_images(root: str | Path, patient_csv: str | Path | None = None) -> list[Item]:
    """All images under `root`, labelled by their class folder (Parasitized/Uninfected, any case)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    classes = {}
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name.lower() in CLASS_FOLDERS:
            classes[d] = CLASS_FOLDERS[d.name.lower()]
    if set(classes.values()) != {0, 1}:
        raise DataError(f"{root}: expected one subfolder per class, 'Parasitized' (or 'infected') and "
                        f"'Uninfected'; found {[d.name for d in root.iterdir() if d.is_dir()]}")
    ids = read_patient_csv(patient_csv) if patient_csv else None
    items = []
    for d, label in classes.items():
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
            if ids is not None:
                rel = p.relative_to(root).as_posix()
                patient = ids.get(rel) or ids.get(p.name)
            else:
                patient = patient_from_name(p.name)
            items.append(Item(p, label, patient))
    if not items:
        raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    missing = sum(i.patient is None for i in items)
    if missing:
        warnings.warn(f"{missing} of {len(items)} images have no patient id (neither an NIH file name nor "
                      f"a --patients CSV): each is treated as its own patient, so the split CANNOT be "
                      f"patient-disjoint and accuracy will be optimistic", stacklevel=2)
        items = [i if i.patient else Item(i.path, i.label, f"?{i.path.name}") for i in items]
    return items


# ---------------------------------------------------------------- splits

def _patient_table(items: list[Item]) -> dict[str, Counter]:
    table: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        table[it.patient][it.label] += 1
    return table


def split_patients(items: list[Item], fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[str]]:
    """Deterministic, class-stratified, patient-disjoint split of patients into train/val/test.

    Patients are stratified by whether they have any parasitized cell (40 NIH patients are
    healthy-only), then each stratum is shuffled with `seed` and cut by the fractions.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise UsageError("fractions must be three numbers summing to 1 (train, val, test)")
    table = _patient_table(items)
    strata = defaultdict(list)
    for p in sorted(table):
        strata[table[p][1] > 0].append(p)
    parts = {"train": [], "val": [], "test": []}
    rng = random.Random(seed)
    for key in sorted(strata):
        ps = strata[key]
        rng.shuffle(ps)
        n = len(ps)
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        if n >= 3:
            n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
        parts["test"] += ps[:n_test]
        parts["val"] += ps[n_test:n_test + n_val]
        parts["train"] += ps[n_test + n_val:]
    for k in parts:
        parts[k].sort()
    assert_disjoint(parts)
    return parts


def kfold_patients(items: list[Item], k: int = 5, seed: int = 0) -> list[list[str]]:
    """Patient-grouped, stratified k-fold: k lists of test patients that cover every patient once."""
    if k < 2:
        raise UsageError("k must be at least 2")
    table = _patient_table(items)
    if len(table) < k:
        raise DataError(f"{len(table)} patients cannot make {k} patient-disjoint folds")
    strata = defaultdict(list)
    for p in sorted(table):
        strata[table[p][1] > 0].append(p)
    folds: list[list[str]] = [[] for _ in range(k)]
    rng = random.Random(seed)
    offset = 0
    for key in sorted(strata):
        ps = strata[key]
        rng.shuffle(ps)
        for i, p in enumerate(ps):
            folds[(i + offset) % k].append(p)
        offset += len(ps)
    return [sorted(f) for f in folds]


def assert_disjoint(parts: dict[str, list[str]]) -> None:
    """The leakage guard: fail loudly if any patient is in two parts."""
    seen: dict[str, str] = {}
    for name, ps in parts.items():
        for p in ps:
            if p in seen and seen[p] != name:
                raise DataError(f"patient leakage: patient {p!r} is in both {seen[p]!r} and {name!r}")
            seen[p] = name


def select(items: list[Item], patients) -> list[Item]:
    ps = set(patients)
    return [i for i in items if i.patient in ps]


def save_split(parts: dict[str, list[str]], path: str | Path, **meta) -> str:
    """Write the split as JSON; returns its sha256 (stored in checkpoints)."""
    assert_disjoint(parts)
    text = json.dumps({"parts": parts, **meta}, indent=1, sort_keys=True)
    Path(path).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def load_split(path: str | Path) -> dict[str, list[str]]:
    parts = json.loads(Path(path).read_text())["parts"]
    assert_disjoint(parts)
    return parts


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(items: list[Item]) -> str:
    """A short hash of (relative name, label, patient) of every image: identifies the training data."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.label, i.path.name)):
        h.update(f"{it.path.name}|{it.label}|{it.patient}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- data to arrays

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


# ---------------------------------------------------------------- check-data

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


# ---------------------------------------------------------------- download

NIH_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
# sha256 of the public cell_images.zip (NLM release, 353,452,851 bytes), as recorded by
# TensorFlow Datasets' url_checksums/malaria.txt
NIH_SHA256 = "0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668"


def download(dest: str | Path, url: str = NIH_URL, sha256: str | None = NIH_SHA256, timeout: float = 30,
             progress: bool = True) -> Path:
    """Fetch the NIH cell_images.zip, verify its sha256, unpack it into dest; returns the image folder."""
    import shutil
    import urllib.error
    import urllib.request
    import zipfile



    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    zpath = dest / "cell_images.zip"
    part = zpath.with_suffix(".zip.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download {url}: {reason}. Are you offline? You can download the file "
                        f"by hand and unpack it into {dest}") from None
    if sha256 and h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: got sha256 {h.hexdigest()}, expected {sha256}; "
                        f"the download is corrupt or the file changed upstream")
    part.replace(zpath)
    try:
        with zipfile.ZipFile(zpath) as z:
            for m in z.infolist():  # refuse paths that escape dest
                target = (dest / m.filename).resolve()
                if not str(target).startswith(str(dest.resolve())):
                    raise DataError(f"unsafe path in zip: {m.filename}")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zpath}: not a valid zip file ({e})") from None
    for junk in dest.rglob("Thumbs.db"):
        junk.unlink()
    folder = dest / "cell_images"
    if (folder / "cell_images").is_dir():  # some mirrors nest it twice
        shutil.rmtree(folder / "cell_images")
    return folder if folder.is_dir() else dest
