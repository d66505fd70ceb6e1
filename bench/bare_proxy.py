#!/usr/bin/env python3
"""The floor of any Python gRPC hop in front of Triton: a bare grpc.aio pass-through, for benchmarks.

    .venv/bin/python bench/bare_proxy.py --triton HOST:PORT [--port 0]

Forwards Triton's ``ModelInfer`` as opaque bytes (no parsing, no checks, no metrics) over one
grpc.aio channel, exactly as the gateway's second hop does, and prints ``bare proxy listening on
PORT``. A benchmark sends the same requests straight to Triton, through this proxy and through the
gateway: proxy minus straight is what the hop itself costs (grpc.aio on both sides of one process),
gateway minus proxy is Prelabel's own work. With Triton taking about 13 ms per call the hop alone
measured +0.8-0.95 ms p50 and 1.0 ms of CPU per call on the 2-core machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"
OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


def _same(data: bytes) -> bytes:
    return data


async def serve(triton: str, port: int) -> None:
    channel = grpc.aio.insecure_channel(triton, options=OPTIONS)
    infer = channel.unary_unary(METHOD, request_serializer=_same, response_deserializer=_same)

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            response: bytes = await infer(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return response

    handler = grpc.unary_unary_rpc_method_handler(model_infer, request_deserializer=_same, response_serializer=_same)
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": handler}
    )])  # fmt: skip
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare proxy listening on {bound}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)
    await channel.close()


@contextlib.contextmanager
def started(triton: str) -> Iterator[tuple[str, int]]:
    """The proxy in a process of its own (its CPU apart from the client's): (address, pid)."""
    process = subprocess.Popen([sys.executable, __file__, "--triton", triton], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("bare proxy listening on "):
            raise RuntimeError(f"the bare proxy did not start (exit code {process.wait(10)})")
        yield f"127.0.0.1:{line.split()[-1]}", process.pid
    finally:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", required=True, help="Triton's gRPC HOST:PORT")
    parser.add_argument("--port", type=int, default=0, help="where to listen (0: a free port)")
    args = parser.parse_args()
    asyncio.run(serve(args.triton, args.port))
