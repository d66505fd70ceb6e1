"""Shared fixtures: generated images in real encodings, and one real Prelabel stack per session."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from prelabel.datasets import formulas
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.stack import Stack, wait_for_health

# Limits lowered so that tests can hit each of them with small inputs.
STACK_LIMITS = {
    "max_images_per_request": 64,
    "max_image_bytes": 1_000_000,
    "max_message_bytes": 4 * 1024 * 1024,
    "max_image_pixels": 4_000_000,
}


def promtool(*args: str, text: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: scripts/setup.sh --test installs Debian's prometheus package"
    return subprocess.run([tool, *args], input=text, capture_output=True, text=True, cwd=cwd, timeout=60)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def nvjpeg_pixels(content: bytes, max_pixels: int) -> int | None:
    """The pixel count of a JPEG the GPU path sends to nvJPEG, None for one it sends to the CPU path."""
    from prelabel.models import device_decode

    frame = device_decode._nvjpeg_frame(content, max_pixels)
    return None if frame is None else frame.width * frame.height


# Classes of the built-in base's pre-training data (Prelabel Formulas) that it labels right at least
# 96 % of the time (measured on 24 fresh images each). Tests that use them check serving, not the model.
EASY = (108, 40, 195, 94, 116, 25, 96, 6, 29, 238, 203, 70, 200, 30, 125)


def formula_images(count: int, size: int, seed: int, classes: tuple[int, ...] = EASY
                   ) -> tuple[list[Image.Image], list[str]]:  # fmt: skip
    """Generated images the built-in base model labels correctly, with their labels."""
    images, labels = formulas.sample(count, size, seed, classes)
    return [Image.fromarray(im) for im in images], [formulas.CLASSES[y] for y in labels]


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.nodeid.startswith("tests/test_labelstudio.py") for item in session.items):
        from tests import labelstudio

        labelstudio.start_early()


@pytest.fixture(scope="session")
def labelled_images() -> list[tuple[str, bytes, str]]:
    """``(id, encoded bytes, true label)`` for 30 generated images in PNG, JPEG and WebP."""
    images, labels = formula_images(30, 64, seed=11)
    formats = ("PNG", "JPEG", "WEBP")
    return [
        (f"{i}-{formats[i % 3].lower()}", encode(im, formats[i % 3], quality=92), label)
        for i, (im, label) in enumerate(zip(images, labels, strict=True))
    ]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack.serve(tmp_path_factory.mktemp("serve"), **STACK_LIMITS)
    try:
        wait_for_health(s.address)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        yield ch


@pytest.fixture(scope="session")
def predict_stub(channel: grpc.Channel) -> rpc.PredictionServiceStub:
    return rpc.PredictionServiceStub(channel)


def request(images: list[tuple[str, bytes]], **fields: object) -> pb.PredictRequest:
    return pb.PredictRequest(images=[pb.Image(id=i, content=c) for i, c in images], **fields)  # type: ignore[arg-type]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
