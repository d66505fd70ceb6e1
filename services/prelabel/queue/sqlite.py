"""The embedded job queue: one SQLite file, WAL journal, ``synchronous=FULL`` (durable on return).

Each operation opens its own connection and runs in one ``BEGIN IMMEDIATE`` transaction, so any
number of threads and processes (gateway, trainers) share the file safely and a claim is atomic.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from prelabel.errors import InvalidArgument, NotFound, PrelabelError, Unavailable, volume_full
from prelabel.queue.contract import QUEUED, RUNNING, STATES, Job, JobQueue, QueueStats, take
from prelabel.spec import JobSpec

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    lease_expires_at REAL NOT NULL DEFAULT 0,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs(state, created_at);
"""


class SQLiteQueue(JobQueue):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # persistent: set once per file
                db.executescript(SCHEMA)
            finally:
                db.close()
        except sqlite3.OperationalError as exc:
            raise self._unusable(exc) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                db.execute("PRAGMA synchronous=FULL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.OperationalError as exc:  # locked beyond the timeout, disk full, unreadable file
            raise self._unusable(exc) from exc

    def _unusable(self, exc: sqlite3.OperationalError) -> PrelabelError:
        return volume_full(exc, self.path.parent) or Unavailable(
            f"the job queue {self.path} cannot be used ({exc}); check the disk and retry"
        )

    @staticmethod
    def _save(db: sqlite3.Connection, job: Job) -> None:
        db.execute(
            "INSERT OR REPLACE INTO jobs (id, request_id, state, created_at, lease_expires_at, doc) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (job.id, job.request_id, job.state, job.created_at, job.lease_expires_at, json.dumps(job.to_dict())),
        )

    @staticmethod
    def _load(db: sqlite3.Connection, job_id: str) -> Job:
        row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist; ListJobs shows the jobs there are")
        return Job.from_dict(json.loads(row[0]))

    def _update(self, job_id: str, change: Callable[[Job], T]) -> tuple[Job, T]:
        with self._transaction() as db:
            job = self._load(db, job_id)
            outcome = change(job)
            job.revision += 1
            self._save(db, job)
            return job, outcome

    def submit(self, spec: JobSpec, request_id: str = "", max_attempts: int = 3) -> Job:
        with self._transaction() as db:
            if request_id:
                row = db.execute("SELECT doc FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return Job.from_dict(json.loads(row[0]))
            job = Job.new(spec, request_id, max_attempts)
            self._save(db, job)
            return job

    def get(self, job_id: str) -> Job:
        with self._transaction() as db:
            return self._load(db, job_id)

    def list(self, state: str = "", page_size: int = 50, page_token: str = "") -> tuple[list[Job], str]:
        if state and state not in STATES:
            raise InvalidArgument(f"unknown job state {state!r}; use one of {', '.join(STATES)}")
        offset = int(page_token or 0)
        query = "SELECT doc FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY created_at DESC, id"
        with self._transaction() as db:
            rows = db.execute(query + " LIMIT ? OFFSET ?", (*([state] if state else []), page_size + 1, offset))
            jobs = [Job.from_dict(json.loads(r[0])) for r in rows]
        more = len(jobs) > page_size
        return jobs[:page_size], str(offset + page_size) if more else ""

    def claim(self, worker: str, lease_s: float) -> Job | None:
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT doc FROM jobs WHERE state = ? OR (state = ? AND lease_expires_at < ?) ORDER BY created_at, id",
                (QUEUED, RUNNING, now),
            ).fetchall()
            for (doc,) in rows:
                job = Job.from_dict(json.loads(doc))
                taken = take(job, worker, lease_s, now)
                job.revision += 1
                self._save(db, job)
                if taken:
                    return job
        return None

    def stats(self, now: float) -> QueueStats:
        with self._transaction() as db:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            oldest = db.execute("SELECT MIN(created_at) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[0]
            expired = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND lease_expires_at < ?", (RUNNING, now)
            ).fetchone()[0]
        return QueueStats({s: int(counts.get(s, 0)) for s in STATES}, max(0.0, now - oldest) if oldest else 0.0,
                          int(expired))  # fmt: skip
