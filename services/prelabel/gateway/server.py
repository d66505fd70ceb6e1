"""Assembles the gateway: servicers, the error/metrics interceptor, health, reflection.

Follows grpc's ``async_greeter_server_with_reflection`` and ``grpc_health/v1/_async`` examples: the
server is created inside the running loop, health is NOT_SERVING until the default model is ready
in Triton (and again whenever it is not), and ``stop`` enters graceful shutdown before draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import Collector

from prelabel import metrics
from prelabel.datasets.store import dataset_store
from prelabel.errors import Unavailable
from prelabel.gateway.catalog import ModelCatalog, ModelCollector
from prelabel.gateway.datasets import Datasets
from prelabel.gateway.interceptors import ErrorsAndMetrics
from prelabel.gateway.jobs import Jobs
from prelabel.gateway.predict import Predictor
from prelabel.gateway.security import BearerTokens, Tokens, server_credentials
from prelabel.gateway.servicers import DatasetServicer, JobServicer, ModelServicer, PredictionServicer
from prelabel.queue import open_queue
from prelabel.queue.contract import JobQueue
from prelabel.settings import Settings
from prelabel.triton.client import TritonClient
from prelabel.triton.repository import repository_for
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc

log = logging.getLogger("prelabel.gateway")

SERVICES = tuple(pb.DESCRIPTOR.services_by_name[n].full_name for n in pb.DESCRIPTOR.services_by_name)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Gateway:
    server: aio.Server
    port: int
    catalog: ModelCatalog
    health: health.aio.HealthServicer
    watcher: asyncio.Task[None]

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to ``grace_s``, then close."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.watcher
        await self.catalog.triton.close()


async def _watch_triton(catalog: ModelCatalog, health_servicer: health.aio.HealthServicer, period_s: float) -> None:
    serving: bool | None = None
    while True:
        await catalog.refresh()
        now = catalog.default_ready()
        if now != serving:
            for service in ("", *SERVICES):
                await health_servicer.set(service, SERVING if now else NOT_SERVING)
            metrics.TRITON_UP.set(1 if now else 0)
            log.info(
                "health: %s (default model %r %s)",
                "SERVING" if now else "NOT_SERVING",
                catalog.default_model,
                "ready" if now else "not ready",
            )
            serving = now
        await asyncio.sleep(period_s)


def shared_state(settings: Settings, queue: JobQueue, catalog: ModelCatalog) -> dict[str, Collector]:
    """What every gateway reports besides its own calls, read at scrape time: the shared queue, the
    models, and the space left where datasets, checkpoints and versions are written."""
    return {
        "queue": metrics.QueueCollector(queue),
        "models": ModelCollector(catalog),
        "volume": metrics.VolumeCollector(settings.data_dir, settings.repository),
    }


def cannot_listen(host: str, port: int, why: str) -> Unavailable:
    """What to do when the gRPC port is taken (one gateway or several)."""
    return Unavailable(
        f"cannot listen on {host}:{port} ({why}); choose another port with --grpc-port or PRELABEL_GRPC_PORT"
    )


async def start_gateway(settings: Settings, triton_url: str, refresh_period_s: float = 1.0) -> Gateway:
    triton = TritonClient(triton_url)
    catalog = ModelCatalog(repository_for(settings), triton, settings.default_model)
    credentials = server_credentials(settings)
    interceptors: list[aio.ServerInterceptor] = [ErrorsAndMetrics()]
    if settings.auth_tokens_file is not None:
        interceptors.append(BearerTokens(Tokens(settings.auth_tokens_file)))
    server = aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Only the workers of `serve --gateway-workers` share a port (prelabel.gateway.workers); grpc's
            # default on Linux is to share, so a second, unrelated gateway would bind silently beside the first.
            ("grpc.so_reuseport", int(settings.gateway_worker)),
        ],
    )
    rpc.add_PredictionServiceServicer_to_server(PredictionServicer(Predictor(settings, catalog, triton)), server)
    rpc.add_ModelServiceServicer_to_server(ModelServicer(catalog), server)
    store = dataset_store(settings)
    queue = open_queue(settings.queue)
    for name, collector in shared_state(settings, queue, catalog).items():
        metrics.watch(name, collector)
    rpc.add_DatasetServiceServicer_to_server(DatasetServicer(Datasets(store)), server)
    rpc.add_JobServiceServicer_to_server(JobServicer(Jobs(settings, queue, store, catalog.repository)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", *SERVICES):
        await health_servicer.set(service, NOT_SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    watcher = asyncio.create_task(_watch_triton(catalog, health_servicer, refresh_period_s), name="triton-watch")
    return Gateway(server, port, catalog, health_servicer, watcher)
