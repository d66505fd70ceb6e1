"""Which models and versions exist (the model repository) and which are ready (Triton).

Cards are immutable once published, so they are cached; the list of versions and their readiness
come from one background refresh (:meth:`ModelCatalog.refresh`: the repository folder and Triton's
index), so resolving "the newest ready version" costs a Predict call no file system access and no
round trip to Triton. A model missing from the cache is looked up on disk at once, so a model
published a moment ago is found.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prelabel.errors import FailedPrecondition, NotFound, PrelabelError, Unavailable, parse_number
from prelabel.gateway.protos import version_to_pb
from prelabel.models.card import VersionCard
from prelabel.names import validate_name
from prelabel.reachability import Reachability
from prelabel.triton.client import TritonClient
from prelabel.triton.repository import ModelRepository
from prelabel.v1 import prelabel_pb2 as pb

log = logging.getLogger("prelabel.gateway")


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    card: VersionCard
    max_batch_size: int


class ModelCatalog:
    def __init__(self, repository: ModelRepository, triton: TritonClient, default_model: str) -> None:
        self.repository = repository
        self.triton = triton
        self.default_model = default_model
        self.ready: dict[str, set[int]] = {}
        self._inflight: asyncio.Task[None] | None = None
        self._inflight_started = 0.0
        self.versions: dict[str, list[int]] = {}
        self._reachable = Reachability(log, up=False)
        self._cards: dict[tuple[str, int], VersionCard] = {}
        self._batch_sizes: dict[str, int] = {}

    async def refresh(self) -> None:
        """Re-read versions from the repository and readiness from Triton (down: nothing is ready)."""
        self.versions = {name: self.repository.versions(name) for name in self.repository.models()}
        try:
            states = await self.triton.model_index()
        except PrelabelError as exc:
            self._reachable.down(f"Triton is unreachable: {exc.message}")
            self.ready = {}
            return
        ready: dict[str, set[int]] = {}
        for s in states:
            if s.state == "READY" and s.version.isascii() and s.version.isdigit():
                ready.setdefault(s.name, set()).add(int(s.version))
        listed = {k: sorted(v) for k, v in ready.items()} or "none"
        self._reachable.back(f"Triton is reachable; ready models: {listed}")
        self.ready = ready

    @property
    def triton_up(self) -> bool:
        return self._reachable.up

    async def _refresh_since(self, since: float) -> None:
        """Readiness read by a refresh that started after ``since``; concurrent callers share one."""
        if self._inflight is None or self._inflight_started <= since:
            self._inflight_started = time.monotonic()
            self._inflight = asyncio.create_task(self.refresh())
        await asyncio.shield(self._inflight)

    def default_ready(self) -> bool:
        return self.triton_up and bool(self.ready.get(self.default_model))

    def card(self, name: str, version: int) -> VersionCard:
        key = (name, version)
        if key not in self._cards:
            self._cards[key] = self.repository.card(name, version)
        return self._cards[key]

    async def resolve(self, model: str, version: str) -> Resolved:
        """Name and version of a request to a ready model version, or a clear NOT_FOUND, UNAVAILABLE (still
        loading) or FAILED_PRECONDITION (an older version than Triton keeps loaded)."""
        asked_at = time.monotonic()
        name = model or self.default_model
        # What the request says is checked first: a bad version is the client's to fix, whatever Triton's state.
        wanted = parse_number(version, "version", "send a version number, or none for the newest ready one") \
            if version else None  # fmt: skip
        versions = self.versions.get(name, [])
        if not versions or (wanted is not None and wanted not in versions):  # a miss: look on disk
            versions = self.repository.versions(validate_name(name))
            if versions:
                self.versions[name] = versions
        if not versions:
            known = ", ".join(self.repository.models()) or "none"
            raise NotFound(f"model {name!r} does not exist; models: {known} (ListModels shows them all)")
        ready = self.ready.get(name, set())
        if not ready or (wanted is not None and wanted not in ready):
            # A version loaded a moment ago must answer before the next periodic refresh.
            await self._refresh_since(asked_at)
            ready = self.ready.get(name, set())
        if not self.triton_up:
            raise Unavailable(f"Triton is unreachable, so model {name!r} cannot answer now; retry shortly")
        if wanted is not None:
            number = wanted
            if number not in versions:
                raise NotFound(f"model {name!r} has no version {number}; versions: {versions}")
            policy = self.repository.config
            if number not in ready and number not in (loaded := policy.loaded(versions)):
                raise FailedPrecondition(
                    f"version {number} of {name!r} is not served: Triton keeps the newest {policy.loaded_versions} "
                    f"version(s) of each model loaded ({', '.join(map(str, loaded))}); ask for one of them, or none "
                    "for the newest, or raise PRELABEL_TRITON_LOADED_VERSIONS"
                )
            if number not in ready:
                raise Unavailable(f"version {number} of {name!r} is not loaded in Triton yet; retry shortly")
        else:
            if not ready:
                raise Unavailable(f"no version of {name!r} is ready in Triton yet; retry shortly")
            number = max(ready)
        if name not in self._batch_sizes:
            self._batch_sizes[name] = await self.triton.max_batch_size(name)
        return Resolved(name, str(number), self.card(name, number), self._batch_sizes[name])

    def describe(self, name: str) -> pb.Model:
        """A model with every version in the repository, each marked ready or not."""
        versions = self.repository.versions(validate_name(name))
        if not versions:
            raise NotFound(f"model {name!r} does not exist; ListModels shows the models there are")
        ready = self.ready.get(name, set())
        model = pb.Model(name=name, default_version=str(max(ready)) if ready else "")
        model.versions.extend(version_to_pb(n, self.card(name, n), n in ready) for n in versions)
        return model

    def list_models(self) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[self.describe(name) for name in self.repository.models()], default_model=self.default_model
        )


class ModelCollector(Collector):
    """Versions per model and the newest ready version's auto-accept coverage, from the gateway's catalog."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[Metric]:
        versions = GaugeMetricFamily("prelabel_model_versions", "Versions in the model repository.", labels=["model"])
        ready = GaugeMetricFamily("prelabel_model_ready_versions", "Versions ready in Triton.", labels=["model"])
        coverage = GaugeMetricFamily(
            "prelabel_model_auto_accept_coverage",
            "Share of validation images auto-accepted by the newest ready version at its target precision.",
            labels=["model"],
        )
        for name, numbers in sorted(self.catalog.versions.items()):
            versions.add_metric([name], len(numbers))
            live = self.catalog.ready.get(name, set())
            ready.add_metric([name], len(live))
            if live:
                value = self.catalog.card(name, max(live)).metrics.get("auto_accept_coverage")
                if value is not None:
                    coverage.add_metric([name], value)
        yield from (versions, ready, coverage)
