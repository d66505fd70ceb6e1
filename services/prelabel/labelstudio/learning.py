"""Learning from a project's annotations: pull them, sync them to a Prelabel dataset, fine-tune, follow the job.

Idempotent from end to end, so that a repeated trigger or an adapter restarted mid-way loses and
double-counts nothing: the upload *replaces* the dataset ``labelstudio-<project>`` with the project's
current annotations (a relabel follows the latest annotation, a deleted one leaves), and the job's
``request_id`` is a digest of exactly what it trains on, so the same annotations give the same job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from datetime import datetime
from typing import Any

import grpc

from prelabel import metrics
from prelabel.datasets.store import MIN_PER_CLASS
from prelabel.labelstudio import api, config
from prelabel.labelstudio.backend import MODEL_PREFIX, Backend, Project, project_id, project_model
from prelabel.v1 import prelabel_pb2 as pb

log = logging.getLogger("prelabel.labelstudio")

ANNOTATION_EVENTS = {"ANNOTATION_CREATED": 1, "ANNOTATION_UPDATED": 1, "ANNOTATIONS_CREATED": 1}


def latest_choice(task: dict[str, Any], project: config.ImageClassification) -> str | None:
    """The choice of the task's latest annotation that is not cancelled; None if it has none."""

    def when(annotation: dict[str, Any]) -> tuple[datetime, int]:
        stamp = annotation.get("updated_at") or annotation.get("created_at") or "1970-01-01T00:00:00+00:00"
        try:
            moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            moment = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
        return moment, int(annotation.get("id") or 0)

    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not annotations:
        return None
    for item in max(annotations, key=when).get("result") or []:
        if item.get("type") == "choices" and item.get("from_name") == project.from_name:
            chosen = (item.get("value") or {}).get("choices") or []
            if chosen and chosen[0] in project.choices:
                return str(chosen[0])
    return None


def request_id(project: str, base: str, strategy: int, examples: list[tuple[str, bytes, str]]) -> str:
    """The same annotations, base and strategy always make the same id: a repeated trigger is harmless."""
    digest = hashlib.sha256(f"{base}\n{strategy}\n".encode())
    for line in sorted(f"{hashlib.sha256(content).hexdigest()}\t{label}" for _, content, label in examples):
        digest.update(line.encode() + b"\n")
    return f"{MODEL_PREFIX}{project}-{digest.hexdigest()[:32]}"


class Learner:
    """Starts at most one sync-and-train per project at a time; a trigger during one runs it again after."""

    def __init__(self, backend: Backend, train_every: int, strategy: int) -> None:
        self.backend = backend
        self.train_every = train_every
        self.strategy = strategy
        self.pending: Counter[str] = Counter()
        self.running: dict[str, asyncio.Task[None]] = {}
        self.again: set[str] = set()
        self.watching: dict[str, asyncio.Task[None]] = {}

    # -- triggers (answered at once; the work runs in the background) -----------------------------

    def event(self, payload: dict[str, Any]) -> None:
        action = str(payload.get("action", ""))
        metrics.LS_WEBHOOKS.labels(action if action in (*ANNOTATION_EVENTS, "ANNOTATIONS_DELETED", "START_TRAINING")
                                   else "other").inc()  # fmt: skip
        if "project" not in payload:
            return
        pid = project_id(payload["project"])
        if action == "START_TRAINING":
            self.trigger(pid, "START_TRAINING")
            return
        if action in ANNOTATION_EVENTS or action == "ANNOTATIONS_DELETED":
            self.pending[pid] += 1
            if self.train_every and self.pending[pid] >= self.train_every:
                self.trigger(pid, f"{self.pending[pid]} annotation changes")

    def trigger(self, pid: str, why: str) -> None:
        if pid in self.running and not self.running[pid].done():
            self.again.add(pid)
            log.info("project %s: training asked for again (%s); it runs after the current one", pid, why)
            return
        log.info("project %s: training triggered (%s)", pid, why)
        self.pending[pid] = 0
        self.running[pid] = asyncio.create_task(self._run(pid), name=f"labelstudio-train-{pid}")

    async def _run(self, pid: str) -> None:
        while True:
            try:
                await self.train(pid)
            except Exception as exc:  # reported, never fatal: the old version keeps serving
                metrics.LS_TRAINING.labels("error").inc()
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.error("project %s: training could not run (%s); the current model keeps serving", pid, detail)
            if pid not in self.again:
                return
            self.again.discard(pid)

    # -- the work --------------------------------------------------------------------------------

    async def train(self, pid: str) -> pb.Job | None:
        """Sync the project's annotations to its dataset and fine-tune on them; the finished job (None: not enough)."""
        project = await self._project(pid)
        examples = await self._annotated(project)
        counts = Counter(label for _, _, label in examples)
        rare = sorted(c for c, n in counts.items() if n < MIN_PER_CLASS)
        if rare:
            log.info("project %s: leaving out %s until they have %d annotations each (have %s)", pid, ", ".join(rare),
                     MIN_PER_CLASS, ", ".join(f"{c}: {counts[c]}" for c in rare))  # fmt: skip
            examples = [e for e in examples if e[2] not in rare]
        if len({label for _, _, label in examples}) < 2:
            log.info("project %s: not training yet: fine-tuning needs two classes with at least %d annotations each "
                     "(annotated: %s)", pid, MIN_PER_CLASS, dict(counts) or "none")  # fmt: skip
            return None
        dataset = project_model(pid)
        info = await self.backend.prelabel.upload(dataset, examples, replace=True)
        log.info("project %s: dataset %s synced: %d examples, %s", pid, dataset, info.example_count,
                 dict(info.class_counts))  # fmt: skip
        base = self.backend.options.base_model(pid) or (await self.backend.prelabel.models()).default_model
        job = await self.backend.prelabel.create_job(pb.CreateFineTuneJobRequest(
            dataset=dataset, base_model=base, output_model=project_model(pid), strategy=self.strategy,  # type: ignore[arg-type]
            request_id=request_id(pid, base, self.strategy, examples),
        ))  # fmt: skip
        log.info("project %s: fine-tune job %s (%s) on %d annotations from %s", pid, job.id,
                 pb.JobState.Name(job.state), len(examples), base)  # fmt: skip
        return await self.follow(pid, job.id)

    async def follow(self, pid: str, job_id: str) -> pb.Job:
        """Watch a job to its end: progress in the log and metrics, the outcome reported."""
        last: pb.Job | None = None
        reported = -1.0
        async for job in self.backend.prelabel.watch(job_id):
            last = job
            metrics.LS_JOB_PROGRESS.labels(pid).set(job.progress)
            if job.progress - reported >= 0.1 or job.state != pb.RUNNING:
                reported = job.progress
                log.info("project %s: job %s %s %.0f%% %s", pid, job.id, pb.JobState.Name(job.state),
                         100 * job.progress, job.message)  # fmt: skip
        assert last is not None
        state = pb.JobState.Name(last.state)
        metrics.LS_TRAINING.labels(state.lower()).inc()
        if last.state == pb.SUCCEEDED:
            await self.backend.prelabel.models(fresh=True)  # /setup answers the new version from now on
            log.info("project %s: model %s version %s is ready (cross-validated accuracy %.3f); Label Studio will "
                     "ask for fresh predictions", pid, last.output_model, last.model_version,
                     last.metrics.get("val_accuracy", float("nan")))  # fmt: skip
        else:
            log.error("project %s: fine-tune job %s ended %s: %s; the current model keeps serving", pid, last.id, state,
                      last.error or last.message)  # fmt: skip
        return last

    async def resume(self) -> None:
        """After a restart: follow the jobs this adapter started that have not ended."""
        for state in (pb.QUEUED, pb.RUNNING):
            for job in await self.backend.prelabel.list_jobs(state):
                if job.output_model.startswith(MODEL_PREFIX) and job.id not in self.watching:
                    pid = job.output_model[len(MODEL_PREFIX) :]
                    log.info("project %s: following job %s again (%s)", pid, job.id, pb.JobState.Name(job.state))
                    self.watching[job.id] = asyncio.create_task(self._follow_quietly(pid, job.id))

    async def _follow_quietly(self, pid: str, job_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.follow(pid, job_id)

    async def _project(self, pid: str) -> Project:
        known = self.backend.projects.get(pid)
        url = known.url if known else self.backend.options.label_studio_url
        token = known.token if known else self.backend.options.label_studio_token
        if not url:
            raise RuntimeError(
                f"Label Studio's address is not known yet for project {pid}: it is learnt from /setup "
                "(open the project once) or set with --label-studio-url and --label-studio-token"
            )
        detail = await api.call(self.backend.session, "GET", f"{url}/api/projects/{pid}", token)
        return self.backend.remember(pid, str(detail.get("label_config", "")), url, token)

    async def _annotated(self, project: Project) -> list[tuple[str, bytes, str]]:
        export = f"{project.url}/api/projects/{project.id}/export?exportType=JSON"
        tasks = await api.call(self.backend.session, "GET", export, project.token)
        labelled = [(t, choice) for t in tasks if (choice := latest_choice(t, project.config))]
        contents = await self.backend.fetch_all(project, [t for t, _ in labelled])
        skipped = sum(c is None for c in contents)
        if skipped:
            log.warning("project %s: %d annotated tasks left out: their images could not be fetched", project.id,
                        skipped)  # fmt: skip
        pairs = zip(labelled, contents, strict=True)
        return [(str(task.get("id")), content, choice) for (task, choice), content in pairs if content is not None]
