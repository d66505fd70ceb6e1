"""Child processes that ``prelabel serve`` keeps running (Triton, trainers): start, watch, restart, clean up.

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
import time
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
