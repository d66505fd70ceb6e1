"""Child processes whose own children outlive them (Triton's python-backend stubs do): real processes."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import pytest

from prelabel.processes import Backoff, die_with_parent, group_members, kill_group, shared_memory_of, wait_exit

# The child leaves a grandchild that keeps its stdout pipe and a /dev/shm file open, then exits:
# what a killed tritonserver leaves behind when its stub hangs.
LEAVES_AN_ORPHAN = """
import os, subprocess, sys, time
region = open(sys.argv[1], "w+b")
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(region.fileno(),))
print("started", flush=True)
time.sleep(0.3)
"""


async def _run_orphan_maker(region: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEAVES_AN_ORPHAN, str(region),
        stdout=asyncio.subprocess.PIPE, preexec_fn=die_with_parent, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert await process.stdout.readline() == b"started\n"
    # asyncio's wait() needs the pipe closed too, and the orphan holds it: it would never return.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(process.wait()), 3.0)
    assert await wait_exit(process, timeout_s=5.0) == 0
    (orphan,) = group_members(process.pid)
    assert region in shared_memory_of([orphan])
    await kill_group(process.pid, "test child")
    assert group_members(process.pid) == []
    assert not await asyncio.to_thread(region.exists)
    assert await asyncio.wait_for(process.wait(), 5.0) == 0  # the pipe closed with the orphan


def test_exit_is_seen_and_the_orphans_are_killed_with_their_shared_memory():
    region = Path("/dev/shm") / f"prelabel-test-{uuid.uuid4().hex}"
    try:
        asyncio.run(_run_orphan_maker(region))
    finally:
        region.unlink(missing_ok=True)


def test_backoff_doubles_to_a_ceiling_and_resets_after_a_healthy_run():
    backoff = Backoff(first_s=1, most_s=4, healthy_after_s=60)
    assert [backoff.after_run(1) for _ in range(4)] == [1, 2, 4, 4]
    assert backoff.after_run(61) == 1
    assert backoff.after_run(1) == 2
