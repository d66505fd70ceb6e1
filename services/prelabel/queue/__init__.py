"""The durable fine-tune job queue: one contract (:mod:`.contract`), two backends chosen by URL."""

from __future__ import annotations

from prelabel.errors import InvalidArgument
from prelabel.queue.contract import JobQueue


def open_queue(url: str) -> JobQueue:
    """``sqlite:///PATH`` (embedded, the default) or ``redis://HOST:PORT/DB`` (many machines)."""
    if url.startswith("sqlite:///"):
        from prelabel.queue.sqlite import SQLiteQueue

        return SQLiteQueue(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://")):
        from prelabel.queue.redis import RedisQueue

        return RedisQueue(url)
    raise InvalidArgument(f"queue URL {url!r}: use sqlite:///PATH or redis://HOST:PORT/DB")
