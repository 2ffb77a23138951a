"""The counting rule, in one place: how answers (one per image, or one per cell of a field) are counted,
the parasitemia and its 95 % Wilson interval, a sample's pooled counts, and the notes that go with
them. The command line, the web API, Ray and the CSVs count through these functions; the web page
shows what the server counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

WHO_MIN_CELLS = 500              # WHO: count at least 500-2,000 red cells on a thin film

ALL_OOD_NOTE = ("all {n} cells found were flagged 'not a cell', so there is no parasitemia: the stain or "
                "microscope may differ from the training data; calibrate the model on a few dozen of your "
                "labelled cells with 'malaria-detect adapt' and use it with --model")


def tally(answers: Iterable[tuple[str | None, bool | None]], positive: str) -> dict:
    """The one rule for counting (label, ood) answers, whether images of a folder or cells of a field:
    answers flagged not a cell, and answers without a label (unreadable, or a score that is not a
    finite number), are counted apart and left out of the parasitized fraction, whose denominator is
    the classified cells only."""
    answers = list(answers)
    classified = [label for label, ood in answers if label is not None and not ood]
    k = sum(label == positive for label in classified)
    return {"n": len(answers), "n_classified": len(classified), "n_positive": k,
            "n_not_a_cell": sum(bool(ood) for label, ood in answers if label is not None),
            "n_unlabelled": sum(label is None for label, _ in answers),
            "fraction": k / len(classified) if classified else None}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95 % Wilson score interval of a binomial proportion k / n (None when n = 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def counts(cells: list[dict], positive: str) -> dict:
    """Counts and parasitemia of one field's cells (`positive`: the model's positive class name), by
    the one counting rule (`tally`): not-a-cell and unclassified cells are left out."""
    t = tally(((c["label"], c["ood"]) for c in cells), positive)
    return _with_ci({"n_cells": t["n"], "n_classified": t["n_classified"], "n_parasitized": t["n_positive"],
                     "n_not_a_cell": t["n_not_a_cell"], "n_unclassified": t["n_unlabelled"]})


def _with_ci(c: dict) -> dict:
    k, n = c["n_parasitized"], c["n_classified"]
    return c | {"parasitemia": k / n if n else None, "parasitemia_ci95": wilson(k, n)}


def pooled(fields: list[dict]) -> dict:
    """The counts of several fields added up (one sample), with their parasitemia and interval."""
    keys = ("n_cells", "n_classified", "n_parasitized", "n_not_a_cell", "n_unclassified")
    return _with_ci({k: sum(f[k] for f in fields) for k in keys})


def summarize(fields: list[dict], rbc_per_ul: float | None = None) -> dict:
    """Counts pooled over all fields (one sample), with the WHO note when too few cells were counted
    (and parasites/uL when the red-cell count per microlitre is given)."""
    s = pooled(fields)
    s["n_fields"] = len(fields)
    s["n_errors"] = sum("error" in f for f in fields)
    if rbc_per_ul and s["parasitemia"] is not None:
        s["parasites_per_ul"] = round(s["parasitemia"] * rbc_per_ul)
    if s["n_classified"] < WHO_MIN_CELLS:
        s["note"] = (f"only {s['n_classified']} red cells classified: WHO guidance is to count at least "
                     f"{WHO_MIN_CELLS}-2,000 on a thin film; photograph more fields for a reliable estimate")
    if s["parasitemia"] is None:
        s["note"] = ALL_OOD_NOTE.format(n=s["n_not_a_cell"]) if s["n_not_a_cell"] else \
            "no red cell could be classified, so there is no parasitemia"
    return s
