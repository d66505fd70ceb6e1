#!/usr/bin/env python3
"""Gateway overhead: the same images through the Prelabel gateway and straight to Triton, one run.

    .venv/bin/python bench/gateway_vs_triton.py [--seconds 4] [--batches 1 8 32] [--concurrency 1 4 16]

Starts the real ``prelabel serve`` (embedded Triton) on free ports. For every batch size and
concurrency it alternates the two paths (direct, gateway, direct, gateway...) so that machine noise
hits both alike, and prints images/s, p50 and p99 per path and their ratios. Both paths send the
encoded images (one flat UINT8 tensor) and ask for the same outputs; the gateway adds header checks, top-k,
uncertainty and protobuf building. Client, gateway and Triton share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prelabel.datasets import shapes
from prelabel.triton.client import TritonClient
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode
from tests.stack import Stack, wait_for_health


def images(count: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode(shapes.render(i % len(shapes.CLASSES), size, rng), "JPEG", quality=90) for i in range(count)]


async def load(call, batch: list[bytes], concurrency: int, seconds: float) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """Run ``concurrency`` closed loops for ``seconds``; returns (images/s, latencies)."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call(batch)
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) * len(batch) / (time.perf_counter() - started), latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children: Triton is counted apart)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per configuration")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="prelabel-bench-"))
    stack = Stack.serve(data_dir, triton_max_batch_size=64)
    try:
        wait_for_health(stack.address)
        pool = images(max(args.batches), args.image_size)
        triton = TritonClient(stack.triton_url)
        channel = grpc.aio.insecure_channel(stack.address)
        stub = rpc.PredictionServiceStub(channel)

        async def direct(batch: list[bytes]) -> None:
            await triton.infer("prelabel-base", "", batch, False, 60)

        async def gateway(batch: list[bytes]) -> None:
            await stub.Predict(
                pb.PredictRequest(images=[pb.Image(id=str(i), content=c) for i, c in enumerate(batch)]), timeout=60
            )

        for call in (direct, gateway):  # warm up both paths
            await load(call, pool[:8], 2, 1.0)
        print(f"{args.image_size}px JPEG to prelabel-base, {args.seconds:.0f}s x {args.rounds} rounds per path")
        header = (
            f"{'batch':>5} {'conc':>4} | {'direct img/s':>12} {'p50 ms':>7} {'p99 ms':>7} | "
            f"{'gateway img/s':>13} {'p50 ms':>7} {'p99 ms':>7} | {'thr ratio':>9} {'+p50 ms':>8} | "
            f"{'gw CPU ms/call':>14}"
        )
        print(header)
        print("-" * len(header))
        for b in args.batches:
            for c in args.concurrency:
                results: dict[str, tuple[list[float], list[float]]] = {"direct": ([], []), "gateway": ([], [])}
                gateway_cpu = 0.0
                for _ in range(args.rounds):
                    for name, call in (("direct", direct), ("gateway", gateway)):
                        cpu = cpu_seconds(stack.process.popen.pid)
                        rate, lat = await load(call, pool[:b], c, args.seconds)
                        if name == "gateway":
                            gateway_cpu += cpu_seconds(stack.process.popen.pid) - cpu
                        results[name][0].append(rate)
                        results[name][1].extend(lat)
                d_rate, g_rate = statistics.median(results["direct"][0]), statistics.median(results["gateway"][0])
                d_lat, g_lat = results["direct"][1], results["gateway"][1]
                print(
                    f"{b:>5} {c:>4} | {d_rate:>12.0f} {pct(d_lat, 50):>7.1f} {pct(d_lat, 99):>7.1f} | "
                    f"{g_rate:>13.0f} {pct(g_lat, 50):>7.1f} {pct(g_lat, 99):>7.1f} | "
                    f"{g_rate / d_rate:>9.2f} {pct(g_lat, 50) - pct(d_lat, 50):>8.2f} | "
                    f"{gateway_cpu / len(g_lat) * 1000:>14.2f}",
                    flush=True,
                )
        await channel.close()
        await triton.close()
    finally:
        stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
