"""The one place where errors become gRPC statuses, and where every RPC is counted and timed.

Like KServe's single error-mapping interceptor: servicers and the core raise ``PrelabelError``s;
this turns them into ``context.abort(code, message)``. Anything else is a bug: it is logged with
its traceback and answered INTERNAL, without leaking internals to the client.

Bytes that do not parse as the request message never reach a servicer: gRPC would answer them
UNKNOWN (unary) or INTERNAL (streaming) and log a traceback each time. The deserializer installed
here turns them into a :class:`Malformed` marker, answered INVALID_ARGUMENT like any bad field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from prelabel import metrics
from prelabel.errors import InvalidArgument, PrelabelError, volume_full

log = logging.getLogger("prelabel.gateway")


class _Call:
    """Bookkeeping of one RPC: in-flight gauge, latency, and the status code it ended with."""

    def __init__(self, method: str, streaming: bool) -> None:
        self.method = method
        self.streaming = streaming
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        metrics.IN_FLIGHT.labels(method).inc()
        if streaming:
            metrics.OPEN_STREAMS.labels(method).inc()

    async def fail(self, exc: BaseException, context: aio.ServicerContext) -> None:
        if isinstance(exc, GeneratorExit):  # the client went away while we were streaming to it
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        full = volume_full(exc)
        if full is not None:  # for an operator to fix: said once in the log, without a traceback
            log.error("%s failed: %s [%s]", self.method, full.message, exc)
            exc = full
        if isinstance(exc, PrelabelError):
            self.code = exc.code
            await context.abort(exc.code, exc.message)
        if isinstance(exc, asyncio.CancelledError):
            remaining = context.time_remaining()
            self.code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
            raise exc
        if isinstance(exc, aio.AbortError):
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        self.code = grpc.StatusCode.INTERNAL
        log.exception("%s failed with an unexpected error", self.method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}; the gateway log has details")

    def done(self) -> None:
        metrics.IN_FLIGHT.labels(self.method).dec()
        if self.streaming:
            metrics.OPEN_STREAMS.labels(self.method).dec()
        metrics.RPCS.labels(self.method, self.code.name).inc()
        metrics.RPC_LATENCY.labels(self.method).observe(time.perf_counter() - self.started)


class Malformed:
    """What the deserializer returns for bytes that are not a valid request message."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.error = InvalidArgument(
            f"the request is not a valid {message_type} message ({str(error)[:200] or type(error).__name__}); "
            "check that the client was generated from the same protos/ as this server"
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None, message_type: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and whatever else a hostile byte string provokes
            return Malformed(message_type, exc)

    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise request.error
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class ErrorsAndMetrics(aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        # grpc.health.v1.Health/Watch and reflection streams live as long as their clients: not counted.
        if details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        streamed_requests = handler.request_streaming
        message_type = details.method.strip("/").rsplit("/", 1)[0] + f"/{method} request"
        deserializer = _tolerant(handler.request_deserializer, message_type)

        def checked(request: Any) -> Any:
            return _checked_stream(request) if streamed_requests else _checked(request)

        if handler.unary_unary or handler.stream_unary:
            behaviour = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                call = _Call(method, streaming=handler.stream_unary is not None)
                try:
                    return await behaviour(checked(request), context)
                except BaseException as exc:
                    await call.fail(exc, context)
                finally:
                    call.done()

            return same_shape(handler, unary, None, deserializer)

        behaviour = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(method, streaming=True)
            try:
                async for response in behaviour(checked(request), context):
                    yield response
            except BaseException as exc:
                await call.fail(exc, context)
            finally:
                call.done()

        return same_shape(handler, None, streaming, deserializer)


def same_shape(handler: grpc.RpcMethodHandler, unary: Any, streaming: Any, deserializer: Any = None
               ) -> grpc.RpcMethodHandler:  # fmt: skip
    """A handler like ``handler`` (its kind and serializers) that runs ``unary`` or ``streaming`` instead.

    ``unary`` serves the calls that answer once (unary-unary, stream-unary), ``streaming`` the others.
    """
    kwargs: dict[str, Any] = {
        "request_deserializer": deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
