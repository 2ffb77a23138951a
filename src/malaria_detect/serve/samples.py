"""The samples database over HTTP: POST /smear saves what it analysed (store.py), GET /samples lists
the samples (search by id, updated since a date) and GET /samples/{id} gives one sample's report, its
fields pooled again by the counting rule, with its review. A person's review: POST
/samples/{id}/reviews (one decision: confirm, reject, stage, add, clear, seen; review.py), answered with the
sample's model and reviewed counts. GET /samples/{id}/fields/{field_id}/picture is a field as stored
(JPEG), GET /samples/{id}/report.html the printable report (reviewed counts beside the model's).
The database is the server's `db` setting (MALARIA_DETECT_DB), else the user's data directory;
`db_enabled=false` turns saving and these routes off.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, HTTPException, Path, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from ..review import ACTIONS, MAX_REVIEWER, STAGES, ReviewError
from ..store import Store, StoreError

# the printable report: inline styles and data: images, no script
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'self'")
SAMPLE_ID = Path(..., min_length=1, max_length=200, description="the sample id")


class Decision(BaseModel):
    """One decision of a person on one object of a stored field (review.py)."""

    field_id: int = Field(..., ge=1, description="the field, as /smear or /samples/{id} numbered it")
    action: Literal[ACTIONS] = Field(..., description="confirm, reject, stage (re-stage), add (a missed infected "
                                                      "cell at x, y), clear (withdraw) or seen (the whole field "
                                                      "looked at)")
    cell: str | None = Field(None, max_length=12, description="the object: its index in the field's cells, or "
                                                              "'a<id>' for an added cell (not for add)")
    stage: Literal[STAGES] | None = None
    x: float | None = Field(None, ge=0, le=100000, allow_inf_nan=False, description="add: field pixels")
    y: float | None = Field(None, ge=0, le=100000, allow_inf_nan=False)
    reviewer: str = Field(..., min_length=1, max_length=MAX_REVIEWER, description="who decided (a name)")


def save_report(settings, report: dict, pictures: list | None = None) -> str | None:
    """Save a /smear answer (each field gets its `field_id`); returns a warning instead of failing the
    request when the database cannot be written (the answer is still the user's)."""
    if not settings.db_enabled:
        return None
    try:
        with Store(settings.db) as db:
            db.save_report(report, source="server", pictures=pictures)
    except StoreError as e:
        return str(e)
    return None


def add_sample_routes(app: FastAPI, settings) -> None:
    @app.get("/samples", summary="the analysed samples, most recently updated first, with their pooled counts")
    def samples(search: str | None = Query(None, max_length=200, description="ids containing this text"),
                since: str | None = Query(None, max_length=32, description="updated on or after (ISO date)")):
        if not settings.db_enabled:
            raise HTTPException(404, "the samples database is turned off on this server")
        try:
            with Store(settings.db) as db:
                return {"samples": db.samples(search, since)}
        except StoreError as e:
            raise HTTPException(503, str(e)) from None

    def open_db() -> Store:
        if not settings.db_enabled:
            raise HTTPException(404, "the samples database is turned off on this server")
        try:
            return Store(settings.db)
        except StoreError as e:
            raise HTTPException(503, str(e)) from None

    def read(db: Store, sample: str, reviewed: bool = False) -> dict:
        try:
            return db.sample(sample, settings.target_cells, reviewed=reviewed)
        except StoreError as e:
            raise HTTPException(404 if "no sample" in str(e) else 503, str(e)) from None

    @app.get("/samples/{sample}", summary="one sample's report: its fields, objects, pooled counts and review")
    def sample(sample: str = SAMPLE_ID):
        with open_db() as db:
            return read(db, sample)

    @app.get("/samples/{sample}/review", summary="a sample's review: the decisions in force, who and when, and the "
                                                  "model's and the reviewed counts")
    def review_of(sample: str = SAMPLE_ID):
        with open_db() as db:
            rep = read(db, sample)
        return {"decisions": rep["decisions"], "review": rep["review"], "reviewed": rep["reviewed"],
                "model": rep["model_summary"]}

    @app.post("/samples/{sample}/reviews", summary="a person's decision on one called (or missed) cell",
              responses={422: {"description": "a malformed decision, or one that does not fit the field"},
                         404: {"description": "no such sample or field"}})
    def add_review(decision: Decision, sample: str = SAMPLE_ID):
        with open_db() as db:
            try:
                d = db.add_review(sample, decision.field_id, decision.model_dump(exclude={"field_id", "reviewer"}),
                                  decision.reviewer)
            except ReviewError as e:
                raise HTTPException(422, str(e)) from None
            except StoreError as e:
                raise HTTPException(404 if "no field" in str(e) else 503, str(e)) from None
            rep = read(db, sample)
        return {"decision": d, "decisions": rep["decisions"].get(str(decision.field_id), {}), "review": rep["review"],
                "reviewed": rep["reviewed"], "model": rep["model_summary"]}

    @app.get("/samples/{sample}/fields/{field_id}/picture", summary="a field's picture as stored (JPEG)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def picture(sample: str = SAMPLE_ID, field_id: int = Path(..., ge=1)):
        with open_db() as db:
            jpeg = db.picture(field_id, sample)
        if jpeg is None:
            raise HTTPException(404, f"no stored picture of field {field_id} in sample {sample!r}")
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "private, max-age=86400"})

    @app.get("/samples/{sample}/report.html", summary="the sample's printable report (reviewed counts beside "
                                                      "the model's)", response_class=HTMLResponse)
    def report(sample: str = SAMPLE_ID, operator: str | None = Query(None, max_length=MAX_REVIEWER)):
        from ..fields.htmlreport import render_report

        with open_db() as db:
            html = render_report(read(db, sample, reviewed=True), operator,
                                 picture=lambda f: db.field_image(f, files=False))
        return HTMLResponse(html, headers={"content-security-policy": REPORT_CSP})

    @app.get("/samples/{sample}/report.pdf", summary="the sample's printable report as a PDF",
             response_class=Response, responses={200: {"content": {"application/pdf": {}}},
                                                 501: {"description": "fpdf2 (the [pdf] extra) is not installed"}})
    def report_pdf(sample: str = SAMPLE_ID, operator: str | None = Query(None, max_length=MAX_REVIEWER)):
        from ..fields.pdfreport import PdfError, render_pdf

        with open_db() as db:
            try:
                pdf = render_pdf(read(db, sample, reviewed=True), operator,
                                 picture=lambda f: db.field_image(f, files=False))
            except PdfError as e:
                raise HTTPException(501, str(e)) from None
        from urllib.parse import quote

        name = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_." else "_" for ch in sample)[:80]
        return Response(pdf, media_type="application/pdf", headers={  # an ASCII name, and the id itself (RFC 6266)
            "content-disposition": f'inline; filename="{name or "sample"}-report.pdf"; '
                                   f"filename*=UTF-8''{quote(sample[:80] + '-report.pdf', safe='')}"})
