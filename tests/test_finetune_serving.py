"""Fine-tuned versions served by the real Triton behind the real gateway: publish, hot swap, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from prelabel.datasets import shapes
from prelabel.models import backbones
from prelabel.preprocessing import decode
from prelabel.settings import Settings
from prelabel.training import data, engine
from prelabel.training.publish import load_into_triton, publish
from prelabel.triton.repository import repository_for
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode, request
from tests.stack import PRELABEL

pytestmark = pytest.mark.stack


def held_out(seed: int, count: int = 36) -> tuple[list[tuple[str, bytes]], list[str]]:
    images, labels = shapes.sample(count, 96, seed, shapes.NOVEL_CLASSES)
    return [(str(i), encode(im, "PNG")) for i, im in enumerate(images)], [shapes.NOVEL_CLASSES[y] for y in labels]


def in_process(result: engine.TrainResult, images: list[bytes]) -> list[str]:
    """The trained model's top labels for ``images``, prepared as its result says, without Triton."""
    pixels = torch.from_numpy(np.stack([decode(image, result.preprocess) for image in images]))
    with torch.no_grad():
        logits, _ = result.model.eval()(backbones.Normalizer(result.preprocess, torch.device("cpu"))(pixels))
    return [result.classes[i] for i in logits.argmax(1).tolist()]


def accuracy(response: pb.PredictResponse, truth: list[str]) -> float:
    return sum(p.labels[0].name == t for p, t in zip(response.predictions, truth, strict=True)) / len(truth)


def auto_accepted(response: pb.PredictResponse, threshold: float | None) -> list[bool]:
    """What auto_accept must be: the calibrated top score at or above the version's threshold."""
    return [threshold is not None and p.labels[0].score >= threshold - 1e-6 for p in response.predictions]


def test_published_versions_are_served_and_swapped_without_errors(stack, channel, predict_stub):
    repository = repository_for(Settings(data_dir=stack.data_dir))
    base = engine.load_base(repository, "prelabel-base")
    images, labels = shapes.sample(20 * len(shapes.NOVEL_CLASSES), 64, 41, shapes.NOVEL_CLASSES)
    examples = data.from_images(images, [shapes.NOVEL_CLASSES[y] for y in labels], base.preprocess)
    first = engine.train(base, examples, engine.TrainConfig(strategy=engine.FEATURE_EXTRACTION))
    assert publish(repository, "novel-shapes", first, base) == 1
    assert asyncio.run(load_into_triton(stack.triton_url, "novel-shapes"))

    test_images, truth = held_out(42)
    response = predict_stub.Predict(request(test_images, model="novel-shapes"), timeout=60)
    assert response.version == "1" and accuracy(response, truth) > 0.6
    assert auto_accepted(response, first.threshold) == [p.auto_accept for p in response.predictions]
    # The same model with a threshold it would need more labels to earn: Predict applies it.
    forced = dataclasses.replace(first, threshold=float(np.median([p.labels[0].score for p in response.predictions])))
    assert publish(repository, "novel-shapes-forced", forced, base) == 1
    assert asyncio.run(load_into_triton(stack.triton_url, "novel-shapes-forced"))
    again = predict_stub.Predict(request(test_images, model="novel-shapes-forced"), timeout=60)
    assert auto_accepted(again, forced.threshold) == [p.auto_accept for p in again.predictions]
    assert 0 < sum(p.auto_accept for p in again.predictions) < len(test_images)

    # Version 2 arrives while clients keep calling: no call fails, and the newest ready version wins.
    errors: list[grpc.RpcError] = []
    versions: set[str] = set()
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                versions.add(predict_stub.Predict(request(test_images[:4], model="novel-shapes"), timeout=60).version)
            except grpc.RpcError as exc:
                errors.append(exc)

    second = engine.train(base, examples, engine.TrainConfig(strategy=engine.FULL_FINE_TUNE, epochs=2))
    callers = [threading.Thread(target=keep_calling) for _ in range(3)]
    for t in callers:
        t.start()
    try:
        assert publish(repository, "novel-shapes", second, base) == 2
        assert asyncio.run(load_into_triton(stack.triton_url, "novel-shapes"))
        deadline = 60.0
        while "2" not in versions and deadline > 0:
            stop.wait(0.5)
            deadline -= 0.5
    finally:
        stop.set()
        for t in callers:
            t.join()
    assert not errors, [e.details() for e in errors]
    assert versions == {"1", "2"}
    assert predict_stub.Predict(request(test_images[:1], model="novel-shapes", version="1"), timeout=60).version == "1"

    model = rpc.ModelServiceStub(channel).GetModel(pb.GetModelRequest(name="novel-shapes"), timeout=10)
    assert model.default_version == "2" and [v.version for v in model.versions] == ["1", "2"]
    v1, v2 = model.versions
    assert v1.strategy == pb.STRATEGY_FEATURE_EXTRACTION and v2.strategy == pb.STRATEGY_FULL_FINE_TUNE
    assert v1.base_model == "prelabel-base/1" and list(v1.labels) == sorted(shapes.NOVEL_CLASSES)
    assert 0 < v1.metrics["val_accuracy"] <= 1 and "auto_accept_coverage" in v1.metrics
    assert "as requested" in v1.strategy_reason

    # Version 3: Triton keeps the newest two loaded (PRELABEL_TRITON_LOADED_VERSIONS), so version 1 is
    # unloaded (each loaded version holds its own python stubs: memory would grow with every fine-tune).
    assert publish(repository, "novel-shapes", first, base) == 3
    assert asyncio.run(load_into_triton(stack.triton_url, "novel-shapes"))
    for _ in range(60):  # the gateway sees it at its next look at Triton
        if predict_stub.Predict(request(test_images[:1], model="novel-shapes"), timeout=60).version == "3":
            break
        time.sleep(0.5)
    model = rpc.ModelServiceStub(channel).GetModel(pb.GetModelRequest(name="novel-shapes"), timeout=10)
    assert model.default_version == "3" and [(v.version, v.ready) for v in model.versions] == [
        ("1", False), ("2", True), ("3", True)]  # fmt: skip
    assert predict_stub.Predict(request(test_images[:1], model="novel-shapes", version="2"), timeout=60).version == "2"
    with pytest.raises(grpc.RpcError) as unloaded:
        predict_stub.Predict(request(test_images[:1], model="novel-shapes", version="1"), timeout=60)
    assert unloaded.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 1 of 'novel-shapes' is not served: Triton keeps the newest 2 version(s) of each model loaded " \
           "(2, 3)" in unloaded.value.details()  # fmt: skip
    pattern = re.compile(rf"{re.escape(str(stack.data_dir))}/models/novel-shapes/(\d+)/model\.py")
    for _ in range(60):  # Triton ends the stubs of what it unloads in the background
        stubs = sorted(
            pattern.findall(subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout)
        )
        if stubs == ["2", "3"]:
            break
        time.sleep(0.5)
    assert stubs == ["2", "3"]  # one python stub per loaded version (one instance each here)
    listed = subprocess.run([PRELABEL, "models", "--server", stack.address], capture_output=True, text=True, timeout=60)
    assert re.search(r"novel-shapes +1 no ", listed.stdout) and re.search(r"novel-shapes +3 yes ", listed.stdout)
    assert "older than the newest versions Triton keeps loaded" in listed.stderr


def test_cli_train_publishes_and_loads_into_the_running_triton(stack, predict_stub, tmp_path):
    images, labels = shapes.sample(15 * len(shapes.NOVEL_CLASSES), 80, 51, shapes.NOVEL_CLASSES)
    for i, (image, y) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "labelled" / shapes.NOVEL_CLASSES[y]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.jpg", quality=92)
    run = subprocess.run(
        [PRELABEL, "train", str(tmp_path / "labelled"), "--base", "prelabel-base", "--name", "cli-novel",
         "--data-dir", str(stack.data_dir), "--epochs", "3"],  # AUTO with a short budget: the CLI path is tested
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "90 images in 6 classes" in run.stderr
    assert re.search(r"\d+/\d+: +\d+%\|[^|]+\| [a-z]", run.stderr), run.stderr[-500:]  # the bar, then what it does
    assert "published cli-novel version 1: 90 examples, 15 per class, frechet similarity" in run.stdout
    assert "feature extraction" in run.stdout and f"loaded into Triton at {stack.triton_url}" in run.stdout
    test_images, truth = held_out(52)
    response = predict_stub.Predict(request(test_images, model="cli-novel"), timeout=60)
    assert accuracy(response, truth) > 0.6

    bad = subprocess.run([PRELABEL, "train", str(tmp_path / "nothing"), "--base", "prelabel-base", "--name", "x",
                          "--data-dir", str(stack.data_dir)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "is not a folder" in bad.stderr


def test_every_strategy_and_a_digits_model_are_served(stack, predict_stub):
    from prelabel.datasets import digits

    repository = repository_for(Settings(data_dir=stack.data_dir))
    base = engine.load_base(repository, "prelabel-base")
    # 96 px images: the base reads them at 64 px, from scratch at their own 96 (training/resolution.py).
    images, labels = shapes.sample(12 * len(shapes.NOVEL_CLASSES), 96, 61, shapes.NOVEL_CLASSES)
    examples = data.from_images(images, [shapes.NOVEL_CLASSES[y] for y in labels], base.preprocess)
    published, results = {}, {}
    for strategy in (engine.FREEZE_FIRST_K, engine.FROM_SCRATCH):
        results[strategy] = engine.train(base, examples, engine.TrainConfig(strategy=strategy, epochs=2))
        published[strategy] = publish(repository, "every-strategy", results[strategy], base)
    sizes = {s: repository.card("every-strategy", v).preprocess.crop for s, v in published.items()}
    assert sizes == {engine.FREEZE_FIRST_K: 64, engine.FROM_SCRATCH: 96}
    digit_images, digit_labels = digits.load()
    train = data.from_images(digit_images[:300], [str(y) for y in digit_labels[:300]], base.preprocess)
    publish(
        repository, "digits", engine.train(base, train, engine.TrainConfig(strategy=engine.FEATURE_EXTRACTION)), base
    )
    assert asyncio.run(load_into_triton(stack.triton_url, "every-strategy"))
    assert asyncio.run(load_into_triton(stack.triton_url, "digits"))

    test_images, _ = held_out(62, count=6)
    for strategy, version in published.items():
        response = predict_stub.Predict(request(test_images, model="every-strategy", version=str(version)), timeout=60)
        assert response.version == str(version), strategy
        # Served as trained: Triton prepares the images as the version's card says (96 px for from scratch).
        result = results[strategy]
        assert [p.labels[0].name for p in response.predictions] == in_process(result, [b for _, b in test_images])
    held = [(str(i), encode(digit_images[i], "PNG")) for i in range(1500, 1560)]
    response = predict_stub.Predict(request(held, model="digits", top_k=1), timeout=60)
    correct = sum(p.labels[0].name == str(digit_labels[1500 + i]) for i, p in enumerate(response.predictions))
    assert correct > 24, f"{correct}/60 held-out digits"  # 10 classes: chance is 6
