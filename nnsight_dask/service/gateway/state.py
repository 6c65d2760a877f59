"""What the gateway must not forget across a restart: statuses in sqlite, inline results in files.

Why both: statuses are small rows read and updated often (sqlite, one file, WAL journal); inline
results may be many megabytes, written once and read rarely (one JSON file per experiment, written
to a temporary name and renamed, so a file that exists is whole). A result file is written before
its row says COMPLETED, so a completed experiment always has its result. Persisted saves stay in
the Zarr store; their row keeps where (store URL and the experiment's prefix there).

On opening, experiments a previous gateway process left queued or running are marked FAILED with
the reason: nothing is silently lost, and nothing is left looking like it still runs.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

#: Statuses of an experiment; the last three are final.
RECEIVED, QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "RECEIVED", "QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
FINAL = (COMPLETED, FAILED, CANCELLED)
#: Columns of a row, in table order.
COLUMNS = ("id", "user", "deployment", "status", "submitted", "started", "ended", "error", "store_url",
           "store_prefix")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, deployment TEXT NOT NULL, status TEXT NOT NULL,
    submitted REAL NOT NULL, started REAL, ended REAL, error TEXT, store_url TEXT, store_prefix TEXT);
CREATE INDEX IF NOT EXISTS experiments_by_user ON experiments (user, submitted);
"""


class StateStore:
    """The gateway's sqlite database and result files under ``directory`` (thread-safe)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.results = self.directory / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.directory / "gateway.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: safe across process crashes, no fsync per commit
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def fail_unfinished(self, reason: str) -> int:
        """Mark every experiment not yet final as FAILED with ``reason``; returns how many."""
        error = json.dumps({"type": "ExperimentFailedError", "message": reason})
        with self._lock:
            cursor = self._db.execute(
                "UPDATE experiments SET status=?, ended=?, error=? WHERE status NOT IN (?, ?, ?)",
                (FAILED, time.time(), error, *FINAL))
            return cursor.rowcount

    def add(self, experiment: str, user: str, deployment: str, status: str = RECEIVED) -> None:
        with self._lock:
            self._db.execute("INSERT INTO experiments (id, user, deployment, status, submitted) VALUES (?, ?, ?, ?, ?)",
                             (experiment, user, deployment, status, time.time()))

    def update(self, experiment: str, **fields: Any) -> None:
        """Set columns of a row; ``error`` is a dict stored as JSON."""
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        unknown = set(fields) - set(COLUMNS[3:])
        if unknown:
            raise ValueError(f"no such column(s): {sorted(unknown)}")
        assignments = ", ".join(f"{name}=?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE experiments SET {assignments} WHERE id=?", (*fields.values(), experiment))

    def get(self, experiment: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM experiments WHERE id=?",
                                   (experiment,)).fetchone()
        return None if row is None else _row(row)

    def of_user(self, user: str, limit: int = 100) -> list[dict[str, Any]]:
        """A user's latest experiments, newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM experiments WHERE user=? "
                                    "ORDER BY submitted DESC LIMIT ?", (user, limit)).fetchall()
        return [_row(row) for row in rows]

    def save_result(self, experiment: str, payload: bytes) -> None:
        """Write an experiment's result document (before its row is marked COMPLETED)."""
        path = self.results / f"{experiment}.json"
        partial = path.with_suffix(".partial")
        partial.write_bytes(payload)
        os.replace(partial, path)

    def load_result(self, experiment: str) -> bytes | None:
        try:
            return (self.results / f"{experiment}.json").read_bytes()
        except FileNotFoundError:
            return None


def _row(values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values))
    row["error"] = json.loads(row["error"]) if row["error"] else None
    return row
