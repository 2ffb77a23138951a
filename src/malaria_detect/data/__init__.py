"""Labelled cell data: folders and patients, patient-disjoint splits, the decoded-image cache,
dataset checks, the NIH download, and annotated whole fields (`data.annotations`, `data.cutcells`).

    from malaria_detect import data as D
    items = D.find_images("cells/")          # Item(path, label, patient)
    parts = D.split_patients(items)          # {"train": [...], "val": [...], "test": [...]} patient ids

No torch, and no OpenCV (cutting cells out of fields, `data.cutcells`, is imported on its own).
"""

from __future__ import annotations

from ..imaging import IMAGE_EXTENSIONS
from .cache import cache_dir, file_sha256, fingerprint, load_arrays
from .check import check_data, format_check
from .download import NIH_SHA256, NIH_URL, download
from .folders import (
                      CLASS_FOLDERS,
                      LABEL_NAMES,
                      NEGATIVE,
                      POSITIVE,
                      DataError,
                      Item,
                      find_images,
                      patient_from_name,
                      read_patient_csv,
)
from .splits import assert_disjoint, kfold_patients, load_split, save_split, select, split_patients

__all__ = ["CLASS_FOLDERS", "IMAGE_EXTENSIONS", "LABEL_NAMES", "NEGATIVE", "NIH_SHA256", "NIH_URL", "POSITIVE",
           "DataError", "Item", "assert_disjoint", "cache_dir", "check_data", "download", "format_check", "file_sha256",
           "find_images", "fingerprint", "kfold_patients", "load_arrays", "load_split", "patient_from_name",
           "read_patient_csv", "save_split", "select", "split_patients"]
