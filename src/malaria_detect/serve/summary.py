"""`POST /summary`: the pooled counts of answers the page already has, by the counting rule
(counting.py), so the page shows counts and never makes one.

The page sends one request per field (`POST /smear`) and one per chunk of cells (`POST /predict`);
what it shows for all of them together comes from here:

    {"fields": [{"n_cells": 40, "n_classified": 38, ...}, {"error": "..."}]}   # field records' counts
      -> {"fields": Summary.of(records).to_dict() + n_analysed, "cells": null}
    {"cells": [{"label": "Parasitized", "ood": false}, {"error": "..."}]}        # /predict answers
      -> {"fields": null, "cells": ImageSummary(...).to_dict() + classified and the interval}

Bounded: at most MAX_SUMMARY_ENTRIES entries in each list (413 otherwise) and MAX_SUMMARY_BYTES of
body (413, counted as it streams by UploadLimit).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..counting import TARGET_CELLS, Counts, ImageSummary, Summary
from .errors import short

MAX_SUMMARY_ENTRIES = 50_000        # answers in one list (a page of 50,000 cells is more than one sends)
MAX_SUMMARY_BYTES = 4 * 2**20       # the request body
_COUNT = Field(0, ge=0, le=10**9)


class FieldCounts(BaseModel):
    """A field record's counts (the n_* keys of a POST /smear field; its other keys are ignored).
    A field that could not be analysed has its `error` (and zero counts)."""

    n_cells: int = _COUNT
    n_classified: int = _COUNT
    n_parasitized: int = _COUNT
    n_not_a_cell: int = _COUNT
    n_unclassified: int = _COUNT
    n_white_cells: int = _COUNT
    n_platelets: int = _COUNT
    n_by_stage: dict[str, Annotated[int, Field(ge=0, le=10**9)]] = Field(
        default_factory=dict, max_length=16, description="counted parasitized cells by life stage")
    error: bool | str | None = Field(None, description="the field's error (a message, or true), if any")

    @model_validator(mode="after")
    def _consistent(self):
        if self.n_parasitized > self.n_classified:
            raise ValueError("n_parasitized is more than n_classified")
        if self.n_classified + self.n_not_a_cell + self.n_unclassified != self.n_cells:
            raise ValueError("n_cells must be n_classified + n_not_a_cell + n_unclassified")
        return self


class CellAnswer(BaseModel):
    """One POST /predict answer (its other keys are ignored). An answer with an error counts as
    unreadable, whatever its label."""

    label: str | None = None
    ood: bool | None = None
    error: bool | str | None = Field(None, description="the answer's error (a message, or true), if any")


class SummaryIn(BaseModel):
    fields: list[FieldCounts] | None = Field(None, max_length=MAX_SUMMARY_ENTRIES,
                                             description="field records (POST /smear), to pool as one sample")
    cells: list[CellAnswer] | None = Field(None, max_length=MAX_SUMMARY_ENTRIES,
                                           description="single-cell answers (POST /predict), to count")


class FieldsSummary(BaseModel):
    """The smear report's `summary` (as POST /smear and `malaria-detect smear` give it) and n_analysed."""

    n_cells: int
    n_classified: int
    n_parasitized: int
    n_not_a_cell: int
    n_unclassified: int
    parasitemia: float | None = Field(description="n_parasitized / n_classified")
    parasitemia_ci95: list[float] | None = Field(description="95 % Wilson interval of the parasitemia")
    n_white_cells: int = 0
    n_platelets: int = 0
    n_by_stage: dict[str, int] = Field(default_factory=dict, description="counted parasitized cells by life stage")
    stopping: dict = Field(default_factory=dict, description="the stopping rule: target_cells, reached, cells_to_go, "
                                                             "cells_per_field, more_fields (counting.stopping_rule)")
    n_fields: int
    n_errors: int = Field(description="fields with an error")
    n_analysed: int = Field(description="fields without an error")
    note: str | None = Field(None, description="e.g. fewer cells classified than the 500 WHO asks for")


class CellsSummary(BaseModel):
    """`malaria-detect predict --json`'s `summary`, with `classified` and the fraction's interval."""

    model_config = ConfigDict(extra="allow", json_schema_extra={
        "description": "also one count per class, keyed by the model's class name (e.g. Parasitized, Uninfected)"})

    images: int
    classified: int = Field(description="labelled and not flagged: the fraction's denominator")
    parasitized_fraction: float | None
    parasitized_fraction_ci95: list[float] | None = Field(description="95 % Wilson interval")
    not_a_cell: int
    errors: int = Field(description="answers without a label (unreadable files)")


class SummaryOut(BaseModel):
    fields: FieldsSummary | None = None
    cells: CellsSummary | None = None


def summarize_fields(records: list[FieldCounts], target_cells: int = TARGET_CELLS) -> dict:
    recs = [r.model_dump(exclude={"error"}) | ({"error": r.error} if r.error else {}) for r in records]
    s = Summary.of(recs, target_cells=target_cells)
    return s.to_dict() | {"n_analysed": s.n_fields - s.n_errors}


def summarize_cells(answers: list[CellAnswer], record) -> dict:
    for i, a in enumerate(answers):
        if a.label is not None and not a.error and a.label not in record.class_names:
            raise HTTPException(422, f"cells[{i}].label: {short(repr(a.label), 60)} is not one of the model's classes "
                                     f"{record.class_names}")
    c = Counts.of(((None if a.error else a.label, a.ood) for a in answers), record.positive)
    return ImageSummary(c, record.positive, record.negative).to_dict() | {
        "classified": c.n_classified, "parasitized_fraction_ci95": c.ci95}


def add_summary_routes(app: FastAPI) -> None:
    """Register POST /summary on `app` (the class names come from app.state.predictor's record)."""

    @app.post("/summary", response_model=None, responses={200: {"model": SummaryOut},
                                     413: {"description": f"more than {MAX_SUMMARY_ENTRIES:,} entries in a list, "
                                                          f"or a body over {MAX_SUMMARY_BYTES:,} bytes"},
                                     422: {"description": "malformed request, or counts that do not add up"}},
              summary="pool answers the page already has: counts, parasitemia and its interval, the WHO note")
    def summary(body: SummaryIn):
        """Counts by the project's one counting rule. `fields`: field records (their n_* counts;
        a field with an `error` counts as not analysed) pooled as one sample, with the parasitemia,
        its 95 % Wilson interval and the note (e.g. fewer than the 500 cells WHO asks for) -- the
        `summary` POST /smear gives, plus `n_analysed`. `cells`: single-cell answers (label, ood,
        error) -> the `summary` of `malaria-detect predict --json`, plus `classified` and the
        fraction's interval. Each list: at most 50,000 entries."""
        settings = getattr(app.state, "settings", None)
        target = settings.target_cells if settings is not None else TARGET_CELLS
        return {"fields": None if body.fields is None else summarize_fields(body.fields, target),
                "cells": None if body.cells is None else summarize_cells(body.cells, app.state.predictor.record)}
