#!/usr/bin/env python3
"""From labels to better pre-labels: a fine-tune through the service vs the same work in-process, one run.

    .venv/bin/python bench/finetune_service.py [--per-class 10 50] [--strategy feature_extraction] [--repeats 2]

Starts the real ``prelabel serve`` (embedded Triton, one trainer, SQLite queue) on free ports. For
each dataset size it measures, alternating the two paths so that machine noise hits both alike:

- service: ``UploadExamples`` of PNG files, ``CreateFineTuneJob``, ``WatchJob`` to SUCCEEDED, then
  the first ``Predict`` answered by the new version;
- in-process: decode the same files, ``engine.train`` with the same strategy, ``publish`` and
  ``load_into_triton`` on the same Triton, then the same first ``Predict``.

It prints seconds per phase (medians over the repeats) and the service/in-process ratio: the cost
of durability (queue writes, heartbeats, the trainer's poll), the upload, and the hand-over
between processes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prelabel.datasets import shapes
from prelabel.settings import Settings
from prelabel.training import data, engine
from prelabel.training.publish import load_into_triton, publish
from prelabel.triton.repository import repository_for
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode
from tests.stack import Stack, wait_for_health

UPLOAD_CHUNK = 64


def labelled(per_class: int, seed: int) -> tuple[list[bytes], list[str]]:
    images, labels = shapes.sample(per_class * len(shapes.NOVEL_CLASSES), 96, seed, shapes.NOVEL_CLASSES)
    return [encode(im, "PNG") for im in images], [shapes.NOVEL_CLASSES[y] for y in labels]


def first_predict(predict: rpc.PredictionServiceStub, model: str, version: str, probe: bytes) -> None:
    """Wait until ``model`` answers with ``version`` (Triton may still be loading it)."""
    while True:
        try:
            response = predict.Predict(pb.PredictRequest(model=model, images=[pb.Image(id="p", content=probe)]),
                                       timeout=60)  # fmt: skip
            if response.version == version:
                return
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise
        time.sleep(0.05)


def via_service(channel: grpc.Channel, name: str, images: list[bytes], labels: list[str], strategy: str,
                probe: bytes) -> dict[str, float]:  # fmt: skip
    t0 = time.perf_counter()
    requests = [
        pb.UploadExamplesRequest(dataset=name, examples=[pb.Example(image=pb.Image(content=c), label=y)
                                                         for c, y in zip(images[i : i + UPLOAD_CHUNK],
                                                                         labels[i : i + UPLOAD_CHUNK], strict=True)])
        for i in range(0, len(images), UPLOAD_CHUNK)
    ]  # fmt: skip
    rpc.DatasetServiceStub(channel).UploadExamples(iter(requests), timeout=600)
    t1 = time.perf_counter()
    jobs = rpc.JobServiceStub(channel)
    job = jobs.CreateFineTuneJob(pb.CreateFineTuneJobRequest(
        dataset=name, output_model=name, strategy=pb.Strategy.Value(strategy)), timeout=60)  # fmt: skip
    *_, job = jobs.WatchJob(pb.WatchJobRequest(id=job.id), timeout=3600)  # the last update: a terminal state
    assert job.state == pb.SUCCEEDED, job.error
    t2 = time.perf_counter()
    first_predict(rpc.PredictionServiceStub(channel), name, job.model_version, probe)
    t3 = time.perf_counter()
    return {"upload / decode": t1 - t0, "train": job.metrics["train_seconds"], "job: train, publish, load": t2 - t1,
            "first predict": t3 - t2, "total": t3 - t0}  # fmt: skip


def in_process(stack: Stack, channel: grpc.Channel, name: str, images: list[bytes], labels: list[str],
               strategy: str, probe: bytes) -> dict[str, float]:  # fmt: skip
    repository = repository_for(Settings(data_dir=stack.data_dir))
    t0 = time.perf_counter()
    base = engine.load_base(repository, "prelabel-base")
    examples = data.from_encoded(images, labels, base.preprocess)
    t1 = time.perf_counter()
    result = engine.train(base, examples, engine.TrainConfig(strategy=strategy))
    trained = time.perf_counter()
    version = publish(repository, name, result, base)
    assert asyncio.run(load_into_triton(stack.triton_url, name))
    t2 = time.perf_counter()
    first_predict(rpc.PredictionServiceStub(channel), name, str(version), probe)
    t3 = time.perf_counter()
    return {"upload / decode": t1 - t0, "train": trained - t1, "job: train, publish, load": t2 - t1,
            "first predict": t3 - t2, "total": t3 - t0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--strategy", default="feature_extraction")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    strategy = f"STRATEGY_{args.strategy.upper()}"
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack.serve(Path(tmp), trainer_poll_s=1.0)
        try:
            wait_for_health(stack.address)
            probe = labelled(1, 999)[0][0]
            with grpc.insecure_channel(stack.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
                print("| labels/class | images | phase | service s | in-process s | ratio |")
                print("|---|---|---|---|---|---|")
                for per_class in args.per_class:
                    images, labels = labelled(per_class, per_class)
                    runs: dict[str, list[dict[str, float]]] = {"service": [], "in-process": []}
                    for r in range(args.repeats):
                        tag = f"b{per_class}-{r}"
                        runs["service"].append(via_service(ch, f"svc-{tag}", images, labels, strategy, probe))
                        runs["in-process"].append(in_process(stack, ch, f"inp-{tag}", images, labels, strategy, probe))
                    for phase in runs["service"][0]:
                        s = statistics.median(x[phase] for x in runs["service"])
                        i = statistics.median(x[phase] for x in runs["in-process"])
                        print(f"| {per_class} | {len(images)} | {phase} | {s:.2f} | {i:.2f} | {s / i:.2f} |")
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
