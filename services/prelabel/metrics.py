"""The one Prometheus registry of a Prelabel process, and every metric in it.

Names start with ``prelabel_``, values are in base units (seconds, bytes), and labels have bounded
cardinality: gRPC method and code, model name, a fixed set of error reasons.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prelabel.errors import Unavailable

if TYPE_CHECKING:
    from prelabel.queue.contract import JobQueue

REGISTRY = CollectorRegistry()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RPCS = Counter(
    "prelabel_grpc_requests", "gRPC calls handled, by method and status code.", ["method", "code"], registry=REGISTRY
)
RPC_LATENCY = Histogram(
    "prelabel_grpc_request_duration_seconds",
    "gRPC call latency, by method.",
    ["method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
# multiprocess_mode: how gateway workers' values add up (prelabel.gateway.workers); one process ignores it
IN_FLIGHT = Gauge(
    "prelabel_grpc_in_flight_requests", "gRPC calls being handled now.", ["method"], registry=REGISTRY,
    multiprocess_mode="livesum",
)  # fmt: skip
OPEN_STREAMS = Gauge(
    "prelabel_grpc_open_streams", "Streaming gRPC calls open now (PredictStream, WatchJob...).", ["method"],
    registry=REGISTRY, multiprocess_mode="livesum",
)  # fmt: skip
IMAGES = Counter("prelabel_images_predicted", "Images that got a prediction, by model.", ["model"], registry=REGISTRY)
IMAGE_BYTES = Counter("prelabel_image_bytes", "Encoded image bytes received for prediction.", registry=REGISTRY)
IMAGE_ERRORS = Counter(
    "prelabel_image_errors", "Images answered with a per-image error, by reason.", ["reason"], registry=REGISTRY
)
TRITON_LATENCY = Histogram(
    "prelabel_triton_request_duration_seconds",
    "Latency of inference calls to Triton, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TRITON_ERRORS = Counter(
    "prelabel_triton_errors", "Failed calls to Triton, by status code.", ["code"], registry=REGISTRY
)
TRITON_UP = Gauge(
    "prelabel_triton_up", "1 while Triton answers and the default model is ready.", registry=REGISTRY,
    multiprocess_mode="livemin",  # with several gateway workers: 0 as soon as one of them finds Triton down
)  # fmt: skip
TRITON_RESTARTS = Counter(
    "prelabel_triton_restarts", "Times the embedded Triton was restarted after exiting.", registry=REGISTRY
)

# Fine-tuning: datasets, the job queue, trainers
EXAMPLES_UPLOADED = Counter(
    "prelabel_examples_uploaded", "Labelled examples accepted by UploadExamples.", registry=REGISTRY
)
JOBS_ENDED = Counter(
    "prelabel_jobs_ended", "Job attempts ended by this trainer, by resulting state (QUEUED: retried).", ["state"],
    registry=REGISTRY,
)  # fmt: skip
JOB_DURATION = Histogram(
    "prelabel_job_duration_seconds",
    "Wall time of successful fine-tune attempts, by chosen strategy.",
    ["strategy"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
    registry=REGISTRY,
)
PUBLISH_LATENCY = Histogram(
    "prelabel_publish_duration_seconds", "Time to publish a version and load it into Triton.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY,
)  # fmt: skip
TRAINING_STEPS = Counter("prelabel_training_steps", "Optimisation steps completed by this trainer.", registry=REGISTRY)
# liveall: the trainers of `prelabel serve` report through its /metrics, one series per trainer process
# (label pid), gone when that process is (PrelabelTrainerStuck compares busy and progress per trainer).
TRAINING_SPEED = Gauge(
    "prelabel_training_images_per_second", "Training images per second since the last progress report.",
    registry=REGISTRY, multiprocess_mode="liveall",
)  # fmt: skip
TRAINER_BUSY = Gauge(
    "prelabel_trainer_busy", "1 while this trainer runs a job.", registry=REGISTRY, multiprocess_mode="liveall"
)
LAST_PROGRESS = Gauge(
    "prelabel_trainer_last_progress_timestamp_seconds", "When this trainer last reported progress (Unix time).",
    registry=REGISTRY, multiprocess_mode="liveall",
)  # fmt: skip
VALIDATION_ACCURACY = Gauge(
    "prelabel_last_validation_accuracy",
    "Cross-validated (out-of-fold) accuracy of the last model this trainer published.",
    registry=REGISTRY, multiprocess_mode="liveall",
)  # fmt: skip
TRAINER_METRICS = (JOBS_ENDED, JOB_DURATION, PUBLISH_LATENCY, TRAINING_STEPS, TRAINING_SPEED, TRAINER_BUSY,
                   LAST_PROGRESS, VALIDATION_ACCURACY)  # fmt: skip


class QueueCollector(Collector):
    """The shared queue, read at scrape time, so that every gateway reports it (for alerts and KEDA)."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("prelabel_queue_jobs", "Fine-tune jobs in the queue, by state.", labels=["state"])
        age = GaugeMetricFamily(
            "prelabel_queue_oldest_queued_age_seconds", "How long the oldest QUEUED job has waited (0: none)."
        )
        expired = GaugeMetricFamily(
            "prelabel_queue_expired_leases", "RUNNING jobs whose worker stopped heartbeating and that await a claim."
        )
        try:
            stats = self.queue.stats(time.time())
        except Exception:  # an unreachable queue must not break the scrape of everything else
            return
        for state, count in stats.depth.items():
            jobs.add_metric([state], count)
        age.add_metric([], stats.oldest_queued_age_s)
        expired.add_metric([], stats.expired_leases)
        yield from (jobs, age, expired)


class VolumeCollector(Collector):
    """Free and total space where Prelabel writes (datasets, checkpoints, the SQLite queue, model versions),
    read at scrape time: uploads and fine-tunes fail RESOURCE_EXHAUSTED once it is full, and every
    fine-tune adds a version. One series per filesystem, labelled with the first of ``folders`` on it."""

    def __init__(self, *folders: Path) -> None:
        self.folders = folders

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "prelabel_data_volume_free_bytes", "Bytes that Prelabel can still write on the volume.", labels=["path"]
        )
        size = GaugeMetricFamily("prelabel_data_volume_size_bytes", "Size of the volume in bytes.", labels=["path"])
        seen: set[int] = set()
        for folder in self.folders:
            try:  # a folder not made yet (nothing uploaded) is not an error
                device, stats = folder.stat().st_dev, os.statvfs(folder)
            except OSError:
                continue
            if device not in seen:
                seen.add(device)
                free.add_metric([str(folder)], stats.f_bavail * stats.f_frsize)  # what a non-root user may use
                size.add_metric([str(folder)], stats.f_blocks * stats.f_frsize)
        yield from (free, size)


_collectors: dict[str, Collector] = {}


def watch(name: str, collector: Collector) -> None:
    """Register ``collector`` under ``name``, replacing the one registered before (tests start many gateways)."""
    if name in _collectors:
        REGISTRY.unregister(_collectors[name])
    _collectors[name] = collector
    REGISTRY.register(collector)


# The Label Studio adapter (`prelabel labelstudio`)
LS_REQUESTS = Counter(
    "prelabel_labelstudio_requests", "HTTP calls from Label Studio, by path and status.", ["path", "status"],
    registry=REGISTRY,
)  # fmt: skip
LS_LATENCY = Histogram(
    "prelabel_labelstudio_request_duration_seconds", "Latency of calls from Label Studio, by path.", ["path"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
LS_TASKS = Counter(
    "prelabel_labelstudio_tasks", "Tasks answered by /predict: labelled, empty (no project choice), failed (image).",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
LS_WEBHOOKS = Counter("prelabel_labelstudio_webhooks", "Webhook events received, by action.", ["action"],
                      registry=REGISTRY)  # fmt: skip
LS_TRAINING = Counter(
    "prelabel_labelstudio_training_runs", "Training runs the adapter followed to their end, by outcome.", ["outcome"],
    registry=REGISTRY,
)  # fmt: skip
LS_JOB_PROGRESS = Gauge(
    "prelabel_labelstudio_job_progress", "Progress (0-1) of the last fine-tune job followed, by project.", ["project"],
    registry=REGISTRY,
)  # fmt: skip
LABELSTUDIO_METRICS = (LS_REQUESTS, LS_LATENCY, LS_TASKS, LS_WEBHOOKS, LS_TRAINING, LS_JOB_PROGRESS)


# Child processes (gateway workers, the trainers of `prelabel serve`) write their metrics to files in this
# folder (prometheus_client's multiprocess mode); their parent serves them.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Families(Collector):
    """``source``'s metric families whose names are in ``names`` (``inside``) or are not."""

    def __init__(self, source: Collector, names: set[str], inside: bool) -> None:
        self.source, self.names, self.inside = source, names, inside

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.source.collect() if (family.name in self.names) == self.inside)


def names_of(*collectors: Collector) -> set[str]:
    return {family.name for collector in collectors for family in collector.collect()}


def multiprocess_families(folder: Path, names: set[str], inside: bool) -> Families:
    """The metrics that child processes write to ``folder``, only (``inside``) or except ``names``.

    Every process imports this module, so every child writes every unlabelled metric, idle or not: a
    gateway worker a trainer's ``prelabel_trainer_busy``, a trainer the gateway's counters. Each family
    must come from the one kind of process that measures it, or the exposition repeats it.
    """
    written = multiprocess.MultiProcessCollector(None, path=str(folder))  # type: ignore[no-untyped-call]
    return Families(written, names, inside)


def with_trainers(registry: CollectorRegistry, folder: Path) -> CollectorRegistry:
    """``registry`` (a gateway's, which holds no trainer metrics) plus those of the trainers writing to ``folder``."""
    merged = CollectorRegistry()
    merged.register(registry)
    merged.register(multiprocess_families(folder, names_of(*TRAINER_METRICS), inside=True))
    return merged


def _view(names: set[str], inside: bool) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(Families(REGISTRY, names, inside))
    return registry


# What each kind of process exposes: live views of REGISTRY. Every process defines every metric (one
# module), and an idle copy of another kind's reads as a fact: a trainer's or the Label Studio adapter's
# prelabel_triton_up 0 would draw a Triton that is down on the dashboard, a gateway's
# prelabel_trainer_busy 0 a trainer. The gateway's includes the queue and the models that it reads (``watch``).
GATEWAY_REGISTRY = _view(names_of(*TRAINER_METRICS, *LABELSTUDIO_METRICS), inside=False)
TRAINER_REGISTRY = _view(names_of(*TRAINER_METRICS), inside=True)
LABELSTUDIO_REGISTRY = _view(names_of(*LABELSTUDIO_METRICS), inside=True)


def serve_metrics(port: int, host: str, registry: CollectorRegistry) -> int:
    """Expose ``/metrics`` on ``host:port`` (0 picks a port); returns the port."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # the usual cause: a gateway and a trainer on one machine, both on the default
        raise cannot_serve(host, port, str(exc.strerror or exc)) from None
    return int(server.server_port)


def cannot_serve(host: str, port: int, why: str) -> Unavailable:
    """What to do when the metrics port is taken."""
    return Unavailable(
        f"cannot serve /metrics on {host}:{port} ({why}); every Prelabel process on one machine needs a metrics "
        "port of its own: pass --metrics-port N (PRELABEL_METRICS_PORT), 0 for any free port, or -1 for no /metrics"
    )
