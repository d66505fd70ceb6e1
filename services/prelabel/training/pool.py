"""The trainer processes that ``prelabel serve`` runs beside its gateway.

Each is a fresh ``prelabel trainer`` process (:class:`~prelabel.processes.ProcessPool`) configured
through its environment with the server's settings; it hands its job back to the queue on SIGTERM.
They serve no ``/metrics`` of their own (the gateway holds the port): they write their metrics to
``metrics_dir`` and the gateway's ``/metrics`` serves them (:func:`prelabel.metrics.with_trainers`).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import multiprocess

from prelabel import metrics
from prelabel.processes import ProcessPool
from prelabel.settings import Settings


def trainer_pool(settings: Settings, triton_url: str, metrics_dir: Path, env_defaults: dict[str, str]) -> ProcessPool:
    """``env_defaults``: variables the trainers get unless this process's environment sets them."""
    trainer = settings.replace(triton_url=triton_url, metrics_port=-1)
    env = {**env_defaults, **os.environ, **trainer.environment(), metrics.MULTIPROC_DIR: str(metrics_dir)}

    def forget(pid: int) -> None:  # a trainer that exited is no longer busy, nor stuck
        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    return ProcessPool("trainer", ["trainer"], lambda n: env, settings.trainer_workers, on_exit=forget)
