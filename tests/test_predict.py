"""Predict and PredictStream through the real gateway and the real embedded Triton."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient import grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from prelabel.datasets import formulas, shapes
from prelabel.triton.client import image_inputs
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode, formula_images, request
from tests.stack import PRELABEL, Stack, health_status

pytestmark = pytest.mark.stack


def test_predicts_png_jpeg_webp_correctly(predict_stub, labelled_images):
    response = predict_stub.Predict(request([(i, c) for i, c, _ in labelled_images], top_k=3), timeout=60)
    assert response.model == "prelabel-base" and response.version == "1"
    assert [p.image_id for p in response.predictions] == [i for i, _, _ in labelled_images]
    correct = 0
    for p, (_, _, truth) in zip(response.predictions, labelled_images, strict=True):
        assert not p.HasField("error")
        assert len(p.labels) == 3
        scores = [label.score for label in p.labels]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        assert 0 <= p.uncertainty.entropy <= 1
        assert p.uncertainty.margin == pytest.approx(scores[0] - scores[1], abs=1e-6)
        assert p.uncertainty.least_confidence == pytest.approx(1 - scores[0], abs=1e-6)
        assert not p.auto_accept  # the base model has no calibrated threshold
        assert not p.embedding
        correct += p.labels[0].name == truth
    # 256 fine-grained classes, and JPEG and WebP blur what tells fractals apart: chance is 1/256.
    assert correct >= 18, f"only {correct}/30 generated images labelled correctly"


def test_corrupt_and_oversized_images_get_per_image_errors(predict_stub, labelled_images):
    good = labelled_images[0][1]
    truncated = good[: len(good) // 3]
    bomb = encode(Image.new("RGB", (2500, 2000), "white"), "PNG")  # 5 MP, tiny file: over the 4 MP limit
    huge = b"\xff\xd8" + b"\0" * 1_000_000  # over the 1 MB per-image limit of the test stack
    images = [("ok", good), ("garbage", b"not an image"), ("truncated", truncated), ("bomb", bomb), ("empty", b"")]
    response = predict_stub.Predict(request([*images, ("huge", huge)]), timeout=60)
    by_id = {p.image_id: p for p in response.predictions}
    assert by_id["ok"].labels and not by_id["ok"].HasField("error")
    assert by_id["garbage"].error.code == code_pb2.INVALID_ARGUMENT
    assert "not a JPEG, PNG, WebP" in by_id["garbage"].error.message
    assert by_id["truncated"].error.code == code_pb2.INVALID_ARGUMENT
    assert by_id["bomb"].error.code == code_pb2.RESOURCE_EXHAUSTED
    assert "2500x2000" in by_id["bomb"].error.message and "PRELABEL_MAX_IMAGE_PIXELS" in by_id["bomb"].error.message
    assert by_id["empty"].error.code == code_pb2.INVALID_ARGUMENT and "empty" in by_id["empty"].error.message
    assert by_id["huge"].error.code == code_pb2.RESOURCE_EXHAUSTED
    assert "1000002 bytes" in by_id["huge"].error.message and "PRELABEL_MAX_IMAGE_BYTES" in by_id["huge"].error.message
    assert all(not p.labels for i, p in by_id.items() if i != "ok")


def test_triton_batches_count_images_and_bad_sizes_are_refused(stack, labelled_images):
    """A request of n images is a batch of n for Triton: its batcher fills batches with images (a full
    request runs at once, concurrent ones spread over instances), not with requests."""
    client = triton_grpc.InferenceServerClient(stack.triton_url)
    images = [content for _, content, _ in labelled_images[:5]]

    def executions() -> dict[int, int]:
        stats = client.get_inference_statistics("prelabel-base", as_json=True)["model_stats"]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for s in stats for b in s.get("batch_stats", [])}

    before = executions()
    outputs = [triton_grpc.InferRequestedOutput(n) for n in ("PROBABILITIES", "ERROR_CODE", "ERROR_MESSAGE")]
    result = client.infer("prelabel-base", image_inputs(images), outputs=outputs)
    after = executions()
    grown = {size: n - before.get(size, 0) for size, n in after.items() if n > before.get(size, 0)}
    # The five images ran in one execution (with another caller's, if one called at that moment; the full
    # suite once saw that), not one by one.
    assert any(size >= 5 for size in grown) and sum(grown.values()) <= 2, (before, after)
    assert result.as_numpy("PROBABILITIES").shape == (5, len(formulas.CLASSES))
    assert result.as_numpy("ERROR_CODE").reshape(-1).tolist() == [0] * 5

    data, sizes = image_inputs(images)
    sizes.set_data_from_numpy(np.array([[len(i) + 1] for i in images], dtype=np.int64))  # 5 bytes too many
    with pytest.raises(InferenceServerException, match="SIZES add up to"):
        client.infer("prelabel-base", [data, sizes], outputs=outputs)
    client.close()


def test_embedding_top_k_and_explicit_version(predict_stub, labelled_images):
    image = [(labelled_images[0][0], labelled_images[0][1])]
    response = predict_stub.Predict(request(image, top_k=100, include_embedding=True, version="1"), timeout=60)
    p = response.predictions[0]
    assert len(p.labels) == 100 < len(formulas.CLASSES)
    assert len(p.embedding) == 512 and any(v != 0 for v in p.embedding)
    again = predict_stub.Predict(request(image, include_embedding=True), timeout=60).predictions[0]
    assert len(again.labels) == 5  # default top_k
    np.testing.assert_allclose(again.embedding, p.embedding, rtol=1e-4, atol=1e-5)


def test_photos_are_pre_labelled_upright_as_label_studio_shows_them(predict_stub):
    """A phone stores a portrait photo on its side with EXIF orientation 6 (or upside down, 3); the
    model sees it as every viewer shows it: the same embedding as the upright file, not the stored one."""
    upright = formula_images(1, 96, seed=5)[0][0].crop((0, 0, 96, 72))  # landscape, no symmetry
    exif = Image.Exif()
    files = {"upright": encode(upright, "JPEG", quality=95)}
    for orientation, stored in ((6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180)):
        exif[0x0112] = orientation
        files[f"exif {orientation}"] = encode(upright.transpose(stored), "JPEG", quality=95, exif=exif.tobytes())
        files[f"as stored {orientation}"] = encode(upright.transpose(stored), "JPEG", quality=95)
    response = predict_stub.Predict(request(list(files.items()), include_embedding=True), timeout=60)
    vectors = {p.image_id: np.array(p.embedding) / np.linalg.norm(p.embedding) for p in response.predictions}
    labels = {p.image_id: p.labels[0].name for p in response.predictions}
    for orientation in (6, 3):
        turned, stored = vectors[f"exif {orientation}"], vectors[f"as stored {orientation}"]
        assert turned @ vectors["upright"] > 0.98 > stored @ vectors["upright"], orientation
        assert labels[f"exif {orientation}"] == labels["upright"]


def test_large_photo_is_resized_not_rejected(predict_stub):
    (big,), (label,) = formula_images(1, 1200, seed=3, classes=(195,))  # a grating: the same at any size
    p = predict_stub.Predict(request([("big", encode(big, "JPEG", quality=85))]), timeout=60).predictions[0]
    assert p.labels[0].name == label


@pytest.mark.parametrize(
    ("build", "code", "words"),
    [
        (lambda imgs: request([]), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        (lambda imgs: request(imgs[:1], top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (lambda imgs: request(imgs[:1], top_k=1000), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (lambda imgs: request(imgs[:1] * 65), grpc.StatusCode.RESOURCE_EXHAUSTED, "PRELABEL_MAX_IMAGES_PER_REQUEST"),
        (
            lambda imgs: request([(str(i), b"\0" * 900_000) for i in range(5)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
        (lambda imgs: request(imgs[:1], model="no-such-model"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (lambda imgs: request(imgs[:1], version="7"), grpc.StatusCode.NOT_FOUND, "no version 7"),
        (lambda imgs: request(imgs[:1], version="latest"), grpc.StatusCode.INVALID_ARGUMENT, "send a version number"),
        (lambda imgs: request(imgs[:1], model="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
    ],
    ids=[
        "empty",
        "negative-top-k",
        "huge-top-k",
        "too-many-images",
        "message-too-big",
        "unknown-model",
        "unknown-version",
        "bad-version",
        "path-traversal",
    ],
)
def test_request_errors(predict_stub, labelled_images, build, code, words):
    images = [(i, c) for i, c, _ in labelled_images]
    with pytest.raises(grpc.RpcError) as err:
        predict_stub.Predict(build(images), timeout=30)
    assert err.value.code() == code
    assert words in err.value.details()


def test_deadline_exceeded(predict_stub):
    rng = np.random.default_rng(5)
    photos = [(str(i), encode(shapes.render(i % 10, 900, rng), "JPEG", quality=95)) for i in range(60)]
    with pytest.raises(grpc.RpcError) as err:
        predict_stub.Predict(request(photos), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The gateway is fine afterwards.
    assert predict_stub.Predict(request(photos[:1]), timeout=60).predictions[0].labels


def test_predict_stream_keeps_order_over_many_batches(predict_stub, labelled_images):
    images = [(i, c) for i, c, _ in labelled_images]
    requests = [request([(f"{b}-{i}", c) for i, c in images[b % 5 : b % 5 + 6]], top_k=1) for b in range(40)]
    responses = list(predict_stub.PredictStream(iter(requests), timeout=120))
    assert len(responses) == 40
    for req, resp in zip(requests, responses, strict=True):
        assert [p.image_id for p in resp.predictions] == [im.id for im in req.images]
        assert all(len(p.labels) == 1 for p in resp.predictions)


def test_predict_stream_error_ends_the_stream_with_its_code(predict_stub, labelled_images):
    good = request([(labelled_images[0][0], labelled_images[0][1])])
    stream = predict_stub.PredictStream(iter([good, request([]), good]), timeout=60)
    assert next(stream).predictions
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_predict_stream_cancel(predict_stub, labelled_images):
    good = request([(i, c) for i, c, _ in labelled_images[:8]])
    gate = threading.Event()

    def endless():
        for _ in range(10_000):
            yield good
            gate.set()

    stream = predict_stub.PredictStream(endless(), timeout=120)
    assert next(stream).predictions
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert predict_stub.Predict(good, timeout=60).predictions  # the gateway is fine afterwards


def test_models_and_health_and_reflection(channel, stack):
    models = rpc.ModelServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert models.default_model == "prelabel-base"
    model = next(m for m in models.models if m.name == "prelabel-base")  # other tests may publish more
    assert model.default_version == "1"
    (version,) = model.versions
    assert version.ready and version.architecture == "resnet18"
    assert list(version.labels) == list(formulas.CLASSES) and version.created_at.seconds > 0
    assert rpc.ModelServiceStub(channel).GetModel(pb.GetModelRequest(name="prelabel-base"), timeout=10) == model
    with pytest.raises(grpc.RpcError) as err:
        rpc.ModelServiceStub(channel).GetModel(pb.GetModelRequest(name="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    assert health_status(stack.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(stack.address, "prelabel.v1.PredictionService") == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "prelabel.v1.PredictionService",
        "prelabel.v1.ModelService",
        "prelabel.v1.JobService",
        "prelabel.v1.DatasetService",
        "grpc.health.v1.Health",
    } <= names


def test_metrics(stack, predict_stub, labelled_images):
    predict_stub.Predict(request([(i, c) for i, c, _ in labelled_images[:4]]), timeout=60)
    with pytest.raises(grpc.RpcError):
        predict_stub.Predict(request([]), timeout=10)
    text = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    assert 'prelabel_grpc_requests_total{code="OK",method="Predict"}' in text
    assert 'prelabel_grpc_requests_total{code="INVALID_ARGUMENT",method="Predict"}' in text
    assert 'prelabel_grpc_request_duration_seconds_bucket{le="0.1",method="Predict"}' in text
    assert 'prelabel_images_predicted_total{model="prelabel-base"}' in text
    assert 'prelabel_triton_request_duration_seconds_count{model="prelabel-base"}' in text
    assert "prelabel_image_bytes_total" in text and "prelabel_triton_up 1.0" in text
    predicted = next(line for line in text.splitlines() if line.startswith("prelabel_images_predicted_total{"))
    assert float(predicted.split()[-1]) >= 4
    triton = urllib.request.urlopen(
        f"http://{stack.triton_url.split(':')[0]}:{_triton_metrics_port(stack)}/metrics", timeout=10
    )
    assert 'nv_inference_request_success{model="prelabel-base"' in triton.read().decode()


def _triton_metrics_port(stack: Stack) -> str:
    line = next(line for line in stack.process.stdout if "Triton at" in line)
    return line.split("(metrics http://")[1].split(":")[1].split("/")[0]


def test_cli_predict_folder_and_models(stack, labelled_images, tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for n, (i, content, _) in enumerate(labelled_images[:12]):
        ext = i.rsplit("-", 1)[1].replace("jpeg", "jpg")
        ((folder / "nested") if n % 2 else folder).joinpath(f"{i}.{ext}").write_bytes(content)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    # Three ~1.5 MB files: together over the stack's 4 MB messages, so the CLI must split by bytes.
    rng = np.random.default_rng(9)
    noise = [encode(Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)), "PNG") for _ in range(3)]
    assert all(1_000_000 < len(n) < 1_600_000 for n in noise)  # each also over the 1 MB per-image limit
    for k, blob in enumerate(noise):
        (folder / f"noise{k}.png").write_bytes(blob)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._noise0.png").write_bytes(b"\0\5\x16\7 macOS resource fork")  # hidden: not an image
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "copy.png").write_bytes(noise[0])
    out = tmp_path / "predictions.jsonl"
    run = subprocess.run(
        [
            PRELABEL,
            "predict",
            str(folder),
            "--server",
            stack.address,
            "--out",
            str(out),
            "--batch-size",
            "5",
            "--top-k",
            "2",
            "--max-request-bytes",
            "3500000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr  # some could not be used: every line written, the status says so
    assert "16/16" in run.stderr and "pre-labeled 12 of 16 images; 4 could not be used" in run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16
    truth = {i: label for i, _, label in labelled_images}
    right = 0
    for row in rows:
        name = row["path"].rsplit("/", 1)[1]
        if name == "broken.png":
            assert row["error"]["code"] == "INVALID_ARGUMENT"
            continue
        if name.startswith("noise"):
            assert (
                row["error"]["code"] == "RESOURCE_EXHAUSTED" and "PRELABEL_MAX_IMAGE_BYTES" in row["error"]["message"]
            )
            continue
        assert len(row["labels"]) == 2 and set(row["uncertainty"]) == {"entropy", "margin", "least_confidence"}
        right += row["labels"][0]["name"] == truth[name.rsplit(".", 1)[0]]
        assert 0 < sum(label["score"] for label in row["labels"]) <= 1.0001
    assert right >= 6  # of 12; the base has 256 classes (chance: 1/256)
    clean = subprocess.run([PRELABEL, "predict", str(folder / "nested"), "--server", stack.address, "--no-progress"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert clean.stderr.strip() == "pre-labeled 6 of 6 images" and len(clean.stdout.splitlines()) == 6
    nested = str(folder / "nested")
    unknown = subprocess.run([PRELABEL, "predict", nested, "--server", stack.address, "--model", "nope"],
                             capture_output=True, timeout=120)  # fmt: skip
    assert unknown.returncode == 1 and unknown.stdout == b""
    # What a terminal shows: the error alone, not also the progress bar drawn before the call failed
    # (bytes: text mode would turn the bar's carriage returns into newlines)
    shown = [line.rsplit("\r", 1)[-1].strip() for line in unknown.stderr.decode().split("\n")]
    assert [line for line in shown if line] == [next(line for line in shown if line.startswith("prelabel: NOT_FOUND: "
                                                "model 'nope' does not exist; models: "))], shown  # fmt: skip
    # `prelabel predict DIR | head -1`: the reader goes away; the command stops quietly, as coreutils do.
    piped = subprocess.Popen([PRELABEL, "predict", str(folder / "nested"), "--server", stack.address, "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert piped.stdout is not None and piped.stderr is not None
    piped.stdout.close()
    code, errors = piped.wait(120), piped.stderr.read()
    assert code == 141 and "Traceback" not in errors, (code, errors)
    listing = subprocess.run(
        [PRELABEL, "models", "--server", stack.address], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "prelabel-base (default)" in listing.stdout and "resnet18" in listing.stdout


def test_cli_reports_missing_gateway(tmp_path):
    run = subprocess.run(
        [PRELABEL, "models", "--server", "127.0.0.1:9", "--timeout", "1"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "no Prelabel gateway answers at 127.0.0.1:9" in run.stderr
