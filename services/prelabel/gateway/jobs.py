"""Fine-tune jobs behind the gateway: checks requests, then talks to the queue.

Queue and store calls block (SQLite, Redis, files), so they run in worker threads, off the event
loop. An unreachable queue is UNAVAILABLE for the call, and logged once when it goes away and once
when it comes back. ``WatchJob`` follows a job's ``revision``: every change is sent, in order,
until a terminal state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from prelabel.datasets.store import MIN_PER_CLASS, DatasetStore
from prelabel.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, parse_number
from prelabel.gateway.protos import enum_name, job_to_pb
from prelabel.names import validate_name
from prelabel.queue.contract import TERMINAL, JobQueue, check_job_id
from prelabel.reachability import Reachability
from prelabel.settings import Settings
from prelabel.spec import AUTO, DEFAULT_TARGET_PRECISION, JobSpec
from prelabel.triton.repository import ModelRepository
from prelabel.v1 import prelabel_pb2 as pb

log = logging.getLogger("prelabel.gateway")
T = TypeVar("T")

MAX_REQUEST_ID = 200
MAX_EPOCHS = 1000
MAX_PAGE_SIZE = 1000
WATCH_POLL_S = 0.25


class Jobs:
    def __init__(self, settings: Settings, queue: JobQueue, store: DatasetStore, repository: ModelRepository) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.repository = repository
        self._queue = Reachability(log)  # not self.queue: whether it answers

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            value = await asyncio.to_thread(fn, *args)
        except Unavailable as exc:
            self._queue.down(f"job queue unreachable: {exc.message}")
            raise
        self._queue.back("job queue reachable again")
        return value

    async def create(self, request: pb.CreateFineTuneJobRequest) -> pb.Job:
        spec = await asyncio.to_thread(self._spec, request)
        job = await self._call(self.queue.submit, spec, request.request_id, self.settings.job_max_attempts)
        log.info("job %s: %s (request_id %r)", job.id, job.state, request.request_id)
        return job_to_pb(job)

    def _spec(self, request: pb.CreateFineTuneJobRequest) -> JobSpec:
        """The job as the trainer will run it: names resolved, the dataset pinned to its current revision.

        The request itself is checked before anything is looked up, so that a bad field is always
        INVALID_ARGUMENT, never NOT_FOUND or FAILED_PRECONDITION about something else.
        """
        validate_name(request.dataset, "dataset")
        base = request.base_model or self.settings.default_model
        validate_name(base, "base_model")
        if not request.output_model:
            raise InvalidArgument("output_model is required: the name to publish the fine-tuned model as")
        validate_name(request.output_model, "output_model")
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is {len(request.request_id)} characters; use at most {MAX_REQUEST_ID}")
        if request.freeze_first_k < 0:
            raise InvalidArgument(f"freeze_first_k={request.freeze_first_k} must be 0 (the trainer chooses) or more")
        if not 0 <= request.epochs <= MAX_EPOCHS:
            raise InvalidArgument(f"epochs={request.epochs} must be 0 (the strategy's default) to {MAX_EPOCHS}")
        if not 0 <= request.learning_rate < 1:
            raise InvalidArgument(f"learning_rate={request.learning_rate} must be 0 (the default) or in (0, 1)")
        if not 0 <= request.target_precision < 1:
            raise InvalidArgument(
                f"target_precision={request.target_precision} must be 0 ({DEFAULT_TARGET_PRECISION}) or in (0, 1)"
            )
        strategy = enum_name(pb.Strategy, request.strategy, "strategy") or AUTO
        info = self.store.info(request.dataset)
        few = {c: n for c, n in info.class_counts.items() if n < MIN_PER_CLASS}
        if len(info.class_counts) < 2 or few:
            raise FailedPrecondition(
                f"dataset {info.name!r} has {info.class_counts or 'no examples'}; fine-tuning needs at least 2 "
                f"classes with {MIN_PER_CLASS} examples each: upload more with UploadExamples"
            )
        versions = self.repository.versions(base)
        if not versions:
            raise NotFound(f"base_model {base!r} is not in the model repository; ListModels shows the models there are")
        return JobSpec(
            dataset=info.name,
            dataset_revision=info.revision,
            base_model=base,
            base_version=max(versions),
            output_model=request.output_model,
            strategy=strategy,
            freeze_first_k=request.freeze_first_k,
            epochs=request.epochs,
            learning_rate=request.learning_rate,
            target_precision=request.target_precision or DEFAULT_TARGET_PRECISION,
        )

    async def get(self, job_id: str) -> pb.Job:
        return job_to_pb(await self._call(self.queue.get, check_job_id(job_id)))

    async def list(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        state = enum_name(pb.JobState, request.state, "state")
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size={request.page_size} must be 0 (50) to {MAX_PAGE_SIZE}")
        if request.page_token:
            parse_number(request.page_token, "page_token", "send one that ListJobs returned, or none")
        jobs, token = await self._call(self.queue.list, state, request.page_size or 50, request.page_token)
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    async def cancel(self, job_id: str) -> pb.Job:
        job = await self._call(self.queue.cancel, check_job_id(job_id))
        log.info("job %s: cancel requested (%s)", job.id, job.state)
        return job_to_pb(job)

    async def watch(self, job_id: str) -> AsyncIterator[pb.Job]:
        """The job now, then after every change, ending with its terminal state."""
        job_id, revision = check_job_id(job_id), 0
        while True:
            job = await self._call(self.queue.get, job_id)
            if job.revision != revision:
                revision = job.revision
                yield job_to_pb(job)
            if job.state in TERMINAL:
                return
            await asyncio.sleep(WATCH_POLL_S)
