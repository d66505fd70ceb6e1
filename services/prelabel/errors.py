"""Errors of Prelabel's transport-free core, each carrying the gRPC status code it maps to.

The core raises these; one interceptor (``prelabel.gateway.interceptors``) turns them into statuses,
so no servicer maps errors by hand. Messages say what happened and what to do.
"""

from __future__ import annotations

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
