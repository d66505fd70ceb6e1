"""Hostile and broken requests against a real ``prelabel serve``: every one gets a precise status.

A fixed corpus (the reproductions filed in issue 11 among them) and a seeded random one (random
bytes and mutations of valid messages, to every RPC), sent as raw bytes so that nothing on the
client side can tidy them up. No client can provoke UNKNOWN or INTERNAL, the server stays
SERVING, and its log holds no traceback.
"""

from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import ModelRepository
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode, formula_images
from tests.stack import Stack, health_status, wait_for_health

pytestmark = pytest.mark.stack

# (service, method, request streaming, response streaming, a valid request)
RPCS = [
    ("PredictionService", "Predict", False, False, pb.PredictRequest(images=[pb.Image(id="a", content=b"x")])),
    ("PredictionService", "PredictStream", True, True, pb.PredictRequest(images=[pb.Image(id="a", content=b"x")])),
    ("ModelService", "ListModels", False, False, pb.ListModelsRequest()),
    ("ModelService", "GetModel", False, False, pb.GetModelRequest(name="prelabel-base")),
    ("DatasetService", "UploadExamples", True, False,
     pb.UploadExamplesRequest(dataset="fuzz", examples=[pb.Example(image=pb.Image(content=b"x"), label="a")])),
    ("DatasetService", "GetDataset", False, False, pb.GetDatasetRequest(name="fuzz")),
    ("DatasetService", "ListDatasets", False, False, pb.ListDatasetsRequest()),
    ("JobService", "CreateFineTuneJob", False, False, pb.CreateFineTuneJobRequest(dataset="fuzz", output_model="f")),
    ("JobService", "GetJob", False, False, pb.GetJobRequest(id="0" * 32)),
    ("JobService", "ListJobs", False, False, pb.ListJobsRequest()),
    ("JobService", "CancelJob", False, False, pb.CancelJobRequest(id="0" * 32)),
    ("JobService", "WatchJob", False, True, pb.WatchJobRequest(id="0" * 32)),
]  # fmt: skip
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack.serve(tmp_path_factory.mktemp("robust"), trainer_workers=0)
    try:
        wait_for_health(stack.address)
        yield stack
    finally:
        exit_code = stack.stop()
    assert exit_code == 0  # after the block: a failure in it is reported first


@pytest.fixture(scope="module")
def channel(served: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.address) as ch:
        yield ch


def call(channel: grpc.Channel, service: str, method: str, streams_in: bool, streams_out: bool,
         payloads: list[bytes], timeout: float = 10) -> grpc.StatusCode:  # fmt: skip
    """Send raw bytes as ``payloads`` (one message each) and return the status the call ended with."""
    path = f"/prelabel.v1.{service}/{method}"
    raw = {"request_serializer": None, "response_deserializer": None}
    try:
        if streams_in and streams_out:
            for _ in channel.stream_stream(path, **raw)(iter(payloads), timeout=timeout):
                pass
        elif streams_in:
            channel.stream_unary(path, **raw)(iter(payloads), timeout=timeout)
        elif streams_out:
            for _ in channel.unary_stream(path, **raw)(payloads[0], timeout=timeout):
                pass
        else:
            channel.unary_unary(path, **raw)(payloads[0], timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def details(channel: grpc.Channel, path: str, request: object, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    service, method = path.split("/")
    stub = channel.unary_unary(f"/prelabel.v1.{service}/{method}", request_serializer=lambda m: m.SerializeToString())
    try:
        stub(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("rpc_", RPCS, ids=[r[1] for r in RPCS])
@pytest.mark.parametrize(
    "garbage",
    [bytes.fromhex("0a80808080040000000000000000000000"), b"\xff", b"\x0a\x05ab", b"\x0a\x03\xff\xfe\xfd"],
    ids=["claims-1GiB", "bad-tag", "truncated", "invalid-utf8"],
)
def test_bytes_that_are_not_a_message_are_invalid_argument(channel, rpc_, garbage):
    service, method, streams_in, streams_out, valid = rpc_
    try:
        type(valid).FromString(garbage)
    except Exception:
        expected = {grpc.StatusCode.INVALID_ARGUMENT}
    else:  # some byte strings are valid messages of some types (field 1 a number, say): any precise answer
        expected = {code for code in grpc.StatusCode if code not in NEVER}
    assert call(channel, service, method, streams_in, streams_out, [garbage]) in expected


HOSTILE = [
    ("PredictionService/Predict", pb.PredictRequest(version="²", images=[pb.Image(content=b"x")]), "version"),
    ("PredictionService/Predict", pb.PredictRequest(version="1" * 5000, images=[pb.Image(content=b"x")]), "version"),
    ("PredictionService/Predict", pb.PredictRequest(version="9" * 30, images=[pb.Image(content=b"x")]), "version"),
    ("PredictionService/Predict", pb.PredictRequest(model="m\n", images=[pb.Image(content=b"x")]), "name"),
    ("JobService/ListJobs", pb.ListJobsRequest(page_token="²"), "page_token"),
    ("JobService/ListJobs", pb.ListJobsRequest(page_token="9" * 30), "page_token"),
    ("JobService/ListJobs", pb.ListJobsRequest(page_token="1" * 5000), "page_token"),
    ("JobService/CreateFineTuneJob", pb.CreateFineTuneJobRequest(dataset="fuzz", output_model="fznl\n"), "name"),
    ("JobService/CreateFineTuneJob", pb.CreateFineTuneJobRequest(dataset="d\n", output_model="ok"), "name"),
    ("JobService/GetJob", pb.GetJobRequest(id="0" * 32 + "\n"), "job id"),
    ("ModelService/GetModel", pb.GetModelRequest(name="a" * 20_000), "characters"),
    ("DatasetService/GetDataset", pb.GetDatasetRequest(name="z" * 15_000), "characters"),
    ("JobService/CreateFineTuneJob", pb.CreateFineTuneJobRequest(dataset="d", output_model="o" * 10_000), "characters"),
]  # fmt: skip


@pytest.mark.parametrize("path,request_,mentions", HOSTILE, ids=[f"{h[0]}-{i}" for i, h in enumerate(HOSTILE)])
def test_hostile_field_values_are_invalid_argument_with_a_short_message(channel, path, request_, mentions):
    code, message = details(channel, path, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message[:300])
    assert mentions in message and len(message) < 600, message[:300]


def test_a_bad_version_is_the_clients_error_whatever_tritons_state(tmp_path):
    """With Triton unreachable, version="latest" is still INVALID_ARGUMENT (it was UNAVAILABLE: "retry")."""
    ensure_default_model(ModelRepository(tmp_path / "models"), "prelabel-base", "builtin")
    gateway = Stack.serve(tmp_path, command="gateway", extra=["--triton-url", "127.0.0.1:9"])
    try:
        with grpc.insecure_channel(gateway.address) as ch:
            image = [pb.Image(content=b"x")]
            bad = details(ch, "PredictionService/Predict", pb.PredictRequest(version="latest", images=image))
            good = details(ch, "PredictionService/Predict", pb.PredictRequest(version="1", images=image))
        assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "version" in bad[1], bad
        assert good[0] == grpc.StatusCode.UNAVAILABLE, good  # a good request: Triton's state decides
    finally:
        exit_code = gateway.stop()
    assert exit_code == 0  # after the block: a failure in it is reported first


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.3 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind < 0.5:
            out.insert(rng.randint(0, len(out)), rng.randrange(256))
        elif kind < 0.7 and out:
            del out[rng.randrange(len(out)) :]
        elif kind < 0.85:
            out += rng.randbytes(rng.randint(1, 12))
        else:
            value = rng.choice([b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x10", b"\x01", b"\x00"])
            out += bytes([rng.choice([0x0A, 0x12, 0x18, 0x20, 0x2A, 0x30, 0x39, 0x42])]) + value
    return bytes(out)


@pytest.mark.timeout(600)
def test_thousands_of_seeded_random_requests_never_break_the_server(served, channel):
    rng = random.Random(11)
    codes: dict[str, set[str]] = {}
    for n in range(3000):
        service, method, streams_in, streams_out, valid = RPCS[n % len(RPCS)]
        seed = valid.SerializeToString()
        count = rng.randint(1, 3) if streams_in else 1
        payloads = [
            rng.randbytes(rng.randint(0, 40)) if rng.random() < 0.3 else mutate(rng, seed) for _ in range(count)
        ]
        code = call(channel, service, method, streams_in, streams_out, payloads, timeout=5)
        codes.setdefault(method, set()).add(code.name)
        assert code not in NEVER, f"request {n} to {method} ({[p.hex() for p in payloads]}) ended {code.name}"
    assert health_status(served.address) == 1  # SERVING
    log = served.process.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert all(codes.values())


def test_an_abandoned_upload_adds_nothing(served, channel):
    """Cancelled, or cut off by its deadline, before the client half-closed: all or nothing."""
    images, labels = formula_images(3, 32, seed=5)
    first = pb.UploadExamplesRequest(
        dataset="abandoned",
        examples=[
            pb.Example(image=pb.Image(content=encode(im, "PNG")), label=str(y))
            for im, y in zip(images, labels, strict=True)
        ],
    )
    stub = rpc.DatasetServiceStub(channel)
    for how in ("cancel", "deadline"):
        release = threading.Event()

        def messages(release: threading.Event = release) -> Iterator[pb.UploadExamplesRequest]:
            yield first
            release.wait(10)  # the client never half-closes on its own

        if how == "cancel":
            future = stub.UploadExamples.future(messages(), timeout=30)
            time.sleep(1.0)  # the first message has been received and checked
            future.cancel()
        else:
            future = stub.UploadExamples.future(messages(), timeout=1.0)
        with pytest.raises(grpc.FutureCancelledError if how == "cancel" else grpc.RpcError):
            future.result()
        release.set()
        time.sleep(1.0)  # whatever the server would do next, it has done
        with pytest.raises(grpc.RpcError) as err:
            stub.GetDataset(pb.GetDatasetRequest(name="abandoned"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, how


def test_a_client_cancelling_predict_stream_is_not_an_error(served, channel):
    images, _ = formula_images(2, 64, seed=3)
    payload = pb.PredictRequest(images=[pb.Image(id=str(i), content=encode(im, "PNG")) for i, im in enumerate(images)])
    stub = rpc.PredictionServiceStub(channel)
    for _ in range(20):
        responses = stub.PredictStream(iter([payload] * 50), timeout=30)
        next(responses)
        responses.cancel()
    time.sleep(1.0)
    assert served.metrics_url
    text = urllib.request.urlopen(served.metrics_url, timeout=10).read().decode()
    internal = re.findall(r'prelabel_grpc_requests_total\{code="INTERNAL",method="PredictStream"\} (\S+)', text)
    assert not internal or float(internal[0]) == 0, internal
    log = served.process.log()
    assert "GeneratorExit" not in log and "never retrieved" not in log and "unexpected error" not in log
