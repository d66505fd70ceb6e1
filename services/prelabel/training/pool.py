"""The trainer processes that ``prelabel serve`` runs beside its gateway.

Each is a fresh ``prelabel trainer`` process (spawned: the gateway's gRPC threads are never
forked), configured through its environment, dying with its parent, and restarted with back-off
if it exits unexpectedly. Its log lines go to the same standard error as the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from prelabel.processes import Backoff, die_with_parent, kill_group, wait_exit
from prelabel.settings import Settings

log = logging.getLogger("prelabel.trainer")


class TrainerPool:
    def __init__(self, settings: Settings, triton_url: str) -> None:
        self.settings = settings
        self.triton_url = triton_url
        self._tasks: list[asyncio.Task[None]] = []
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        s = self.settings
        env.update(
            PRELABEL_DATA_DIR=str(s.data_dir),
            PRELABEL_QUEUE_URL=s.queue,
            PRELABEL_TRITON_URL=self.triton_url,
            PRELABEL_METRICS_PORT="-1",  # the gateway's port is taken; `prelabel trainer` alone serves metrics
            PRELABEL_LOG_LEVEL=s.log_level,
        )
        if s.model_repository:
            env["PRELABEL_MODEL_REPOSITORY"] = str(s.model_repository)
        return env

    def start(self) -> None:
        for n in range(self.settings.trainer_workers):
            self._tasks.append(asyncio.create_task(self._keep_running(n), name=f"trainer-{n}"))

    async def _keep_running(self, n: int) -> None:
        backoff = Backoff()
        while not self._stopping:
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "prelabel.cli.main", "trainer",
                env=self.environment(), stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the trainers in order
            )  # fmt: skip
            self._processes[n] = process
            log.info("trainer %d started (pid %d)", n, process.pid)
            code = await wait_exit(process)
            if self._stopping:
                return
            await kill_group(process.pid, f"trainer {n}")
            delay = backoff.after_run(time.monotonic() - started)
            log.error("trainer %d exited unexpectedly (code %s); restarting in %.0fs", n, code, delay)
            await asyncio.sleep(delay)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM: each trainer hands its job back to the queue; SIGKILL after ``grace_s``."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes.values():
            if await wait_exit(process, grace_s) is None:
                log.warning("trainer pid %d did not stop within %.0fs; killing it", process.pid, grace_s)
            await kill_group(process.pid, f"trainer pid {process.pid}")
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
