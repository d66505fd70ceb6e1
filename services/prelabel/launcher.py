"""Runs Prelabel's processes: ``serve`` (everything), ``gateway`` and ``triton`` (each part alone).

``serve`` also starts ``trainer_workers`` trainer processes (:mod:`prelabel.training.pool`), and
with ``gateway_workers`` > 1 that many gateway processes on one port (:mod:`prelabel.gateway.workers`).

Modelled on vLLM's ``entrypoints/launcher.py``: SIGTERM and SIGINT are handled by the event loop and
start an orderly shutdown (health NOT_SERVING, in-flight calls finish within the grace period, then
Triton stops); a failure to start is fatal and says what to do, errors in single requests are not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from prelabel import metrics
from prelabel.errors import InvalidArgument, PrelabelError, Unavailable
from prelabel.gateway.server import Gateway, cannot_listen, start_gateway
from prelabel.gateway.workers import GatewayWorkers, start_workers
from prelabel.processes import ProcessPool
from prelabel.settings import Settings
from prelabel.training.pool import trainer_pool
from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import repository_for
from prelabel.triton.supervisor import Ports, TritonSupervisor, free_port

log = logging.getLogger("prelabel")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# Triton and trainers on the same cores (`serve`): libgomp's threads spin at each barrier while their
# siblings wait for a core, so while a job trained Predict took 10x longer and training ran 8x slower
# (bench/predict_while_training.py). Sleeping at once costs about 0.8x of either alone. A user who
# sets OMP_WAIT_POLICY or GOMP_SPINCOUNT has chosen.
SHARED_CORES = {"OMP_WAIT_POLICY": "PASSIVE"}


def shares_cores(settings: Settings, parts: str) -> dict[str, str]:
    """The environment defaults for Triton and trainers that run on one machine's cores."""
    if not (parts == "all" and settings.embedded_triton and settings.trainer_workers > 0):
        return {}
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    log.info("Triton and the trainers share these cores: OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE)")
    return SHARED_CORES


def _check_port(host: str, port: int, taken: Callable[[str, int, str], Unavailable]) -> None:
    """Fail at once when a fixed port is taken: `serve` would otherwise start Triton and load every model
    first (seconds, and a rewrite of the repository's configs) only to stop it again."""
    if port <= 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is not taken
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise taken(host, port, str(exc.strerror or exc)) from None


def supervisor_for(settings: Settings, env: dict[str, str] | None = None) -> TritonSupervisor:
    host = settings.triton_host
    return TritonSupervisor(
        repository=settings.repository,
        workspace=settings.triton_workspace,
        url_file=settings.triton_url_file,
        log_path=settings.logs / "triton.log",
        host=host,
        ports=Ports(
            settings.triton_grpc_port or free_port(host),
            settings.triton_http_port or free_port(host),
            settings.triton_metrics_port or free_port(host),
        ),
        startup_timeout_s=settings.triton_startup_timeout_s,
        env_defaults=env,
    )


async def _start_triton(settings: Settings, env: dict[str, str]) -> TritonSupervisor:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    supervisor = supervisor_for(settings, env)
    supervisor.lock()  # before the repository is touched: one embedded Triton per data directory
    try:
        repository = repository_for(settings)
        ensure_default_model(repository, settings.default_model, settings.base_weights)
        repository.write_configs()  # a repository written by an older release gets this release's outputs
        await supervisor.start()
    except BaseException:
        await supervisor.stop()
        raise
    return supervisor


async def _start_gateway(
    settings: Settings, triton_url: str, trainer_metrics: Path | None
) -> tuple[Gateway | GatewayWorkers, int | None]:
    """One gateway in this process, or ``gateway_workers`` processes on one port; then ``/metrics``, with
    the metrics of ``serve``'s trainers where they write them (``trainer_metrics``)."""
    gateway: Gateway | GatewayWorkers
    if settings.gateway_workers > 1:
        gateway = await start_workers(settings, triton_url)
        registry = gateway.registry(settings)
    else:
        try:
            gateway = await start_gateway(settings, triton_url)
        except RuntimeError as exc:  # grpc: "Failed to bind"
            raise cannot_listen(settings.grpc_host, settings.grpc_port, str(exc)) from exc
        registry = metrics.GATEWAY_REGISTRY
        if settings.ready_file is not None:  # a worker of `serve`, which waits for this file
            settings.ready_file.write_text(f"{os.getpid()}\n")
    if settings.metrics_port < 0:
        return gateway, None
    if trainer_metrics is not None:
        registry = metrics.with_trainers(registry, trainer_metrics)
    try:
        return gateway, metrics.serve_metrics(settings.metrics_port, settings.metrics_address, registry)
    except PrelabelError:
        await gateway.stop(0)  # it listens already: close it (and its workers) before saying why
        raise


def _announce(settings: Settings, port: int | None, metrics_port: int | None, triton: str) -> None:
    lines = []
    if port is not None:
        security = "mutual TLS" if settings.tls_client_ca_file else "TLS" if settings.tls_cert_file else "plaintext"
        tokens = ", bearer tokens required" if settings.auth_tokens_file else ""
        workers = f", {settings.gateway_workers} processes" if settings.gateway_workers > 1 else ""
        lines.append(f"Prelabel gateway listening on {settings.grpc_host}:{port} (gRPC, {security}{tokens}{workers})")
    if metrics_port is not None:
        lines.append(f"metrics on http://{settings.metrics_address}:{metrics_port}/metrics")
    lines.append(f"Triton at {triton}")
    lines.append(f"data in {settings.data_dir}")
    if not settings.gateway_worker:
        print("; ".join(lines), flush=True)
    else:  # a gateway worker: its parent announces the port for all of them
        log.info("worker pid %d: %s", os.getpid(), lines[0])


async def serve(settings: Settings, parts: str = "all") -> None:
    """``parts``: ``all`` (Triton embedded unless triton_url is set), ``gateway`` or ``triton``."""
    stop = _stop_event()
    supervisor: TritonSupervisor | None = None
    trainers: ProcessPool | None = None
    gateway: Gateway | GatewayWorkers | None = None
    metrics_port: int | None = None
    trainer_metrics: Path | None = None
    if settings.gateway_workers < 1:
        raise InvalidArgument(f"gateway_workers must be at least 1, not {settings.gateway_workers}")
    if parts == "all" and settings.embedded_triton:  # before Triton starts and loads every model
        _check_port(settings.grpc_host, settings.grpc_port, cannot_listen)
        _check_port(settings.metrics_address, settings.metrics_port, metrics.cannot_serve)
    env = shares_cores(settings, parts)
    try:
        if parts == "triton" or (parts == "all" and settings.embedded_triton):
            supervisor = await _start_triton(settings, env)
        triton_url = supervisor.url if supervisor else settings.triton_url
        if parts == "all" and settings.trainer_workers > 0:
            trainer_metrics = Path(tempfile.mkdtemp(prefix="prelabel-trainers-"))
        if parts in ("all", "gateway"):
            if not triton_url:
                raise Unavailable("the gateway needs a Triton: pass --triton-url HOST:PORT or set PRELABEL_TRITON_URL")
            gateway, metrics_port = await _start_gateway(settings, triton_url, trainer_metrics)
        if trainer_metrics is not None:
            trainers = trainer_pool(settings, triton_url, trainer_metrics, env)
            trainers.start()
        triton = triton_url + (f" (metrics {supervisor.metrics_url})" if supervisor else "")
        _announce(settings, gateway.port if gateway else None, metrics_port, triton)
        await stop.wait()
        log.info("shutting down: finishing in-flight calls (grace %.0fs)", settings.grace_period_s)
    finally:
        if trainers is not None:
            await trainers.stop(settings.grace_period_s)
        if gateway is not None:
            await gateway.stop(settings.grace_period_s)
        if supervisor is not None:
            await supervisor.stop()
        if trainer_metrics is not None:
            shutil.rmtree(trainer_metrics, ignore_errors=True)


def run(settings: Settings, parts: str = "all") -> int:
    settings.configure_logging()
    try:
        asyncio.run(serve(settings, parts))
    except PrelabelError as exc:
        log.error("%s", exc.message)
        return 1
    return 0
