"""Patient-disjoint splits and k-fold: cells of one patient are alike, so every split is by patient."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import UsageError
from .folders import DataError, Item


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
