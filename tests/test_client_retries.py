"""Our clients (CLI and Label Studio adapter) retry UNAVAILABLE where a call is safe to send again.

A real gRPC server on loopback answers UNAVAILABLE a set number of times, as a gateway worker that dies
or a Triton restart does; the count of attempts it saw is the proof.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from prelabel.cli.client import Credentials, channel
from prelabel.labelstudio.remote import Prelabel
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc


class Flaky(rpc.ModelServiceServicer, rpc.JobServiceServicer, rpc.DatasetServiceServicer):
    """Fails each method's first ``failures`` calls with UNAVAILABLE, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: Counter[str] = Counter()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        self.attempts[method] += 1
        if self.attempts[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker restarting")

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        self._attempt("ListModels", context)
        return pb.ListModelsResponse(models=[pb.Model(name="base")])

    def CreateFineTuneJob(self, request: pb.CreateFineTuneJobRequest, context: grpc.ServicerContext) -> pb.Job:
        self._attempt("CreateFineTuneJob", context)
        return pb.Job(id="j1")

    def UploadExamples(self, requests: Iterator[pb.UploadExamplesRequest], context: grpc.ServicerContext) -> pb.Dataset:
        for _ in requests:
            pass
        self._attempt("UploadExamples", context)
        return pb.Dataset(name="d")


@pytest.fixture
def flaky() -> Iterator[tuple[str, Flaky]]:
    servicer = Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    rpc.add_ModelServiceServicer_to_server(servicer, server)
    rpc.add_JobServiceServicer_to_server(servicer, server)
    rpc.add_DatasetServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_the_cli_retries_safe_calls_and_not_an_append_upload(flaky):
    address, servicer = flaky
    with channel(address, timeout=10) as ch:
        assert rpc.ModelServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models[0].name == "base"
        assert (
            rpc.JobServiceStub(ch)
            .CreateFineTuneJob(pb.CreateFineTuneJobRequest(dataset="d", request_id="r"), timeout=10)
            .id
            == "j1"
        )
        with pytest.raises(grpc.RpcError) as info:
            rpc.DatasetServiceStub(ch).UploadExamples(iter([pb.UploadExamplesRequest(dataset="d")]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts == {"ListModels": 3, "CreateFineTuneJob": 3, "UploadExamples": 1}


def test_retries_stop_at_the_policys_attempts(flaky):
    address, servicer = flaky
    servicer.failures = 100
    with channel(address, timeout=10) as ch, pytest.raises(grpc.RpcError) as info:
        rpc.ModelServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "worker restarting" in (info.value.details() or "")
    assert servicer.attempts["ListModels"] == 5


def test_the_label_studio_adapter_retries_too(flaky):
    address, servicer = flaky

    async def models() -> pb.ListModelsResponse:
        client = Prelabel(address, Credentials(), timeout=10)
        try:
            return await client.models(fresh=True)
        finally:
            await client.close()

    assert asyncio.run(models()).models[0].name == "base"
    assert servicer.attempts["ListModels"] == 3
