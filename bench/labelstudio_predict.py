#!/usr/bin/env python3
"""Large /predict batches from Label Studio: do they stay within its 100 s timeout, and what does the adapter cost?

    .venv/bin/python bench/labelstudio_predict.py [--tasks 100 1000 4000] [--rounds 2]

Starts the real ``prelabel serve`` (embedded Triton) and ``prelabel labelstudio`` on free ports, and
a small HTTP server that plays Label Studio's file storage (``/data/upload/...`` behind a token).
For each batch size it alternates two paths on the same 256 px JPEGs: Label Studio's call, one
``POST /predict`` with every task (the adapter fetches each image over HTTP, calls ``Predict`` in
batches of 32 and maps labels to choices), and the gRPC client alone (``Predict`` in batches of 32,
two in flight, images already in memory). Prints seconds per call, tasks/s and their ratio, and
the share of Label Studio's timeout (``ML_TIMEOUT_PREDICT``, 100 s) the call used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from prelabel.datasets import formulas
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode
from tests.stack import Process, Stack, environment, free_port, wait_for_health

LABEL_STUDIO_TIMEOUT_S = 100.0
BATCH = 32
TOKEN = "bench-token"


def pictures(count: int) -> list[bytes]:
    images, _ = formulas.sample(min(count, 256), 256, 0)
    encoded = [encode(Image.fromarray(im), "JPEG", quality=90) for im in images]
    return [encoded[i % len(encoded)] for i in range(count)]


async def file_server(blobs: list[bytes], port: int) -> web.AppRunner:
    async def serve(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            return web.Response(status=401)
        return web.Response(body=blobs[int(request.match_info["i"])], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/data/upload/1/{i}.jpg", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    blobs = pictures(max(args.tasks))
    work = Path(tempfile.mkdtemp(prefix="prelabel-bench-"))
    stack = Stack.serve(work / "serve")
    wait_for_health(stack.address)
    storage_port, adapter_port = free_port(), free_port()
    storage = await file_server(blobs, storage_port)
    adapter = Process(["labelstudio", "--port", str(adapter_port), "--server", stack.address],
                      environment(work / "adapter")).start()  # fmt: skip
    config = ('<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
              + "".join(f'<Choice value="{c}"/>' for c in formulas.CLASSES[:8]) + "</Choices></View>")  # fmt: skip
    try:
        adapter.wait_for_line(re.compile(r"listening on http://[\d.]+:(\d+)"), timeout=60)
        url = f"http://127.0.0.1:{adapter_port}"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
            grpc.aio.insecure_channel(stack.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel,
        ):
            setup = {"project": "1.1", "schema": config, "hostname": f"http://127.0.0.1:{storage_port}",
                     "access_token": TOKEN}  # fmt: skip
            async with session.post(f"{url}/setup", json=setup) as r:
                assert r.status == 200, await r.text()
            stub = rpc.PredictionServiceStub(channel)

            async def studio(n: int) -> None:
                tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.jpg"}} for i in range(n)]
                async with session.post(f"{url}/predict", json={"tasks": tasks, "project": "1.1"}) as r:
                    body = json.loads(await r.text())
                    assert r.status == 200 and len(body["results"]) == n, body

            async def direct(n: int) -> None:
                gate = asyncio.Semaphore(2)

                async def one(k: int) -> None:
                    async with gate:
                        images = [pb.Image(id=str(i), content=blobs[i]) for i in range(k, min(n, k + BATCH))]
                        await stub.Predict(pb.PredictRequest(images=images, top_k=8), timeout=600)

                await asyncio.gather(*(one(k) for k in range(0, n, BATCH)))

            await studio(64)  # warm-up: both paths, the model loaded
            await direct(64)
            print("| tasks | /predict s | tasks/s | gRPC alone s | tasks/s | ratio (adapter/gRPC throughput) | "
                  "share of Label Studio's 100 s |")  # fmt: skip
            print("|---|---|---|---|---|---|---|")
            for n in args.tasks:
                times: dict[str, list[float]] = {"studio": [], "direct": []}
                for _ in range(args.rounds):
                    for name, call in (("direct", direct), ("studio", studio)):
                        started = time.perf_counter()
                        await call(n)
                        times[name].append(time.perf_counter() - started)
                s, d = statistics.median(times["studio"]), statistics.median(times["direct"])
                print(f"| {n} | {s:.2f} | {n / s:.0f} | {d:.2f} | {n / d:.0f} | {d / s:.2f} | "
                      f"{100 * max(times['studio']) / LABEL_STUDIO_TIMEOUT_S:.0f} % |", flush=True)  # fmt: skip
    finally:
        adapter.stop()
        await storage.cleanup()
        stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
