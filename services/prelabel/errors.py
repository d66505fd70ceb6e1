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
