"""The trainer worker (``prelabel trainer``): takes fine-tune jobs from the queue and runs them.

One job at a time per process: claim it with a lease, train with the transfer engine, publish the
version, load it into Triton, record the result. A heartbeat thread renews the lease and stores
progress; when the queue answers "stop" (the job was cancelled, or this worker lost its lease)
training stops before the next batch. A worker killed outright leaves its lease to expire, and
the next claim resumes from the checkpoint saved after every epoch. Publishing happens once per
job: the version records the job id, and a retried job finds it instead of publishing again.
SIGTERM stops training at the next batch and hands the job back to the queue uncharged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prelabel import metrics
from prelabel.datasets.store import dataset_store
from prelabel.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PrelabelError,
    ResourceExhausted,
    Unavailable,
    volume_full,
)
from prelabel.queue import open_queue
from prelabel.queue.contract import CANCELLED, FAILED, JOB_ID, QUEUED, SUCCEEDED, Job, JobQueue, check_job_id
from prelabel.reachability import Reachability
from prelabel.settings import Settings
from prelabel.spec import check_scratch_trial
from prelabel.training import data, engine
from prelabel.training.publish import load_into_triton, publish, running_triton
from prelabel.triton.repository import repository_for

log = logging.getLogger("prelabel.trainer")
T = TypeVar("T")

# Errors that another attempt would meet again: the job fails at once instead of being retried.
PERMANENT = (InvalidArgument, NotFound, FailedPrecondition)
# The queue cannot be read or written now (down, or its disk full): wait and try again, never lose a job.
QUEUE_WAITS = (Unavailable, ResourceExhausted)


class Heartbeat(threading.Thread):
    """Renews the lease every third of it, and stores progress at most once a second."""

    MIN_GAP_S = 1.0

    def __init__(self, queue: JobQueue, job: Job, worker: str, lease_s: float) -> None:
        super().__init__(name=f"heartbeat-{job.id[:8]}", daemon=True)
        self.queue, self.job, self.worker, self.lease_s = queue, job, worker, lease_s
        self.progress, self.message = 0.0, "starting"
        self.go_on = True
        self._changed = threading.Event()
        self._done = threading.Event()

    def report(self, progress: float, message: str) -> None:
        self.progress, self.message = progress, message
        self._changed.set()

    def run(self) -> None:
        queue = Reachability(log)
        while not self._done.is_set():
            self._changed.wait(self.lease_s / 3)
            self._changed.clear()
            if self._done.is_set():
                return
            try:
                self.go_on = self.queue.heartbeat(self.job.id, self.worker, self.lease_s, self.progress, self.message)
                queue.back(f"job queue reachable again; job {self.job.id} heartbeats resumed")
            except QUEUE_WAITS as exc:
                queue.down(f"heartbeat for job {self.job.id} failed: {exc.message}; retrying")
            self._done.wait(self.MIN_GAP_S)

    def stop(self) -> None:
        self._done.set()
        self._changed.set()
        self.join()


class Trainer:
    def __init__(self, settings: Settings, name: str = "") -> None:
        check_scratch_trial(settings.trainer_scratch_trial, "PRELABEL_TRAINER_SCRATCH_TRIAL")  # at start, not per job
        self.settings = settings
        self.queue = open_queue(settings.queue)
        self.store = dataset_store(settings)
        self.repository = repository_for(settings)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()

    def run(self) -> None:
        """Take and run jobs until :attr:`stopping` is set."""
        log.info("trainer %s waiting for jobs on %s", self.name, _redacted(self.settings.queue))
        queue = Reachability(log)
        while not self.stopping.is_set():
            try:
                job = self.queue.claim(self.name, self.settings.job_lease_s)
                queue.back(f"job queue reachable again at {_redacted(self.settings.queue)}")
            except QUEUE_WAITS as exc:
                queue.down(f"{exc.message}; retrying every {self.settings.trainer_poll_s:.0f}s")
                job = None
            if job is None:
                self.stopping.wait(self.settings.trainer_poll_s)
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        try:
            check_job_id(job.id)  # it names the checkpoint folder: never a path from elsewhere
        except InvalidArgument as exc:
            log.error("refusing job %r: %s", job.id[:80], exc.message)
            self._end(job, FAILED, exc.message)
            return
        log.info("job %s: attempt %d of %d, %s", job.id, job.attempts, job.max_attempts, job.spec.description)
        started = time.monotonic()
        heartbeat = Heartbeat(self.queue, job, self.name, self.settings.job_lease_s)
        heartbeat.start()
        metrics.TRAINER_BUSY.set(1)
        metrics.LAST_PROGRESS.set(time.time())
        try:
            result, job_metrics = self._execute(job, heartbeat)
        except engine.Stopped:
            self._after_stop(job, heartbeat)
            return
        except PERMANENT as exc:
            self._end(job, FAILED, exc.message)
            return
        except Exception as exc:  # a bug or a lost resource: retried on another attempt (space may be freed)
            if full := volume_full(exc):
                log.error("job %s: attempt %d failed: %s [%s]", job.id, job.attempts, full.message, exc)
                exc = full
            else:
                log.exception("job %s: attempt %d failed", job.id, job.attempts)
            text = exc.message if isinstance(exc, PrelabelError) else f"{type(exc).__name__}: {exc}"
            self._end(job, QUEUED, f"attempt {job.attempts} failed: {text}")
            return
        finally:
            heartbeat.stop()
            metrics.TRAINER_BUSY.set(0)
        strategy = result["chosen_strategy"]
        metrics.JOB_DURATION.labels(strategy).observe(time.monotonic() - started)
        self._end(job, SUCCEEDED, "", result, job_metrics)

    def _execute(self, job: Job, heartbeat: Heartbeat) -> tuple[dict[str, Any], dict[str, float]]:
        spec = job.spec

        def should_stop() -> bool:
            return self.stopping.is_set() or not heartbeat.go_on

        def check() -> None:
            if should_stop():
                raise engine.Stopped("stopped before training")

        heartbeat.report(0.01, f"loading dataset {spec.dataset!r}")
        base = engine.load_base(self.repository, spec.base_model, spec.base_version)
        images, labels = self.store.examples(spec.dataset, spec.dataset_revision)
        examples = data.from_encoded(images, labels, base.preprocess, max_pixels=self.settings.max_image_pixels,
                                     interrupt=check)  # fmt: skip
        config = engine.TrainConfig(
            strategy=spec.strategy,
            freeze_first_k=spec.freeze_first_k,
            epochs=spec.epochs,
            learning_rate=spec.learning_rate,
            target_precision=spec.target_precision,
            seed=spec.seed,
            device=self.settings.trainer_device,
            scratch_trial=self.settings.trainer_scratch_trial,
        )

        def progress(p: engine.Progress) -> None:
            metrics.TRAINING_STEPS.inc(p.new_steps)
            if not math.isnan(p.images_per_s):
                metrics.TRAINING_SPEED.set(p.images_per_s)
            metrics.LAST_PROGRESS.set(time.time())
            heartbeat.report(0.05 + 0.85 * p.fraction, p.message)

        checkpoint = engine.Checkpoint(self.settings.checkpoints / check_job_id(job.id) / "training.pt",
                                       self.settings.checkpoint_every_s)  # fmt: skip
        result = engine.train(base, examples, config, progress, checkpoint, should_stop,
                              save_on_stop=self.stopping.is_set)  # fmt: skip
        # The heartbeat sees a cancel within a second; the queue itself is asked once more, since a
        # version published is a version the user said they did not want.
        if should_stop() or self.queue.get(job.id).cancel_requested:
            raise engine.Stopped("stopped before publishing")
        heartbeat.report(0.9, f"publishing a new version of {spec.output_model!r}")
        published = time.monotonic()
        version = publish(self.repository, spec.output_model, result, base, job.id)
        url = running_triton(self.settings)
        if url:
            heartbeat.report(0.95, f"loading {spec.output_model!r} version {version} into Triton")
            asyncio.run(load_into_triton(url, spec.output_model))
        metrics.PUBLISH_LATENCY.observe(time.monotonic() - published)
        metrics.VALIDATION_ACCURACY.set(result.metrics["val_accuracy"])
        return (
            {
                "model_version": str(version),
                "chosen_strategy": result.decision.chosen,
                "strategy_reason": result.decision.reason,
                "summary": result.summary,
            },
            result.metrics,
        )

    def _after_stop(self, job: Job, heartbeat: Heartbeat) -> None:
        if self.stopping.is_set():
            log.info("job %s: handing back to the queue (this worker is shutting down)", job.id)
            why = f"worker {self.name} shut down; waiting for another worker (training resumes from its checkpoint)"
            self._settle(lambda: self.queue.release(job.id, self.name, why))
            return
        current = self._settle(lambda: self.queue.get(job.id))
        if current.cancel_requested:
            self._end(job, CANCELLED, "")
        else:
            log.warning("job %s: lease lost to %s; leaving it", job.id, current.worker or "the queue")

    def _end(self, job: Job, state: str, error: str, result: dict[str, Any] | None = None,
             job_metrics: dict[str, float] | None = None) -> None:  # fmt: skip
        try:
            ended = self._settle(lambda: self.queue.finish(job.id, self.name, state, error, result, job_metrics))
        except (FailedPrecondition, NotFound) as exc:  # the lease was lost meanwhile, or the job is gone
            log.warning("job %s: %s", job.id, exc.message)
            return
        metrics.JOBS_ENDED.labels(ended.state).inc()
        log.info("job %s: %s%s", job.id, ended.state, f" ({ended.error})" if ended.error else "")
        if ended.state in (SUCCEEDED, FAILED, CANCELLED) and JOB_ID.match(job.id):
            shutil.rmtree(self.settings.checkpoints / job.id, ignore_errors=True)

    def _settle(self, call: Callable[[], T], give_up_s: float = 600.0) -> T:
        """Retry ``call`` while the queue is unreachable: a finished job's outcome must not be lost."""
        deadline, delay = time.monotonic() + give_up_s, 0.5
        while True:
            try:
                return call()
            except QUEUE_WAITS as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s; retrying in %.0fs", exc.message, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def _redacted(url: str) -> str:
    """The queue URL without a password."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if "@" in rest else url


def main(settings: Settings) -> int:
    """``prelabel trainer``: run until SIGTERM or SIGINT, then hand the current job back."""
    settings.configure_logging()
    try:
        trainer = Trainer(settings)
    except PrelabelError as exc:
        log.error("%s", exc.message)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: trainer.stopping.set())
    if settings.metrics_port >= 0:
        try:
            port = metrics.serve_metrics(settings.metrics_port, settings.metrics_address, metrics.TRAINER_REGISTRY)
        except PrelabelError as exc:
            log.error("%s", exc.message)
            return 1
        print(f"trainer {trainer.name}: metrics on http://{settings.metrics_address}:{port}/metrics", flush=True)
    trainer.run()
    log.info("trainer %s stopped", trainer.name)
    return 0
