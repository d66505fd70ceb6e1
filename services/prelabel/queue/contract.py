"""What every job queue backend guarantees, whatever it stores jobs in.

- ``submit`` is durable before it returns and idempotent by ``request_id``.
- ``claim`` hands a job to one worker with a lease; a job whose lease expires (its worker died) is
  claimed again, up to ``max_attempts`` claims, then FAILED with the last error: no poison loops.
- ``heartbeat`` renews the lease and stores progress; it tells the worker whether to go on.
- ``cancel``: a QUEUED job becomes CANCELLED at once; a RUNNING one is asked to stop and ends
  CANCELLED when its worker notices; a finished job is FAILED_PRECONDITION.
Every change bumps ``revision``, which ``WatchJob`` follows.
"""

from __future__ import annotations

import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from prelabel.errors import FailedPrecondition, InvalidArgument, quote
from prelabel.spec import JobSpec

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, RUNNING, *TERMINAL)
T = TypeVar("T")
JOB_ID = re.compile(r"[0-9a-f]{32}")  # Job.new's uuid4().hex; ids also name checkpoint folders


def check_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidArgument(f"job id {quote(job_id)} is not valid: job ids are 32 hexadecimal characters")
    return job_id


@dataclass
class Job:
    id: str
    spec: JobSpec
    request_id: str = ""
    state: str = QUEUED
    progress: float = 0.0
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # model_version, chosen_strategy, strategy_reason
    error: str = ""
    attempts: int = 0
    max_attempts: int = 3
    cancel_requested: bool = False
    worker: str = ""
    lease_expires_at: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    revision: int = 1

    @classmethod
    def new(cls, spec: JobSpec, request_id: str = "", max_attempts: int = 3) -> Job:
        return cls(id=uuid.uuid4().hex, spec=spec, request_id=request_id, max_attempts=max_attempts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # the spec too, as a plain dict

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["spec"] = JobSpec.from_dict(values["spec"])
        return cls(**values)


@dataclass
class QueueStats:
    depth: dict[str, int]  # jobs per state
    oldest_queued_age_s: float  # 0 when nothing waits
    expired_leases: int  # RUNNING jobs whose worker died, not yet claimed again


class JobQueue(ABC):
    @abstractmethod
    def submit(self, spec: JobSpec, request_id: str = "", max_attempts: int = 3) -> Job: ...

    @abstractmethod
    def get(self, job_id: str) -> Job:
        """The job, or NotFound."""

    @abstractmethod
    def list(self, state: str = "", page_size: int = 50, page_token: str = "") -> tuple[list[Job], str]:
        """Newest first; the token continues where the page ended ("" when there is no more)."""

    @abstractmethod
    def claim(self, worker: str, lease_s: float) -> Job | None:
        """The oldest QUEUED job, or a RUNNING one whose lease expired, now RUNNING for ``worker``."""

    @abstractmethod
    def _update(self, job_id: str, change: Callable[[Job], T]) -> tuple[Job, T]:
        """Apply ``change`` to the stored job atomically (NotFound if there is none); bump its revision."""

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float, message: str) -> bool:
        """Renew the lease and record progress; False: stop (lease lost or cancel requested)."""
        return self._update(job_id, lambda job: beat(job, worker, lease_s, progress, message, time.time()))[1]

    def finish(self, job_id: str, worker: str, state: str, error: str = "",
               result: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> Job:  # fmt: skip
        """End the worker's attempt: SUCCEEDED, CANCELLED, FAILED, or QUEUED to retry (if attempts remain)."""
        return self._update(job_id, lambda job: end(job, worker, state, error, result, metrics, time.time()))[0]

    def release(self, job_id: str, worker: str, message: str) -> Job:
        """Give a RUNNING job back to the queue without charging the attempt (the worker is shutting down)."""
        return self._update(job_id, lambda job: give_back(job, worker, message))[0]

    def cancel(self, job_id: str) -> Job:
        return self._update(job_id, lambda job: stop(job, time.time()))[0]

    @abstractmethod
    def stats(self, now: float) -> QueueStats:
        """Depth, backlog age and dead workers' jobs, for autoscaling and alerts."""

    def depth(self) -> dict[str, int]:
        """Jobs per state."""
        return self.stats(time.time()).depth


# The transitions, shared by every backend: each runs inside one atomic read-modify-write.


def take(job: Job, worker: str, lease_s: float, now: float) -> bool:
    """Claim ``job`` (QUEUED, or RUNNING with an expired lease); False if it is closed instead."""
    if job.state == RUNNING and job.cancel_requested:
        _cancelled(job, now)
        return False
    if job.state == RUNNING and job.attempts >= job.max_attempts:
        job.state, job.finished_at = FAILED, now
        job.error = job.error or f"its worker {job.worker} stopped answering on each of {job.attempts} attempts"
        return False
    job.state, job.worker, job.lease_expires_at = RUNNING, worker, now + lease_s
    job.attempts += 1
    job.started_at = job.started_at or now
    return True


def beat(job: Job, worker: str, lease_s: float, progress: float, message: str, now: float) -> bool:
    if job.state != RUNNING or job.worker != worker:
        return False
    job.lease_expires_at = now + lease_s
    job.progress, job.message = progress, message
    return not job.cancel_requested


def end(job: Job, worker: str, state: str, error: str, result: dict[str, Any] | None,
        metrics: dict[str, float] | None, now: float) -> None:  # fmt: skip
    if job.state != RUNNING or job.worker != worker:
        raise FailedPrecondition(f"job {job.id} is not running for worker {worker} (it is {job.state})")
    if state == QUEUED and job.cancel_requested:  # a failed attempt of a cancelled job is not retried
        state = CANCELLED
    elif state == QUEUED and job.attempts >= job.max_attempts:
        state = FAILED
    if state == CANCELLED:
        _cancelled(job, now)
    job.state, job.error, job.lease_expires_at = state, error, 0.0
    job.result.update(result or {})
    job.metrics.update(metrics or {})
    if state == SUCCEEDED and job.result.get("summary"):
        job.message = job.result["summary"]  # what the model achieved, and what auto-accept promises
    if state == SUCCEEDED:
        job.progress = 1.0
    if state in TERMINAL:
        job.finished_at = now


def give_back(job: Job, worker: str, message: str) -> None:
    if job.state != RUNNING or job.worker != worker:
        raise FailedPrecondition(f"job {job.id} is not running for worker {worker} (it is {job.state})")
    job.worker, job.lease_expires_at, job.message = "", 0.0, message
    if job.cancel_requested:
        _cancelled(job, time.time())
    else:
        job.state, job.attempts = QUEUED, job.attempts - 1


def stop(job: Job, now: float) -> None:
    if job.state in TERMINAL:
        raise FailedPrecondition(f"job {job.id} already ended {job.state}; there is nothing to cancel")
    if job.state == QUEUED:
        _cancelled(job, now)
    else:
        job.cancel_requested = True
        job.message = "cancelling: the worker stops at its next heartbeat"


def _cancelled(job: Job, now: float) -> None:
    """CANCELLED, with a message that says how far it got: the last progress message would read as if it ran on."""
    job.state, job.finished_at = CANCELLED, now
    job.message = f"cancelled at {job.progress:.0%}" if job.started_at else "cancelled before it started"
