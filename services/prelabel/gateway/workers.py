"""Several gateway processes sharing one gRPC port, for machines where one process is the limit.

One gateway process serialises about 75 calls of 64 photos a second (measured on an H200 host,
docs/benchmarks.md), less than Triton serves with 4 or more instances. As in grpc's
``multiprocessing`` example, ``gateway_workers`` processes listen on the same port with
``SO_REUSEPORT`` and the kernel spreads connections among them; the parent holds the port reserved
(so that port 0 means one free port for all of them), starts and restarts the workers, and serves
``/metrics`` for all of them: the workers write their counters, histograms and gauges to a
directory (prometheus_client's multiprocess mode) and the parent adds the queue and the models,
which it reads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess

from prelabel import metrics
from prelabel.errors import Unavailable
from prelabel.gateway.catalog import ModelCatalog
from prelabel.gateway.server import cannot_listen, shared_state
from prelabel.processes import ProcessPool
from prelabel.queue import open_queue
from prelabel.settings import Settings
from prelabel.triton.client import TritonClient
from prelabel.triton.repository import repository_for

log = logging.getLogger("prelabel.gateway")


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening ``SO_REUSEPORT`` socket: the port stays ours while the workers come and go.

    The port must be free first: a plain bind proves no one else holds it, not even another Prelabel
    sharing it with ``SO_REUSEPORT`` (which would otherwise silently split the traffic with us).
    """
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        _bind(probe, address, host, port)
        address = probe.getsockname()  # port 0: the free port the kernel chose
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    _bind(sock, address, host, port)
    return sock


def _bind(sock: socket.socket, address: Any, host: str, port: int) -> None:
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise cannot_listen(host, port, str(exc.strerror)) from exc


@dataclass
class GatewayWorkers:
    """The running workers; :meth:`stop` ends them and releases the port."""

    pool: ProcessPool
    port: int
    reservation: socket.socket
    run_dir: Path
    catalog: ModelCatalog
    refresher: asyncio.Task[None]

    def registry(self, settings: Settings) -> CollectorRegistry:
        """What the parent's ``/metrics`` serves: every worker's metrics, the queue, the models, Triton restarts."""
        registry = CollectorRegistry()
        # What gateways measure: the parent counts Triton's restarts itself (and gateways train nothing).
        others = metrics.names_of(metrics.TRITON_RESTARTS, *metrics.TRAINER_METRICS, *metrics.LABELSTUDIO_METRICS)
        registry.register(metrics.multiprocess_families(self.run_dir, others, inside=False))
        for collector in shared_state(settings, open_queue(settings.queue), self.catalog).values():
            registry.register(collector)
        registry.register(metrics.TRITON_RESTARTS)
        return registry

    async def stop(self, grace_s: float) -> None:
        await self.pool.stop(grace_s)
        self.refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.refresher
        await self.catalog.triton.close()
        self.reservation.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def _refresh(catalog: ModelCatalog, period_s: float = 1.0) -> None:
    while True:
        await catalog.refresh()
        await asyncio.sleep(period_s)


async def start_workers(settings: Settings, triton_url: str, startup_timeout_s: float = 120.0) -> GatewayWorkers:
    """Start ``settings.gateway_workers`` gateways on one port; return once every one listens."""
    reservation = reserve_port(settings.grpc_host, settings.grpc_port)
    port = int(reservation.getsockname()[1])
    run_dir = Path(tempfile.mkdtemp(prefix="prelabel-gateway-"))
    ready = [run_dir / f"worker-{n}.ready" for n in range(settings.gateway_workers)]

    def environment(n: int) -> dict[str, str]:
        worker = settings.replace(gateway_workers=1, grpc_port=port, metrics_port=-1, triton_url=triton_url,
                                  ready_file=ready[n])  # fmt: skip
        return {**os.environ, **worker.environment(), metrics.MULTIPROC_DIR: str(run_dir)}

    def forget(pid: int) -> None:  # its live gauges (calls in flight) no longer count
        multiprocess.mark_process_dead(pid, str(run_dir))  # type: ignore[no-untyped-call]

    pool = ProcessPool("gateway worker", ["gateway"], environment, settings.gateway_workers, on_exit=forget)
    catalog = ModelCatalog(repository_for(settings), TritonClient(triton_url), settings.default_model)
    workers = GatewayWorkers(pool, port, reservation, run_dir, catalog, asyncio.create_task(_refresh(catalog)))
    pool.start()
    try:
        await _wait_ready(pool, ready, startup_timeout_s)
    except BaseException:
        await workers.stop(0)
        raise
    return workers


async def _wait_ready(pool: ProcessPool, ready: list[Path], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(path.exists() for path in ready):
        for n, process in pool.processes.items():
            if process.returncode is not None and not ready[n].exists():
                code = process.returncode
                raise Unavailable(f"gateway worker {n} exited while starting (code {code}); its log is above")
        if loop.time() > deadline:
            late = [n for n, path in enumerate(ready) if not path.exists()]
            raise Unavailable(f"gateway workers {late} did not listen within {timeout_s:.0f}s; their logs are above")
        await asyncio.sleep(0.05)
