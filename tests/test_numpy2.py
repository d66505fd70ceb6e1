"""Serving with numpy 2 in Triton's environment, as the official Triton containers now ship it.

Triton 2.51's python backend reads numpy arrays with numpy 1's memory layout: with numpy 2 its stub
died on the first BYTES input and returned empty tensors for outputs. Prelabel's model now moves
every tensor by DLPack and sends no BYTES tensor. ``.venv-numpy2`` (made by ``scripts/setup.sh
--test``) is numpy 2 laid over ``.venv``'s packages; the whole stack runs on it here, Triton's stub
included (the supervisor puts the running interpreter first on Triton's PATH).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from PIL import Image
from sklearn.datasets import load_sample_images

from prelabel.models.runner import Runner
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import STACK_LIMITS, encode, request
from tests.stack import Stack, wait_for_health

pytestmark = pytest.mark.stack

NUMPY2 = Path(__file__).resolve().parent.parent / ".venv-numpy2" / "bin" / "python"


def test_predict_works_with_numpy_2_in_tritons_environment(tmp_path, labelled_images):
    assert NUMPY2.exists(), "the numpy 2 environment is missing: run scripts/setup.sh --test"
    version = subprocess.run([NUMPY2, "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True)
    assert version.stdout.startswith("2."), version
    photos = [encode(Image.fromarray(p), "JPEG", quality=90) for p in load_sample_images().images]
    bomb = encode(Image.new("RGB", (2500, 2000), "white"), "PNG")  # over the stack's 4 MP limit
    images = [*((i, c) for i, c, _ in labelled_images), ("photo-0", photos[0]), ("photo-1", photos[1]),
              ("garbage", b"not an image"), ("bomb", bomb)]  # fmt: skip
    stack = Stack.serve(tmp_path, python=str(NUMPY2), trainer_workers=0, **STACK_LIMITS)
    try:
        wait_for_health(stack.address)
        with grpc.insecure_channel(stack.address) as channel:
            response = rpc.PredictionServiceStub(channel).Predict(request(images, top_k=1), timeout=120)
        log = (tmp_path / "logs" / "triton.log").read_text()
    finally:
        stack.stop()
    assert "prelabel: prelabel-base/1 on cpu" in log and "numpy 2." in log  # the stub ran numpy 2
    # The same model in this process (numpy 1) labels every image the same way.
    runner = Runner(tmp_path / "models" / "prelabel-base" / "1")
    expected = runner.run([c for _, c in images], [4_000_000] * len(images))
    labels = runner.card.labels
    by_id = {p.image_id: p for p in response.predictions}
    for (image_id, _), probabilities, code in zip(images, expected.probabilities, expected.error_codes, strict=True):
        p = by_id[image_id]
        if code:
            assert p.error.code == code, image_id
            continue
        assert not p.HasField("error"), (image_id, p.error.message)
        assert p.labels[0].name == labels[int(np.argmax(probabilities))], image_id
        assert p.labels[0].score == pytest.approx(float(probabilities.max()), abs=1e-4)
    assert by_id["garbage"].error.code == code_pb2.INVALID_ARGUMENT and "not a JPEG" in by_id["garbage"].error.message
    assert by_id["bomb"].error.code == code_pb2.RESOURCE_EXHAUSTED and "2500x2000" in by_id["bomb"].error.message
