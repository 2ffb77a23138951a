"""Labelled cell folders (Parasitized/, Uninfected/) and the patient of each image."""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import MalariaDetectError
from ..imaging import IMAGE_EXTENSIONS

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
