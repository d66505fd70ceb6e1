"""The ML backend's work, apart from HTTP: which model serves a project, and its pre-labels.

Everything durable lives in Prelabel: a project's fine-tuned model is the model named
``labelstudio-<project id>``, so after a restart the adapter finds it again by asking the gateway.
A project is pre-labelled by that model once it has a ready version, by its base model before.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from prelabel import metrics
from prelabel.errors import InvalidArgument, NotFound
from prelabel.labelstudio import api, config, images, webhooks
from prelabel.labelstudio.remote import Prelabel
from prelabel.v1 import prelabel_pb2 as pb

log = logging.getLogger("prelabel.labelstudio")

MODEL_PREFIX = "labelstudio-"
FETCH_CONCURRENCY = 16
WEBHOOK_TRIES = 10
PREDICT_CONCURRENCY = 2  # Predict calls in flight per /predict: enough to overlap fetching with inference


def project_model(project: str) -> str:
    return f"{MODEL_PREFIX}{project}"


def project_id(raw: Any) -> str:
    """Label Studio names a project ``"ID.TIMESTAMP"`` in /setup and /predict, ``{"id": ID}`` in webhooks."""
    value = raw.get("id") if isinstance(raw, dict) else raw
    text = str(value if value is not None else "").split(".", 1)[0]
    if not text.isdigit():
        raise InvalidArgument(f"project {str(raw)[:40]!r} is not a Label Studio project id")
    return text


@dataclass(frozen=True)
class Options:
    model: str = ""  # the base model; empty: the gateway's default
    project_models: dict[str, str] = field(default_factory=dict)  # project id -> base model
    label_studio_url: str = ""  # used until /setup says where Label Studio is
    label_studio_token: str = ""
    batch_size: int = 32
    max_image_bytes: int = 20 * 1024 * 1024
    max_top_k: int = 100  # the gateway's limit: the best project choice is looked for among this many labels
    basic_auth: tuple[str, str] | None = None  # what Label Studio must send

    def base_model(self, project: str) -> str:
        return self.project_models.get(project, self.model)


@dataclass
class Project:
    """What /setup told us about a project: its labelling config and how to reach Label Studio."""

    id: str
    config: config.ImageClassification
    url: str
    token: str


class Backend:
    def __init__(self, prelabel: Prelabel, options: Options, session: aiohttp.ClientSession) -> None:
        self.prelabel = prelabel
        self.options = options
        self.session = session
        self.projects: dict[str, Project] = {}
        self._warned: set[tuple[str, str]] = set()
        self._webhooks: dict[str, asyncio.Task[None]] = {}

    # -- projects --------------------------------------------------------------------------------

    def remember(self, raw_project: Any, schema: str, url: str = "", token: str = "") -> Project:
        pid = project_id(raw_project)
        known = self.projects.get(pid)
        # What the operator configured wins over what /setup says: Label Studio's idea of its own
        # address (LABEL_STUDIO_HOST) is often not the one the adapter reaches it by.
        project = Project(
            pid,
            config.parse(schema),
            (self.options.label_studio_url or url or (known.url if known else "")).rstrip("/"),
            self.options.label_studio_token or token or (known.token if known else ""),
        )
        self.projects[pid] = project
        return project

    def authorize_webhook(self, project: Project) -> None:
        """With basic auth: once per project, in the background, give Label Studio's webhook the header."""
        if self.options.basic_auth is None or not project.url or project.id in self._webhooks:
            return
        user, password = self.options.basic_auth
        header = aiohttp.encode_basic_auth(user, password)

        async def run() -> None:
            try:
                for _ in range(WEBHOOK_TRIES):  # Label Studio creates the webhook just after its first /setup
                    if await webhooks.authorize(self.session, project.url, project.token, project.id, user, header):
                        return
                    await asyncio.sleep(1)
                self._webhooks.pop(project.id, None)  # the next /setup looks again
            except (api.StudioError, aiohttp.ClientError, TimeoutError, KeyError, TypeError) as exc:
                self._webhooks.pop(project.id, None)
                log.warning("project %s: could not give Label Studio's webhook the basic auth header (%s); "
                            "annotation events are refused until it has it (docs/labelstudio.md)", project.id,
                            exc)  # fmt: skip

        self._webhooks[project.id] = asyncio.create_task(run())

    async def serving(self, project: str) -> pb.Model:
        """The model that pre-labels ``project`` now (its ``default_version`` is the version)."""
        models = await self.prelabel.models()
        by_name: dict[str, pb.Model] = {m.name: m for m in models.models}
        trained = by_name.get(project_model(project))
        if trained is not None and trained.default_version:
            return trained
        base = self.options.base_model(project) or models.default_model
        if base not in by_name or not by_name[base].default_version:
            raise NotFound(f"model {base!r} has no ready version on the Prelabel gateway; check `prelabel models`")
        return by_name[base]

    async def model_version(self, project: str) -> str:
        model = await self.serving(project)
        return f"{model.name}@{model.default_version}"

    # -- /predict --------------------------------------------------------------------------------

    async def predict(self, project: Project, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per task, in order; a task whose image cannot be used gets an empty result."""
        model = await self.serving(project.id)
        version = next(v for v in model.versions if v.version == model.default_version)
        top_k = max(1, min(len(version.labels), self.options.max_top_k))
        model_version = f"{model.name}@{version.version}"
        fetched = await self.fetch_all(project, tasks)
        results: list[dict[str, Any]] = [{"result": [], "model_version": model_version} for _ in tasks]
        outcomes = ["failed" if content is None else "empty" for content in fetched]
        usable = [i for i, content in enumerate(fetched) if content is not None]
        batches = [usable[k : k + self.options.batch_size] for k in range(0, len(usable), self.options.batch_size)]
        gate = asyncio.Semaphore(PREDICT_CONCURRENCY)

        async def run(batch: list[int]) -> None:
            async with gate:
                response = await self.prelabel.predict(model.name, version.version,
                                                       [(str(i), fetched[i] or b"") for i in batch], top_k)  # fmt: skip
            for i, prediction in zip(batch, response.predictions, strict=True):
                results[i] = self._result(project, tasks[i], prediction, model_version)
                labelled = "labelled" if results[i]["result"] else "empty"
                outcomes[i] = "failed" if prediction.HasField("error") else labelled

        await asyncio.gather(*(run(b) for b in batches))
        for outcome in outcomes:
            metrics.LS_TASKS.labels(outcome).inc()
        return results

    def _result(self, project: Project, task: dict[str, Any], p: pb.Prediction, model_version: str) -> dict[str, Any]:
        empty: dict[str, Any] = {"result": [], "model_version": model_version}
        if p.HasField("error"):
            log.warning("project %s, task %s: the image could not be used (%s); it gets no pre-label", project.id,
                        task.get("id"), p.error.message)  # fmt: skip
            return empty
        choice, score = next(((c, lab.score) for lab in p.labels if (c := project.config.choice_for(lab.name))),
                             (None, 0.0))  # fmt: skip
        if choice is None:
            key = (project.id, model_version)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("project %s: model %s has none of the project's choices (%s); its tasks get no pre-label "
                            "until it is fine-tuned on the project's annotations", project.id, model_version,
                            ", ".join(project.config.choices))  # fmt: skip
            return empty
        score = round(float(score), 6)
        return {
            "result": [{
                "from_name": project.config.from_name,
                "to_name": project.config.to_name,
                "type": "choices",
                "value": {"choices": [choice]},
                "score": score,
            }],
            "score": score,
            "model_version": model_version,
            # Not stored by Label Studio (it keeps result, score, model_version); for other clients.
            "uncertainty": {
                "entropy": round(p.uncertainty.entropy, 6),
                "margin": round(p.uncertainty.margin, 6),
                "least_confidence": round(p.uncertainty.least_confidence, 6),
            },
            "auto_accept": p.auto_accept,
        }  # fmt: skip

    async def fetch_all(self, project: Project, tasks: list[dict[str, Any]]) -> list[bytes | None]:
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(task: dict[str, Any]) -> bytes | None:
            url = (task.get("data") or {}).get(project.config.data_key)
            if not isinstance(url, str) or not url:
                log.warning("project %s, task %s: no %r field in the task's data; it gets no pre-label", project.id,
                            task.get("id"), project.config.data_key)  # fmt: skip
                return None
            async with gate:
                try:
                    limit = self.options.max_image_bytes
                    return await images.fetch(self.session, url, project.url, project.token, limit, task.get("id"))
                except images.FetchError as exc:
                    log.warning("project %s, task %s: %s; it gets no pre-label", project.id, task.get("id"), exc)
                    return None

        return list(await asyncio.gather(*(one(t) for t in tasks)))
