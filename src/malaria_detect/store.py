"""The record that lasts: every analysed sample in an embedded SQLite database (standard library
`sqlite3`, write-ahead log), so nothing is lost when the command ends or the laptop restarts.

    db = Store()                      # MALARIA_DETECT_DB, else the user's data directory
    db.save_report(report)            # a smear report: one run, its fields (objects and counts inside)
    db.samples(search="slide")        # [{"sample", "created", "updated", "n_fields", "n_cells", ...}]
    db.sample("slide-7")              # the smear report of every field of that sample, pooled again,
                                      # with its review: the decisions, who and when, the reviewed counts
    db.add_review("slide-7", field_id, {"cell": "12", "action": "reject"}, reviewer="A. Technician")
    db.picture(field_id)              # the field as analysed (JPEG, at most 1600 px a side)

Each field is kept with its picture (pictures.py: a JPEG of at most 1,600 pixels a side), so that a
sample can be reviewed and its report printed after the original files are gone. Reviews (review.py)
are kept as every decision made, with who made it and when; the latest on a cell wins.

Schema versioned by `PRAGMA user_version` and migrated forward in one transaction when a database is
opened; a database written by a newer version is refused, not altered. Several processes (two servers,
a command and a server) may write at once: each write is one short IMMEDIATE transaction and waits
(`busy_timeout`) for the others. The counts are recomputed from the stored field records by the
counting rule (counting.py), never stored twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import review
from .counting import TARGET_CELLS, Summary, sample_summaries
from .errors import MalariaDetectError
from .pictures import file_sha256, open_field_file, picture_of

SCHEMA_VERSION = 2
MIGRATIONS = {  # version -> statements that bring the previous version to it
    1: ["CREATE TABLE samples (id TEXT PRIMARY KEY, created TEXT NOT NULL, updated TEXT NOT NULL)",
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, created TEXT NOT NULL, source TEXT NOT NULL, model_file TEXT, "
        "model_sha256 TEXT, field_threshold REAL, class_names TEXT)",
        "CREATE TABLE fields (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), "
        "sample TEXT NOT NULL REFERENCES samples(id), image TEXT NOT NULL, error TEXT, record TEXT NOT NULL)",
        "CREATE INDEX fields_sample ON fields(sample)", "CREATE INDEX samples_updated ON samples(updated)"],
    2: ["CREATE TABLE pictures (field_id INTEGER PRIMARY KEY REFERENCES fields(id), jpeg BLOB NOT NULL, "
        "width INTEGER NOT NULL, height INTEGER NOT NULL)",
        "CREATE TABLE reviews (id INTEGER PRIMARY KEY, field_id INTEGER NOT NULL REFERENCES fields(id), "
        "cell TEXT, action TEXT NOT NULL, stage TEXT, box TEXT, reviewer TEXT NOT NULL, created TEXT NOT NULL)",
        "CREATE INDEX reviews_field ON reviews(field_id)"],
}
UNNAMED = "(unnamed)"  # the sample of fields analysed without one
MAX_SAMPLE_ID = 200


def check_sample_id(sample: str) -> str:
    """A sample id as every part of the tool can name it (a URL path segment, a file name part): 1 to 200
    characters, no '/' or '\\', no control character, not '.' or '..'. Raises StoreError saying why."""
    s = str(sample).strip()
    if not s or len(s) > MAX_SAMPLE_ID or any(ch in s for ch in "/\\") or s in (".", "..") \
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in s):
        raise StoreError(f"sample id {sample!r}: give 1 to {MAX_SAMPLE_ID} characters without '/', '\\' or control "
                         "characters (e.g. MAL-2024-117 for MAL/2024/117)")
    return s


class StoreError(MalariaDetectError, RuntimeError):
    """A database that cannot be opened, read or written; the message says which and why."""


def default_db_path() -> Path:
    """MALARIA_DETECT_DB, else samples.sqlite3 in the user's data directory (XDG on Linux, Application
    Support on macOS, LOCALAPPDATA on Windows)."""
    if os.environ.get("MALARIA_DETECT_DB"):
        return Path(os.environ["MALARIA_DETECT_DB"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "malaria-detect" / "samples.sqlite3"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, path: str | Path | None = None, timeout: float = 30.0):
        self.path = Path(path) if path else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._wal(timeout)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the samples database ({e})") from None

    def _wal(self, timeout: float) -> None:
        """Switch to the write-ahead log; the switch does not wait for another process's lock (as writes
        do), so it is retried until `timeout` (two processes opening a new database at once)."""
        import time

        t0 = time.monotonic()
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() - t0 > timeout:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # the usual case: no write lock taken
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: written by a newer malaria-detect (schema {version}; this one "
                                 f"knows {SCHEMA_VERSION}): upgrade, or give another --db")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v]:
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {v}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def save_report(self, report: dict, source: str = "cli", pictures: list | None = None) -> int:
        """Store a smear report's fields as one run; returns the run's id and gives each field of `report`
        its `field_id`. Fields without a sample go to the sample '(unnamed)'. `pictures`: one per field,
        the field's image (PIL) or None; by default each field's image file is read, where it can be."""
        model, now = report.get("model", {}), _now()
        # given pictures, no file is read (a server's field names are the uploads', not paths of its own)
        jpegs = [None if f.get("error") else picture_of(f) if pictures is None else
                 picture_of(f, pictures[i]) if pictures[i] is not None else None
                 for i, f in enumerate(report["fields"])]
        samples = [check_sample_id(f.get("sample") or UNNAMED) for f in report["fields"]]  # before any write
        try:
            self.db.execute("BEGIN IMMEDIATE")
            run = self.db.execute("INSERT INTO runs (created, source, model_file, model_sha256, field_threshold, "
                                  "class_names) VALUES (?, ?, ?, ?, ?, ?)",
                                  (now, source, model.get("file"), model.get("weights_sha256"), model.get("threshold"),
                                   json.dumps(model.get("class_names") or ["Uninfected", "Parasitized"])))
            ids = []
            for f, jpeg, sample in zip(report["fields"], jpegs, samples):
                self.db.execute("INSERT INTO samples (id, created, updated) VALUES (?, ?, ?) "
                                "ON CONFLICT(id) DO UPDATE SET updated = excluded.updated", (sample, now, now))
                rec = {k: v for k, v in f.items() if k not in ("overlay", "field_id")}
                if pictures is None and not f.get("error"):  # the command line's fields are files: which ones
                    rec["image"] = str(Path(f["image"]).resolve())
                    rec["file_sha256"] = file_sha256(f["image"])
                row = self.db.execute("INSERT INTO fields (run_id, sample, image, error, record) "
                                      "VALUES (?, ?, ?, ?, ?)",
                                      (run.lastrowid, sample, str(f["image"]), f.get("error"), json.dumps(rec)))
                ids.append(row.lastrowid)
                if jpeg:
                    self.db.execute("INSERT INTO pictures (field_id, jpeg, width, height) VALUES (?, ?, ?, ?)",
                                    (row.lastrowid, *jpeg))
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: the report could not be saved ({e}); nothing of it was written") from None
        for f, i in zip(report["fields"], ids):
            f["field_id"] = i
        return run.lastrowid

    def picture(self, field_id: int, sample: str | None = None) -> bytes | None:
        """The stored picture (JPEG) of a field (of `sample`, when given), or None."""
        row = self.db.execute("SELECT p.jpeg FROM pictures p JOIN fields f ON f.id = p.field_id WHERE p.field_id = ? "
                              "AND (? IS NULL OR f.sample = ?)", (field_id, sample, sample)).fetchone()
        return row[0] if row else None

    def field_image(self, field: dict, files: bool = True, prefer_file: bool = False):
        """A stored field's image (PIL): its picture in the database, else (`files`) its file where still
        readable; with `prefer_file` the file first (full size, as analysed), then the picture."""
        import io

        from PIL import Image

        if files and prefer_file and field.get("file_sha256"):  # only a file known to be the one analysed
            img = open_field_file(field)
            if img is not None:
                return img
        jpeg = self.picture(field["field_id"]) if field.get("field_id") else None
        if jpeg:
            return Image.open(io.BytesIO(jpeg)).convert("RGB")
        got = picture_of(field) if files else None
        return Image.open(io.BytesIO(got[0])).convert("RGB") if got else None

    def add_review(self, sample: str, field_id: int, decision: dict, reviewer: str) -> dict:
        """Keep one decision (review.py) on an object of a field of `sample`, made by `reviewer` now;
        returns it as stored. Raises review.ReviewError when it does not fit the field."""
        kept, skipped = self.add_reviews(sample, [(field_id, decision)], reviewer, skip_misfits=False)
        return kept[0]

    def add_reviews(self, sample: str, items: list[tuple[int, dict]], reviewer: str,
                    skip_misfits: bool = True) -> tuple[list[dict], list[str]]:
        """Keep many decisions [(field_id, decision)] in one transaction: all or none. A decision that does
        not fit its field is skipped with why (`skip_misfits`) or refused (ReviewError, nothing written); one
        that changes nothing (the same as the decision in force on its cell) is skipped, so applying the
        same annotations twice writes nothing the second time. -> (kept, why each skipped)."""
        reviewer = " ".join(str(reviewer or "").split())
        if not reviewer or len(reviewer) > review.MAX_REVIEWER:
            raise review.ReviewError(f"a review needs the reviewer's name (1 to {review.MAX_REVIEWER} characters)")
        records, force, kept, skipped = {}, {}, [], []
        history = self.reviews(sample)
        now = _now()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            for field_id, decision in items:
                if field_id not in records:
                    row = self.db.execute("SELECT record FROM fields WHERE id = ? AND sample = ?",
                                          (field_id, sample)).fetchone()
                    if row is None:
                        raise StoreError(f"no field {field_id} in sample {sample!r}")
                    records[field_id] = json.loads(row[0])
                    force[field_id] = [d for d in history if d["field_id"] == field_id]
                now_in_force = review.latest(force[field_id])
                try:
                    d = review.check(decision, records[field_id], now_in_force)
                except review.ReviewError as e:
                    if not skip_misfits:
                        raise
                    skipped.append(f"field {field_id} ({records[field_id].get('image')}): {e}")
                    continue
                same = now_in_force.get(d["cell"]) if d["action"] != "add" else None
                if skip_misfits and same and (same["action"], same.get("stage")) == (d["action"], d["stage"]):
                    continue  # already so
                cur = self.db.execute("INSERT INTO reviews (field_id, cell, action, stage, box, reviewer, created) "
                                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                      (field_id, d["cell"], d["action"], d["stage"],
                                       json.dumps(d["box"]) if d["box"] else None, reviewer, now))
                d = d | {"id": cur.lastrowid, "field_id": field_id, "reviewer": reviewer, "created": now}
                force[field_id].append(d)
                kept.append(d)
            self.db.execute("UPDATE samples SET updated = ? WHERE id = ?", (now, sample))
            self.db.execute("COMMIT")
        except BaseException as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"{self.path}: the review could not be saved ({e}); nothing of it was written") \
                    from None
            raise
        return kept, skipped

    def reviews(self, sample: str) -> list[dict]:
        """Every decision on the fields of `sample`, oldest first."""
        rows = self.db.execute("SELECT r.id, r.field_id, r.cell, r.action, r.stage, r.box, r.reviewer, r.created "
                               "FROM reviews r JOIN fields f ON f.id = r.field_id WHERE f.sample = ? ORDER BY r.id",
                               (sample,)).fetchall()
        keys = ("id", "field_id", "cell", "action", "stage", "box", "reviewer", "created")
        return [dict(zip(keys, r)) | {"box": json.loads(r[5]) if r[5] else None} for r in rows]

    def _records(self, sample: str) -> list[dict]:
        return [json.loads(r) | {"field_id": i}
                for i, r in self.db.execute("SELECT id, record FROM fields WHERE sample = ? ORDER BY id", (sample,))]

    def samples(self, search: str | None = None, since: str | None = None) -> list[dict]:
        """Samples, most recently updated first: id containing `search`, updated on or after `since`
        (an ISO date), each with its pooled counts."""
        q, args = "SELECT id, created, updated FROM samples WHERE 1=1", []
        if search:
            q += " AND instr(lower(id), lower(?)) > 0"
            args.append(search)
        if since:
            q += " AND updated >= ?"
            args.append(since)
        out = []
        for sid, created, updated in self.db.execute(q + " ORDER BY updated DESC, id", args).fetchall():
            fields = self._records(sid)
            decisions, _, revised = self._reviewed(sid, fields)
            st = review.status(fields, decisions, self._class_names(sid)[1])
            out.append({"sample": sid, "created": created, "updated": updated} | Summary.of(fields).to_dict()
                       | {"review": st, "reviewed": Summary.of(revised).to_dict() if st["reviewed"] else None})
        return out

    def _reviewed(self, sample: str, fields: list[dict]) -> tuple[list[dict], dict[int, list[dict]], list[dict]]:
        """Every decision on `sample`, the same by field, and its field records with the decisions in force
        applied."""
        neg, pos = self._class_names(sample)
        decisions = self.reviews(sample)
        by_field: dict[int, list[dict]] = {}
        for d in decisions:
            by_field.setdefault(d["field_id"], []).append(d)
        return decisions, by_field, [review.apply(f, by_field.get(f["field_id"], []), pos, neg) for f in fields]

    def _class_names(self, sample: str) -> list[str]:
        row = self.db.execute("SELECT r.class_names FROM runs r JOIN fields f ON f.run_id = r.id WHERE f.sample = ? "
                              "ORDER BY r.id DESC LIMIT 1", (sample,)).fetchone()
        return json.loads(row[0]) if row and row[0] else ["Uninfected", "Parasitized"]

    def sample(self, sample: str, target_cells: int = TARGET_CELLS, reviewed: bool = False) -> dict:
        """The smear report of every stored field of `sample` (raises StoreError when there is none), with
        its review: `reviews` (every decision), `decisions` (those in force: field id -> cell key ->
        decision), `review` (who, when, how far) and `reviewed` (the counts
        with the decisions applied, by the same rule). With `reviewed=True` the report's fields and
        counts are the reviewed ones (what an export gives: the person's labels)."""
        fields = self._records(sample)
        if not fields:
            raise StoreError(f"no sample {sample!r} in {self.path}")
        runs = self.db.execute("SELECT DISTINCT r.id, r.created, r.model_file, r.model_sha256, r.class_names "
                               "FROM runs r JOIN fields f ON f.run_id = r.id WHERE f.sample = ? ORDER BY r.id",
                               (sample,)).fetchall()
        names = json.loads(runs[-1][4])
        decisions, by_field, revised = self._reviewed(sample, fields)
        shown = revised if reviewed else fields
        return {"fields": shown, "summary": Summary.of(shown, target_cells=target_cells).to_dict(),
                "samples": sample_summaries(shown, target_cells=target_cells),
                "reviewed": Summary.of(revised, target_cells=target_cells).to_dict(),
                "model_summary": Summary.of(fields, target_cells=target_cells).to_dict(),
                "review": review.status(fields, decisions, names[1]), "reviews": decisions,
                "decisions": {str(k): review.latest(v) for k, v in by_field.items()},
                "runs": [{"created": c, "model_file": m, "model_sha256": h} for _, c, m, h, _ in runs],
                "model": {"file": runs[-1][2], "weights_sha256": runs[-1][3], "class_names": names}}
