"""The samples database over HTTP: POST /smear saves what it analysed (store.py), GET /samples lists
the samples (search by id, updated since a date) and GET /samples/{id} gives one sample's report, its
fields pooled again by the counting rule. The database is the server's `db` setting
(MALARIA_DETECT_DB), else the user's data directory; `db_enabled=false` turns saving and these routes off.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Query

from ..store import Store, StoreError


def save_report(settings, report: dict) -> str | None:
    """Save a /smear answer; returns a warning instead of failing the request when the database cannot
    be written (the answer is still the user's)."""
    if not settings.db_enabled:
        return None
    try:
        with Store(settings.db) as db:
            db.save_report(report, source="server")
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

    @app.get("/samples/{sample}", summary="one sample's report: its fields, objects and pooled counts")
    def sample(sample: str):
        if not settings.db_enabled:
            raise HTTPException(404, "the samples database is turned off on this server")
        try:
            with Store(settings.db) as db:
                return db.sample(sample)
        except StoreError as e:
            raise HTTPException(404 if "no sample" in str(e) else 503, str(e)) from None
