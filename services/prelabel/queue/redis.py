"""The job queue on Redis, for many machines: every change is one optimistic MULTI/EXEC.

A job is one JSON document (``prelabel:job:<id>``) plus its id in sorted sets: all jobs and jobs
per state (by creation time, for listing and depth), and running jobs by lease expiry (to find dead
workers). A change WATCHes the job, applies the shared transition from :mod:`.contract`, and
writes document and sets in one MULTI/EXEC; if anyone else changed the job meanwhile, EXEC fails
and the change is retried on the new document, so two workers never both claim a job. Redis should
run with persistence (AOF) for jobs to survive a Redis restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import redis

from prelabel.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from prelabel.queue.contract import QUEUED, RUNNING, STATES, Job, JobQueue, QueueStats, take
from prelabel.spec import JobSpec

T = TypeVar("T")
P = "prelabel:"


class RedisQueue(JobQueue):
    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=10, retry_on_timeout=True)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.ConnectionError as exc:
            raise Unavailable(f"the job queue at {self.url} is unreachable ({exc}); check Redis and retry") from exc
        except redis.exceptions.OutOfMemoryError as exc:  # at maxmemory (noeviction): a refused MULTI applies nothing
            raise ResourceExhausted(
                f"the job queue at {self.url} refuses writes: Redis is at its maxmemory ({exc}); raise Redis's "
                "maxmemory (and its memory limit), then retry"
            ) from exc

    def _write(self, pipe: Any, job: Job, old_state: str | None) -> None:
        pipe.multi()
        pipe.set(f"{P}job:{job.id}", json.dumps(job.to_dict()))
        pipe.zadd(f"{P}all", {job.id: job.created_at})
        if old_state and old_state != job.state:
            pipe.zrem(f"{P}state:{old_state}", job.id)
        pipe.zadd(f"{P}state:{job.state}", {job.id: job.created_at})
        if job.state == RUNNING:
            pipe.zadd(f"{P}leases", {job.id: job.lease_expires_at})
        else:
            pipe.zrem(f"{P}leases", job.id)
        if job.request_id:
            pipe.set(f"{P}request:{job.request_id}", job.id)

    def _update(self, job_id: str, change: Callable[[Job], T]) -> tuple[Job, T]:
        key = f"{P}job:{job_id}"

        def transaction(pipe: Any) -> tuple[Job, T]:
            raw = pipe.get(key)
            if raw is None:
                raise NotFound(f"job {job_id!r} does not exist; ListJobs shows the jobs there are")
            job = Job.from_dict(json.loads(raw))
            old = job.state
            outcome = change(job)
            job.revision += 1
            self._write(pipe, job, old)
            return job, outcome

        result: tuple[Job, T] = self._call(lambda: self.redis.transaction(transaction, key, value_from_callable=True))
        return result

    def submit(self, spec: JobSpec, request_id: str = "", max_attempts: int = 3) -> Job:
        job = Job.new(spec, request_id, max_attempts)

        def transaction(pipe: Any) -> Job:
            if request_id:
                existing = pipe.get(f"{P}request:{request_id}")
                if existing is not None:
                    return Job.from_dict(json.loads(pipe.get(f"{P}job:{existing.decode()}")))
            self._write(pipe, job, None)
            return job

        watched = [f"{P}request:{request_id}"] if request_id else []
        submitted: Job = self._call(lambda: self.redis.transaction(transaction, *watched, value_from_callable=True))
        return submitted

    def get(self, job_id: str) -> Job:
        raw = self._call(lambda: self.redis.get(f"{P}job:{job_id}"))
        if raw is None:
            raise NotFound(f"job {job_id!r} does not exist; ListJobs shows the jobs there are")
        return Job.from_dict(json.loads(raw))

    def list(self, state: str = "", page_size: int = 50, page_token: str = "") -> tuple[list[Job], str]:
        if state and state not in STATES:
            raise InvalidArgument(f"unknown job state {state!r}; use one of {', '.join(STATES)}")
        offset = int(page_token or 0)
        key = f"{P}state:{state}" if state else f"{P}all"
        ids = self._call(lambda: self.redis.zrevrange(key, offset, offset + page_size))
        jobs = [self.get(i.decode()) for i in ids[:page_size]]
        return jobs, str(offset + page_size) if len(ids) > page_size else ""

    def claim(self, worker: str, lease_s: float) -> Job | None:
        while True:
            now = time.time()

            def attempt(job: Job, now: float = now) -> bool:
                # Someone may have claimed it since we looked: only a claimable job is taken.
                return self._claimable(job, now) and take(job, worker, lease_s, now)

            candidates = [c.decode() for c in self._call(partial(self._oldest_claimable, now))]
            if not candidates:
                return None
            for job_id in candidates:
                job, taken = self._update(job_id, attempt)
                if taken:
                    return job

    def _oldest_claimable(self, now: float) -> Sequence[bytes]:
        expired = self.redis.zrangebyscore(f"{P}leases", "-inf", now, start=0, num=1)
        return [*expired, *self.redis.zrange(f"{P}state:{QUEUED}", 0, 0)]

    @staticmethod
    def _claimable(job: Job, now: float) -> bool:
        return job.state == QUEUED or (job.state == RUNNING and job.lease_expires_at < now)

    def stats(self, now: float) -> QueueStats:
        def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for state in STATES:
                pipe.zcard(f"{P}state:{state}")
            pipe.zrange(f"{P}state:{QUEUED}", 0, 0, withscores=True)
            pipe.zcount(f"{P}leases", "-inf", f"({now}")
            return list(pipe.execute())

        *counts, oldest, expired = self._call(read)
        age = max(0.0, now - oldest[0][1]) if oldest else 0.0
        return QueueStats({s: int(n) for s, n in zip(STATES, counts, strict=True)}, age, int(expired))
