"""Child processes that ``prelabel serve`` keeps running (Triton, trainers, gateway workers): start, watch, restart.

Every child is started in a session (and so a process group) of its own, dies with its parent
(``PR_SET_PDEATHSIG``), and is restarted with exponential back-off. Its exit is seen by polling its
return code, never by ``Process.wait()``: asyncio resolves ``wait()`` only once the child's pipes
have closed, and a grandchild that inherited them (Triton's python-backend stubs do) keeps them
open after the child is gone. When a child dies, whatever is left of its process group is killed
and the shared-memory files its members had mapped are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("prelabel.processes")

SHM = Path("/dev/shm")


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGTERM to the child when its parent dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Backoff:
    """1 s, doubling up to 30 s; back to 1 s once a run lasted a minute."""

    def __init__(self, first_s: float = 1.0, most_s: float = 30.0, healthy_after_s: float = 60.0) -> None:
        self.first_s, self.most_s, self.healthy_after_s = first_s, most_s, healthy_after_s
        self.delay_s = first_s

    def after_run(self, ran_s: float) -> float:
        """The delay before the next start, given how long the last run lasted."""
        if ran_s > self.healthy_after_s:
            self.delay_s = self.first_s
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.most_s)
        return delay


async def wait_exit(process: asyncio.subprocess.Process, timeout_s: float | None = None, poll_s: float = 0.2
                    ) -> int | None:  # fmt: skip
    """The exit code once ``process`` has exited (None if ``timeout_s`` passes first), whatever holds its pipes."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while process.returncode is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(poll_s)
    return process.returncode


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (zombies excluded), from ``/proc``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def shared_memory_of(pids: list[int]) -> set[Path]:
    """The ``/dev/shm`` files that ``pids`` have open or mapped."""
    found: set[Path] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith(f"{SHM}/"):
                    found.add(Path(path.removesuffix(" (deleted)")))
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(f"{SHM}/"):
                    found.add(Path(target.removesuffix(" (deleted)")))
        except OSError:
            continue
    return found


async def kill_group(pgid: int, what: str, timeout_s: float = 5.0) -> None:
    """SIGKILL every process left in group ``pgid`` and remove the shared memory they held."""
    members = group_members(pgid)
    if not members:
        return
    regions = shared_memory_of(members)
    log.warning("%s left %d process(es) behind (pids %s); killing them", what, len(members), members)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    # Orphans are not our children: nothing signals their end, so /proc is polled.
    while group_members(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for region in regions:
        try:
            region.unlink()
            log.info("removed %s, left by %s", region, what)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s, left by %s: %s", region, what, exc)


class ProcessPool:
    """``count`` copies of one ``prelabel`` command, each restarted with back-off when it exits unexpectedly.

    Children are fresh interpreters (never forked: the parent's gRPC threads must not be), configured
    through ``env``, dying with the parent; their log lines go to the parent's standard error.
    ``on_exit(pid)`` runs after a child has exited, before it is restarted.
    """

    def __init__(self, what: str, command: list[str], env: Callable[[int], dict[str, str]], count: int,
                 on_exit: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.what, self.command, self.env, self.count, self.on_exit = what, command, env, count, on_exit
        self._tasks: list[asyncio.Task[None]] = []
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    def start(self) -> None:
        for n in range(self.count):
            self._tasks.append(asyncio.create_task(self._keep_running(n), name=f"{self.what}-{n}"))

    async def _keep_running(self, n: int) -> None:
        backoff = Backoff()
        while not self._stopping:
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "prelabel.cli.main", *self.command,
                env=self.env(n), stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the children in order
            )  # fmt: skip
            self.processes[n] = process
            log.info("%s %d started (pid %d)", self.what, n, process.pid)
            code = await wait_exit(process)
            if self.on_exit is not None:
                self.on_exit(process.pid)
            if self._stopping:
                return
            await kill_group(process.pid, f"{self.what} {n}")
            delay = backoff.after_run(time.monotonic() - started)
            log.error("%s %d exited unexpectedly (code %s); restarting in %.0fs", self.what, n, code, delay)
            await asyncio.sleep(delay)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to every child (each finishes its work in order); SIGKILL after ``grace_s``."""
        self._stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            if await wait_exit(process, grace_s) is None:
                log.warning("%s pid %d did not stop within %.0fs; killing it", self.what, process.pid, grace_s)
            await kill_group(process.pid, f"{self.what} pid {process.pid}")
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
