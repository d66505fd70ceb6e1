"""Errors of Prelabel's transport-free core, each carrying the gRPC status code it maps to.

The core raises these; one interceptor (``prelabel.gateway.interceptors``) turns them into statuses,
so no servicer maps errors by hand. Messages say what happened and what to do.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import grpc


class PrelabelError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PrelabelError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PrelabelError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(PrelabelError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(PrelabelError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(PrelabelError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PrelabelError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(PrelabelError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PrelabelError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(PrelabelError):
    code = grpc.StatusCode.INTERNAL


def quote(value: str, limit: int = 64) -> str:
    """``repr`` of a client's value for an error message, at most ``limit`` characters of it.

    Echoing a 20,000-character name whole would push the status message past gRPC's metadata limit
    (and the client would see RESOURCE_EXHAUSTED instead of the real problem).
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


def parse_number(text: str, what: str, hint: str) -> int:
    """A non-negative decimal integer that a client sent as text, or INVALID_ARGUMENT saying what to send.

    ``str.isdigit`` accepts '²' and any number of digits; ``int`` then fails or exceeds what SQLite
    and the int-digit limit allow. Only ASCII digits, at most 18 of them (fits a signed 64-bit integer).
    """
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise InvalidArgument(f"{what} {quote(text)} is not valid: {hint}")
    return int(text)


_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, named from Python 3.11 on
_NEARLY_FULL = 1 << 20  # bytes: SQLite grows its files by pages and WAL index blocks of 32 KB


def volume_full(exc: BaseException, where: Path | None = None) -> ResourceExhausted | None:
    """``exc`` said as what it is when the data volume (or the user's quota on it) is full; else None.

    A full volume is for an operator to fix, not a bug: clients get RESOURCE_EXHAUSTED that says so (not
    INTERNAL and a traceback), and a job's error what to do. SQLite says SQLITE_FULL, or, when its WAL
    index cannot grow, only "disk I/O error" (SQLITE_IOERR_SHMSIZE): for its errors ``where`` (the
    database's folder) is looked at, and one with under 1 MB free is full.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = os.strerror(exc.errno)
    elif isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL
        or "disk is full" in str(exc)
        or (where is not None and _free_bytes(where) < _NEARLY_FULL)
    ):
        why = f"the job queue's database: {exc}"
    else:
        return None
    return ResourceExhausted(
        f"the data volume is full ({why}); nothing was saved: free space on it or grow it "
        "(docs/operations.md#prelabeldatavolumefull), then try again"
    )


def _free_bytes(folder: Path) -> int:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return _NEARLY_FULL  # not known: not said to be full
    return stats.f_bavail * stats.f_frsize
