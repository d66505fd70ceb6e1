#!/usr/bin/env python3
"""Would the gateway's hop to Triton be cheaper as messages on one open stream than as unary calls?

    .venv/bin/python bench/triton_stream.py [--rounds 10] [--seconds 3] [--batch 1]

A unary grpc.aio call costs a call object, headers, a half-close and trailers; a message on an open
``ModelStreamInfer`` stream one write and one read. Here the same requests go to the embedded Triton
both ways from this process (a minimal stream multiplexer: request ids, one reader, one write at a
time), alternating in pairs whose order flips each round. This VM switches between two speeds
(Triton at batch 1: about 13 or 19.5 ms), so every round prints its own p50s and the summary is the
median of the per-round differences, with the client's CPU per call. Result (docs/benchmarks.md):
the stream saves about 0.1 ms of CPU and 0.1-0.2 ms p50 per call, so the gateway keeps unary calls.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc._infer_result import InferResult
from tritonclient.grpc._utils import _get_inference_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_vs_triton import images, load, pct
from prelabel.triton.client import CHANNEL_ARGS, OUTPUTS, TritonClient, image_inputs
from tests.stack import Stack, wait_for_health


class Stream:
    """Concurrent requests as messages on one ModelStreamInfer stream, matched to responses by id."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.aio.insecure_channel(url, options=CHANNEL_ARGS)
        self.call: Any = service_pb2_grpc.GRPCInferenceServiceStub(self.channel).ModelStreamInfer()
        self.waiting: dict[str, asyncio.Future[service_pb2.ModelInferResponse]] = {}
        self.ids = itertools.count()
        self.writing = asyncio.Lock()
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for response in self.call:
            answer = self.waiting.pop(response.infer_response.id)
            if response.error_message:  # Triton sets the failed request's id too
                answer.set_exception(RuntimeError(response.error_message))
            else:
                answer.set_result(response.infer_response)

    async def infer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        request.id = key = str(next(self.ids))
        answer = self.waiting[key] = asyncio.get_running_loop().create_future()
        async with self.writing:
            await self.call.write(request)
        return await answer

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await self.channel.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="per path per round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    stack = Stack.serve(Path(tempfile.mkdtemp(prefix="prelabel-bench-")), triton_max_batch_size=64)
    try:
        wait_for_health(stack.address)
        unary_client, stream = TritonClient(stack.triton_url), Stream(stack.triton_url)

        async def unary(batch: list[bytes]) -> None:
            outputs = await unary_client.infer("prelabel-base", "", batch, False, 60)
            assert outputs.probabilities.shape[0] == len(batch)

        async def streamed(batch: list[bytes]) -> None:
            request = _get_inference_request(
                "prelabel-base", image_inputs(batch), "", "", OUTPUTS, 0, False, False, 0, None, None
            )
            result = InferResult(await stream.infer(request))
            assert result.as_numpy("PROBABILITIES").shape[0] == len(batch)

        paths = {"unary": unary, "stream": streamed}
        batch = images(args.batch, 256)
        for call in paths.values():
            await load(call, batch, args.concurrency, 1.0)
        print(f"batch {args.batch}, {args.concurrency} in flight, {args.seconds:.0f}s per path per round")
        p50: dict[str, list[float]] = {name: [] for name in paths}
        cpu, calls = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0)
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                before = cpu_seconds()
                _, latencies = await load(paths[name], batch, args.concurrency, args.seconds)
                cpu[name] += cpu_seconds() - before
                calls[name] += len(latencies)
                p50[name].append(pct(latencies, 50))
            unary_p50, stream_p50 = p50["unary"][-1], p50["stream"][-1]
            print(f"round {r + 1:>2}: p50 unary {unary_p50:6.2f} ms, stream {stream_p50:6.2f} ms", flush=True)
        saved = statistics.median(u - s for u, s in zip(p50["unary"], p50["stream"], strict=True))
        print(
            f"stream - unary: p50 {-saved:+.2f} ms (median of per-round differences); client CPU per call "
            f"{cpu['unary'] / calls['unary'] * 1000:.3f} -> {cpu['stream'] / calls['stream'] * 1000:.3f} ms"
        )
        await stream.close()
        await unary_client.close()
    finally:
        stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
