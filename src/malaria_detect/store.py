"""The record that lasts: every analysed sample in an embedded SQLite database (standard library
`sqlite3`, write-ahead log), so nothing is lost when the command ends or the laptop restarts.

    db = Store()                      # MALARIA_DETECT_DB, else the user's data directory
    db.save_report(report)            # a smear report: one run, its fields (objects and counts inside)
    db.samples(search="slide")        # [{"sample", "created", "updated", "n_fields", "n_cells", ...}]
    db.sample("slide-7")              # the smear report of every field of that sample, pooled again

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

from .counting import TARGET_CELLS, Summary, sample_summaries
from .errors import MalariaDetectError

SCHEMA_VERSION = 1
MIGRATIONS = {  # version -> statements that bring the previous version to it
    1: ["CREATE TABLE samples (id TEXT PRIMARY KEY, created TEXT NOT NULL, updated TEXT NOT NULL)",
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, created TEXT NOT NULL, source TEXT NOT NULL, model_file TEXT, "
        "model_sha256 TEXT, field_threshold REAL, class_names TEXT)",
        "CREATE TABLE fields (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), "
        "sample TEXT NOT NULL REFERENCES samples(id), image TEXT NOT NULL, error TEXT, record TEXT NOT NULL)",
        "CREATE INDEX fields_sample ON fields(sample)", "CREATE INDEX samples_updated ON samples(updated)"],
}
UNNAMED = "(unnamed)"  # the sample of fields analysed without one


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
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the samples database ({e})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _migrate(self) -> None:
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

    def save_report(self, report: dict, source: str = "cli") -> int:
        """Store a smear report's fields as one run; returns the run's id. Fields without a sample go to
        the sample '(unnamed)'."""
        model, now = report.get("model", {}), _now()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            run = self.db.execute("INSERT INTO runs (created, source, model_file, model_sha256, field_threshold, "
                                  "class_names) VALUES (?, ?, ?, ?, ?, ?)",
                                  (now, source, model.get("file"), model.get("weights_sha256"), model.get("threshold"),
                                   json.dumps(model.get("class_names") or ["Uninfected", "Parasitized"])))
            for f in report["fields"]:
                sample = f.get("sample") or UNNAMED
                self.db.execute("INSERT INTO samples (id, created, updated) VALUES (?, ?, ?) "
                                "ON CONFLICT(id) DO UPDATE SET updated = excluded.updated", (sample, now, now))
                self.db.execute("INSERT INTO fields (run_id, sample, image, error, record) VALUES (?, ?, ?, ?, ?)",
                                (run.lastrowid, sample, str(f["image"]), f.get("error"), json.dumps(f)))
            self.db.execute("COMMIT")
            return run.lastrowid
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: the report could not be saved ({e}); nothing of it was written") from None

    def _records(self, sample: str) -> list[dict]:
        return [json.loads(r) for (r,) in self.db.execute("SELECT record FROM fields WHERE sample = ? ORDER BY id",
                                                            (sample,))]

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
            s = Summary.of(self._records(sid)).to_dict()
            out.append({"sample": sid, "created": created, "updated": updated} | s)
        return out

    def sample(self, sample: str, target_cells: int = TARGET_CELLS) -> dict:
        """The smear report of every stored field of `sample` (raises StoreError when there is none)."""
        fields = self._records(sample)
        if not fields:
            raise StoreError(f"no sample {sample!r} in {self.path}")
        runs = self.db.execute("SELECT DISTINCT r.id, r.created, r.model_file, r.model_sha256, r.class_names "
                               "FROM runs r JOIN fields f ON f.run_id = r.id WHERE f.sample = ? ORDER BY r.id",
                               (sample,)).fetchall()
        return {"fields": fields, "summary": Summary.of(fields, target_cells=target_cells).to_dict(),
                "samples": sample_summaries(fields, target_cells=target_cells),
                "runs": [{"created": c, "model_file": m, "model_sha256": h} for _, c, m, h, _ in runs],
                "model": {"file": runs[-1][2], "weights_sha256": runs[-1][3], "class_names": json.loads(runs[-1][4])}}
