#!/usr/bin/env python3
"""Gateway overhead: the same images through the Prelabel gateway and straight to Triton, one run.

    .venv/bin/python bench/gateway_vs_triton.py [--seconds 4] [--batches 1 8 32] [--concurrency 1 4 16]

Starts the real ``prelabel serve`` (embedded Triton) on free ports. For every batch size and
concurrency it alternates the two paths (direct, gateway, direct, gateway...) so that machine noise
hits both alike, and prints images/s, p50 and p99 per path and their ratios. A third path goes through
``bench/bare_proxy.py``, a bare grpc.aio pass-through to the same Triton: what one Python gRPC hop
costs by itself, so that the gateway's overhead splits into the hop (proxy - direct) and Prelabel's
own work (gateway - proxy). All paths send the encoded images (one flat UINT8 tensor) and ask for the
same outputs; the gateway adds limits, top-k, uncertainty and protobuf building. Client, gateway,
proxy and Triton share this machine's cores.
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

from bench import bare_proxy
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
        with bare_proxy.started(stack.triton_url) as (proxy_address, proxy_pid):
            await measure(args, stack, proxy_address, proxy_pid)
    finally:
        stack.stop()


async def measure(args: argparse.Namespace, stack: Stack, proxy_address: str, proxy_pid: int) -> None:
    pool = images(max(args.batches), args.image_size)
    triton, proxied = TritonClient(stack.triton_url), TritonClient(proxy_address)
    channel = grpc.aio.insecure_channel(stack.address)
    stub = rpc.PredictionServiceStub(channel)

    async def direct(batch: list[bytes]) -> None:
        await triton.infer("prelabel-base", "", batch, False, 60)

    async def proxy(batch: list[bytes]) -> None:
        await proxied.infer("prelabel-base", "", batch, False, 60)

    async def gateway(batch: list[bytes]) -> None:
        await stub.Predict(
            pb.PredictRequest(images=[pb.Image(id=str(i), content=c) for i, c in enumerate(batch)]), timeout=60
        )

    paths = {"direct": (direct, 0), "proxy": (proxy, proxy_pid), "gateway": (gateway, stack.process.popen.pid)}
    for call, _ in paths.values():  # warm up every path
        await load(call, pool[:8], 2, 1.0)
    print(f"{args.image_size}px JPEG to prelabel-base, {args.seconds:.0f}s x {args.rounds} rounds per path; "
          "proxy: bench/bare_proxy.py, a bare grpc.aio pass-through (the floor of any Python hop)")  # fmt: skip
    header = (
        f"{'batch':>5} {'conc':>4} | {'direct img/s':>12} {'p50 ms':>7} | {'proxy img/s':>11} {'p50 ms':>7} | "
        f"{'gateway img/s':>13} {'p50 ms':>7} {'p99 ms':>7} | {'gw/direct':>9} {'gw/proxy':>8} | "
        f"{'+p50 proxy':>10} {'+p50 gw':>8} | {'CPU ms/call proxy':>17} {'gateway':>7}"
    )
    print(header)
    print("-" * len(header))
    for b in args.batches:
        for c in args.concurrency:
            rates: dict[str, list[float]] = {name: [] for name in paths}
            lats: dict[str, list[float]] = {name: [] for name in paths}
            cpu = dict.fromkeys(paths, 0.0)
            for _ in range(args.rounds):
                for name, (call, pid) in paths.items():
                    before = cpu_seconds(pid) if pid else 0.0
                    images_per_s, lat = await load(call, pool[:b], c, args.seconds)
                    cpu[name] += cpu_seconds(pid) - before if pid else 0.0
                    rates[name].append(images_per_s)
                    lats[name].extend(lat)
            rate = {name: statistics.median(r) for name, r in rates.items()}
            p50 = {name: pct(lat, 50) for name, lat in lats.items()}
            per_call = {name: cpu[name] / len(lats[name]) * 1000 for name in paths}
            print(
                f"{b:>5} {c:>4} | {rate['direct']:>12.0f} {p50['direct']:>7.1f} | {rate['proxy']:>11.0f} "
                f"{p50['proxy']:>7.1f} | {rate['gateway']:>13.0f} {p50['gateway']:>7.1f} "
                f"{pct(lats['gateway'], 99):>7.1f} | {rate['gateway'] / rate['direct']:>9.2f} "
                f"{rate['gateway'] / rate['proxy']:>8.2f} | {p50['proxy'] - p50['direct']:>10.2f} "
                f"{p50['gateway'] - p50['direct']:>8.2f} | {per_call['proxy']:>17.2f} {per_call['gateway']:>7.2f}",
                flush=True,
            )
    await channel.close()
    await triton.close()
    await proxied.close()


if __name__ == "__main__":
    asyncio.run(main())
