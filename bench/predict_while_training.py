#!/usr/bin/env python3
"""Predict while a fine-tune trains on the same machine (``prelabel serve``), by how OpenMP threads wait.

    .venv/bin/python bench/predict_while_training.py [--calls 60] [--images 8] [--seconds 15]

For each way libgomp's threads wait at a barrier (``POLICIES``: spinning, libgomp's default and
``serve``'s before 2026-12-05; ``OMP_WAIT_POLICY=PASSIVE``, ``serve``'s now; shorter spins) it starts the real
``prelabel serve`` (embedded Triton, gateway, one trainer) on free ports with it and measures, one
after the other:

- idle: the latency of ``Predict`` calls (``--images`` JPEGs each, one call at a time, as an
  annotator waiting for pre-labels), then the throughput of 4 concurrent callers;
- training alone: a long full fine-tune starts; its images/s (the trainer's
  ``prelabel_training_images_per_second``) over ``--seconds`` with no Predict;
- training and predicting: the same ``Predict`` latency while it trains, and its images/s meanwhile.

It prints each figure per policy and its ratio to spinning's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prelabel.datasets import shapes
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode
from tests.stack import Stack, wait_for_health

# How libgomp's threads wait at a barrier. "spin" is its default (300,000 turns when OMP_WAIT_POLICY is unset
# and no more threads than cores), as `serve` ran before 2026-12-05; PASSIVE sleeps at once, what `serve` now
# gives Triton and trainers; "spin 10000" in between. Setting either variable keeps `serve` from its default.
POLICIES: dict[str, dict[str, str]] = {
    "spin": {"GOMP_SPINCOUNT": "300000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},
}
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def latencies(predict: rpc.PredictionServiceStub, request: pb.PredictRequest, calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        predict.Predict(request, timeout=120)
        seconds.append(time.perf_counter() - start)
    return seconds


def throughput(
    predict: rpc.PredictionServiceStub, request: pb.PredictRequest, seconds: float, callers: int = 4
) -> float:
    """Images/s that ``callers`` threads calling back to back get."""
    done = [0] * callers
    deadline = time.monotonic() + seconds

    def call(i: int) -> None:
        while time.monotonic() < deadline:
            predict.Predict(request, timeout=120)
            done[i] += len(request.images)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


class TrainingSpeed(threading.Thread):
    """Samples the trainer's images/s from ``serve``'s /metrics once a second until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.samples: list[float] = []

    def run(self) -> None:
        while not self.stop.wait(1.0):
            text = urllib.request.urlopen(self.url, timeout=10).read().decode()
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("prelabel_training_images_per_second{")]  # fmt: skip
            if values and values[0] > 0:
                self.samples.append(values[0])

    def measure(self, seconds: float) -> float:
        self.samples.clear()
        time.sleep(seconds)
        return statistics.median(self.samples) if self.samples else float("nan")


def run(policy: dict[str, str], args: argparse.Namespace, request: pb.PredictRequest,
        examples: list[pb.Example]) -> dict[str, float]:  # fmt: skip
    for name in OMP_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(policy)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="prelabel-bench-") as folder:
        stack = Stack.serve(Path(folder))
        try:
            wait_for_health(stack.address)
            with grpc.insecure_channel(stack.address) as channel:
                predict, jobs = rpc.PredictionServiceStub(channel), rpc.JobServiceStub(channel)
                upload = pb.UploadExamplesRequest(dataset="b", examples=examples)
                rpc.DatasetServiceStub(channel).UploadExamples(iter([upload]))
                latencies(predict, request, 10)  # warm-up
                idle = latencies(predict, request, args.calls)
                figures["idle: Predict p50 ms"] = statistics.median(idle) * 1e3
                figures["idle: Predict p95 ms"] = statistics.quantiles(idle, n=20)[-1] * 1e3
                figures["idle: 4 callers, images/s"] = throughput(predict, request, args.seconds)
                job = jobs.CreateFineTuneJob(pb.CreateFineTuneJobRequest(
                    dataset="b", output_model="b", strategy=pb.STRATEGY_FULL_FINE_TUNE, epochs=1000,
                    request_id=uuid.uuid4().hex))  # fmt: skip
                while "step" not in jobs.GetJob(pb.GetJobRequest(id=job.id)).message:
                    time.sleep(0.5)  # decoding done: the training loop runs
                assert stack.metrics_url
                speed = TrainingSpeed(stack.metrics_url)
                speed.start()
                figures["training alone: images/s"] = speed.measure(args.seconds)
                busy = []
                sampler = threading.Thread(target=lambda: busy.append(speed.measure(args.seconds)))
                sampler.start()
                during = latencies(predict, request, args.calls)
                sampler.join()
                figures["training: Predict p50 ms"] = statistics.median(during) * 1e3
                figures["training: Predict p95 ms"] = statistics.quantiles(during, n=20)[-1] * 1e3
                figures["training while predicting: images/s"] = busy[0]
                speed.stop.set()
                state = jobs.GetJob(pb.GetJobRequest(id=job.id))
                assert state.state == pb.RUNNING, f"the job stopped during the measurement: {state}"
                jobs.CancelJob(pb.CancelJobRequest(id=job.id))
        finally:
            stack.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    photos = [encode(shapes.render(i % 10, 256, rng), "JPEG", quality=90) for i in range(args.images)]
    request = pb.PredictRequest(images=[pb.Image(id=str(i), content=c) for i, c in enumerate(photos)])
    images, labels = shapes.sample(20 * len(shapes.NOVEL_CLASSES), 96, 1, shapes.NOVEL_CLASSES)
    examples = [pb.Example(image=pb.Image(id=str(i), content=encode(im, "PNG")), label=shapes.NOVEL_CLASSES[y])
                for i, (im, y) in enumerate(zip(images, labels, strict=True))]  # fmt: skip

    results = {name: run(policy, args, request, examples) for name, policy in POLICIES.items()}
    print(f"Predict of {args.images} JPEGs (256 px); {args.calls} calls one at a time, {args.seconds:.0f} s "
          f"per throughput figure; `prelabel serve` on {os.cpu_count()} cores")  # fmt: skip
    others = [name for name in POLICIES if name != "spin"]
    print(f"{'figure':<40} {'spin':>8}" + "".join(f" {name:>11} {'/ spin':>7}" for name in others))
    for figure, before in results["spin"].items():
        cells = "".join(f" {results[n][figure]:>11.1f} {results[n][figure] / before:>7.2f}" for n in others)
        print(f"{figure:<40} {before:>8.1f}{cells}")


if __name__ == "__main__":
    main()
