"""The counting rule, in one place: how answers (one per image, or one per cell of a field) are
counted, the parasitemia and its 95 % Wilson interval, a sample's pooled counts, and the notes that go
with them. The command line, the web API (and so the page), Ray and the CSVs count through this
module; the page shows what the server counted.

    c = Counts.of([(label, ood), ...], positive="Parasitized")   # answers without a label: unclassified
    c.parasitemia, c.ci95                                        # over the classified cells only
    FieldReport.of(field_record).format()                        # one field, as the terminal shows it
    Summary.of(field_records, rbc_per_ul).to_dict()              # a sample: the smear report's summary
    ImageSummary.of(predictions, record).format()                # a folder of cell images: predict's summary

The rule: answers flagged "not a cell" and answers without a label (unreadable, or a score that is not
a finite number) are counted apart and left out of the fraction, whose denominator is the classified
cells only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

WHO_MIN_CELLS = 500              # WHO: count at least 500-2,000 red cells on a thin film
TARGET_CELLS = 2000              # the stopping rule's default: the WHO thin-film count (2,000 at low parasitemia)


def stopping_rule(c: Counts, n_fields: int, target: int = TARGET_CELLS) -> dict:
    """Whether a sample's count can stop: `target` classified red cells (WHO, Basic Malaria Microscopy:
    count 500-2,000 red cells on a thin film, 2,000 when few are infected); if not, how many more fields
    like the ones analysed (their mean classified red cells) reach it."""
    per_field = c.n_classified / n_fields if n_fields else 0.0
    to_go = max(0, int(target) - c.n_classified)
    more = 0 if not to_go else math.ceil(to_go / per_field) if per_field > 0 else None
    return {"target_cells": int(target), "reached": not to_go, "cells_to_go": to_go,
            "cells_per_field": round(per_field, 1), "more_fields": more}


def stopping_text(s: dict) -> str:
    """The stopping rule as one line."""
    if s["reached"]:
        return f"stopping rule: {s['target_cells']:,} red cells reached"
    more = ("no field gave a classified red cell yet" if s["more_fields"] is None else
            f"about {plural(s['more_fields'], 'more field')} like these ({s['cells_per_field']:.0f} red cells each)")
    return f"stopping rule: {s['cells_to_go']:,} of {s['target_cells']:,} red cells still to count: {more}"

ALL_OOD_NOTE = ("all {n} cells found were flagged 'not a cell', so there is no parasitemia: the stain or "
                "microscope may differ from the training data; calibrate the model on a few dozen of your "
                "labelled cells with 'malaria-detect adapt' and use it with --model")
NONE_CLASSIFIED_NOTE = "no red cell could be classified, so there is no parasitemia"


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95 % Wilson score interval of a binomial proportion k / n (None when n = 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def percent(x: float) -> str:
    """Parasitemia is often well under 1 %: two decimals."""
    return f"{x:.2%}"


@dataclass(frozen=True)
class Counts:
    """The counts of a list of answers by the counting rule; `+` pools two lists."""

    n_cells: int = 0          # every answer (image or cell)
    n_classified: int = 0     # labelled and not flagged: the denominator
    n_parasitized: int = 0    # classified as the positive class
    n_not_a_cell: int = 0     # labelled but flagged "not a cell"
    n_unclassified: int = 0   # no label (unreadable, or not a finite score)

    @classmethod
    def of(cls, answers: Iterable[tuple[str | None, bool | None]], positive: str) -> Counts:
        """(label, ood) answers; `positive` is the model's positive class name."""
        n = classified = k = ood = unlabelled = 0
        for label, flagged in answers:
            n += 1
            if label is None:
                unlabelled += 1
            elif flagged:
                ood += 1
            else:
                classified += 1
                k += label == positive
        return cls(n, classified, k, ood, unlabelled)

    @classmethod
    def of_cells(cls, cells: Iterable[dict], positive: str) -> Counts:
        """A field record's red cells ({"kind", "label", "ood", ...}; other kinds are not counted here)."""
        return cls.of(((c["label"], c["ood"]) for c in cells if is_red_cell(c)), positive)

    @classmethod
    def from_dict(cls, d: dict) -> Counts:
        """The counts stored in a field record or a summary (their n_* keys)."""
        return cls(**{f.name: int(d[f.name]) for f in fields(cls)})

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def parasitemia(self) -> float | None:
        return self.n_parasitized / self.n_classified if self.n_classified else None

    @property
    def ci95(self) -> list[float] | None:
        return wilson(self.n_parasitized, self.n_classified)

    def to_dict(self) -> dict:
        """The keys of a field record and of a summary, parasitemia and its interval included."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "parasitemia": self.parasitemia, "parasitemia_ci95": self.ci95}

    def parasitemia_text(self) -> str:
        """'1.63% (95% CI 0.89%-2.98%)', or 'n/a'."""
        if self.parasitemia is None:
            return "n/a"
        lo, hi = self.ci95
        return f"{percent(self.parasitemia)} (95% CI {percent(lo)}-{percent(hi)})"


def is_red_cell(obj: dict) -> bool:
    """An object of a field record that the parasitemia counts (records without `kind`: red cells)."""
    return obj.get("kind", "red cell") == "red cell"


def parasites_per_ul(parasitemia: float | None, rbc_per_ul: float | None) -> int | None:
    return round(parasitemia * rbc_per_ul) if rbc_per_ul and parasitemia is not None else None


def field_counts(cells: list[dict], positive: str) -> dict:
    """A field record's count keys, from its objects (`positive`: the model's positive class name): the
    red cells by the counting rule, and the white cells beside them."""
    return Counts.of_cells(cells, positive).to_dict() | {
        "n_white_cells": sum(c.get("kind") == "white cell" for c in cells),
        "n_platelets": sum(c.get("kind") == "platelet" for c in cells),
        "n_by_stage": stage_counts(cells, positive)}


def stage_counts(cells: Iterable[dict], positive: str) -> dict[str, int]:
    """The counted parasitized red cells by life stage (cells of a model without a stage head have none)."""
    out: dict[str, int] = {}
    for c in cells:
        if is_red_cell(c) and c.get("label") == positive and not c.get("ood") and c.get("stage"):
            out[c["stage"]] = out.get(c["stage"], 0) + 1
    return dict(sorted(out.items()))


def pool_stages(records: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        for k, v in (r.get("n_by_stage") or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))


def field_note(rec: dict) -> str | None:
    """The note a field without a parasitemia gets (None when it has one, or already has a note or error)."""
    if "note" in rec or "error" in rec:
        return None
    if rec["n_cells"] == 0:
        return "no red cells found in this image"
    if rec["parasitemia"] is None and rec["n_not_a_cell"]:
        return ALL_OOD_NOTE.format(n=rec["n_not_a_cell"])
    return None


@dataclass(frozen=True)
class FieldReport:
    """One field's counts and what the terminal says of it, read from its record (the smear report's
    `fields` entries are plain JSON records; this is their typed view)."""

    image: str
    counts: Counts
    n_white_cells: int = 0
    note: str | None = None
    error: str | None = None
    n_platelets: int = 0
    n_by_stage: dict = field(default_factory=dict)

    @classmethod
    def of(cls, rec: dict) -> FieldReport:
        counts = Counts() if "error" in rec and "n_cells" not in rec else Counts.from_dict(rec)
        return cls(rec["image"], counts, rec.get("n_white_cells", 0), rec.get("note"), rec.get("error"),
                   rec.get("n_platelets", 0), dict(rec.get("n_by_stage") or {}))

    def to_dict(self) -> dict:
        """The record's count keys (as field_counts gives them), with its note or error."""
        d = self.counts.to_dict() | {"n_white_cells": self.n_white_cells, "n_platelets": self.n_platelets,
                                     "n_by_stage": self.n_by_stage}
        return d | ({"note": self.note} if self.note else {}) | ({"error": self.error} if self.error else {})

    def format(self) -> str:
        """One terminal line: the counts and parasitemia, or why there is none."""
        if self.error:
            return f"{self.image}\tERROR {self.error}"
        c = self.counts
        pm = c.parasitemia
        tail = (f"{percent(pm)} [{percent(c.ci95[0])}, {percent(c.ci95[1])}]" if pm is not None
                else f"n/a ({self.note or 'no classified cell'})")
        return (f"{self.image}\t{c.n_cells} red cells, {c.n_parasitized} parasitized, {c.n_not_a_cell} not a "
                f"cell, {plural(self.n_white_cells, 'white cell')}; parasitemia {tail}")


def format_field(rec: dict) -> str:
    """One field record as one terminal line (FieldReport.of(rec).format())."""
    return FieldReport.of(rec).format()


@dataclass(frozen=True)
class Summary:
    """A sample: the counts of its fields pooled, with the WHO note when too few cells were counted."""

    counts: Counts
    n_fields: int
    n_errors: int
    parasites_per_ul: int | None = None
    note: str | None = None
    n_white_cells: int = 0
    n_platelets: int = 0
    n_by_stage: dict = field(default_factory=dict)
    stopping: dict = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[dict], rbc_per_ul: float | None = None, target_cells: int = TARGET_CELLS) -> Summary:
        """Field records (each with its n_* counts) -> the sample's summary (parasites/uL with rbc_per_ul;
        the stopping rule at `target_cells`)."""
        c = sum((Counts.from_dict(r) for r in records), Counts())
        note = None
        if c.n_classified < WHO_MIN_CELLS:
            note = (f"only {c.n_classified} red cells classified: WHO guidance is to count at least "
                    f"{WHO_MIN_CELLS}-2,000 on a thin film; photograph more fields for a reliable estimate")
        if c.parasitemia is None:
            note = ALL_OOD_NOTE.format(n=c.n_not_a_cell) if c.n_not_a_cell else NONE_CLASSIFIED_NOTE
        return cls(c, len(records), sum("error" in r for r in records),
                   parasites_per_ul(c.parasitemia, rbc_per_ul), note,
                   sum(r.get("n_white_cells", 0) for r in records), sum(r.get("n_platelets", 0) for r in records),
                   pool_stages(records), stopping_rule(c, sum("error" not in r for r in records), target_cells))

    def to_dict(self) -> dict:
        """The smear report's `summary`."""
        d = self.counts.to_dict() | {"n_white_cells": self.n_white_cells, "n_platelets": self.n_platelets,
                                     "n_by_stage": self.n_by_stage, "n_fields": self.n_fields,
                                     "n_errors": self.n_errors, "stopping": self.stopping}
        if self.parasites_per_ul is not None:
            d["parasites_per_ul"] = self.parasites_per_ul
        if self.note:
            d["note"] = self.note
        return d

    def format(self) -> str:
        """The summary as the terminal shows it (a line, and the note)."""
        c = self.counts
        return (f"{plural(self.n_fields, 'field')}: {c.n_cells} red cells, {c.n_parasitized} parasitized, "
                f"{c.n_not_a_cell} not a cell, {plural(self.n_white_cells, 'white cell')}; parasitemia "
                f"{c.parasitemia_text()}"
                + (f", {self.parasites_per_ul:,} parasites/uL" if self.parasites_per_ul is not None else "")
                + ("; parasitized by stage: " + ", ".join(f"{n} {k}" for k, n in self.n_by_stage.items())
                   if self.n_by_stage else "")
                + (f"; {self.n_errors} unreadable" if self.n_errors else "")
                + (f"\n{stopping_text(self.stopping)}" if self.stopping else "")
                + (f"\nnote: {self.note}" if self.note else ""))


def sample_summaries(records: list[dict], rbc_per_ul: float | None = None,
                     target_cells: int = TARGET_CELLS) -> list[dict]:
    """One summary per sample (the records' `sample`, in order of first appearance), each with its id:
    a slide's fields pooled, its stopping rule its own."""
    order: dict = {}
    for r in records:
        order.setdefault(r.get("sample"), []).append(r)
    return [{"sample": s} | Summary.of(rs, rbc_per_ul, target_cells).to_dict() for s, rs in order.items()]


def summarize(records: list[dict], rbc_per_ul: float | None = None, target_cells: int = TARGET_CELLS) -> dict:
    """The smear report's `summary` of field records (Summary.of(...).to_dict())."""
    return Summary.of(records, rbc_per_ul, target_cells).to_dict()


@dataclass(frozen=True)
class ImageSummary:
    """A list of cell images (`predict`): how many of each class, flagged, unreadable."""

    counts: Counts
    positive: str
    negative: str

    @classmethod
    def of(cls, predictions: Iterable, record) -> ImageSummary:
        """Predictions (anything with .label and .ood) of a model whose record names the classes."""
        return cls(Counts.of(((p.label, p.ood) for p in predictions), record.positive), record.positive,
                   record.negative)

    def to_dict(self) -> dict:
        """predict --json's `summary` (the classes by their names)."""
        c = self.counts
        return {"images": c.n_cells, self.positive: c.n_parasitized,
                self.negative: c.n_classified - c.n_parasitized, "parasitized_fraction": c.parasitemia,
                "not_a_cell": c.n_not_a_cell, "errors": c.n_unclassified}

    def format(self) -> str:
        c = self.counts
        frac = f"{c.parasitemia:.1%}" if c.parasitemia is not None else "n/a"
        return (f"{plural(c.n_cells, 'image')}: {c.n_parasitized} {self.positive}, "
                f"{c.n_classified - c.n_parasitized} {self.negative} (parasitized fraction {frac} of the "
                f"{plural(c.n_classified, 'cell')}); {c.n_not_a_cell} flagged as not a cell (left out of the "
                f"fraction); {c.n_unclassified} unreadable")
