"""The trainer processes that ``prelabel serve`` runs beside its gateway.

Each is a fresh ``prelabel trainer`` process (:class:`~prelabel.processes.ProcessPool`) configured
through its environment with the server's settings; it hands its job back to the queue on SIGTERM.
"""

from __future__ import annotations

import os

from prelabel.processes import ProcessPool
from prelabel.settings import Settings


def trainer_pool(settings: Settings, triton_url: str) -> ProcessPool:
    # The gateway's metrics port is taken; `prelabel trainer` alone serves metrics.
    env = {**os.environ, **settings.replace(triton_url=triton_url, metrics_port=-1).environment()}
    return ProcessPool("trainer", ["trainer"], lambda n: env, settings.trainer_workers)
