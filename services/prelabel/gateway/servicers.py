"""Thin grpc.aio servicers: unpack the call, delegate to the core, return its answer.

Errors are raised, never aborted here: ``interceptors.ErrorsAndMetrics`` maps them in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from prelabel.errors import Unimplemented
from prelabel.gateway.catalog import ModelCatalog
from prelabel.gateway.predict import Predictor
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc


class PredictionServicer(rpc.PredictionServiceServicer):  # type: ignore[misc]
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    async def Predict(self, request: pb.PredictRequest, context: aio.ServicerContext) -> pb.PredictResponse:
        return await self.predictor.predict(request, context.time_remaining())

    async def PredictStream(
        self, requests: AsyncIterator[pb.PredictRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        async for response in self.predictor.predict_stream(requests, context.time_remaining):
            yield response


class ModelServicer(rpc.ModelServiceServicer):  # type: ignore[misc]
    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog

    async def ListModels(self, request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
        return self.catalog.list_models()

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.Model:
        return self.catalog.describe(request.name)


FINE_TUNING_PENDING = (
    "is not available yet: dataset upload and fine-tune jobs arrive with Prelabel's fine-tuning service; "
    "until then use Predict with the served models"
)


def _unimplemented(name: str, streaming: bool) -> Any:
    message = f"{name} {FINE_TUNING_PENDING}"
    if streaming:

        async def stream(self: Any, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            raise Unimplemented(message)
            yield  # pragma: no cover - makes this an async generator

        return stream

    async def unary(self: Any, request: Any, context: aio.ServicerContext) -> Any:
        raise Unimplemented(message)

    return unary


class DatasetServicer(rpc.DatasetServiceServicer):  # type: ignore[misc]
    UploadExamples = _unimplemented("UploadExamples", streaming=False)
    GetDataset = _unimplemented("GetDataset", streaming=False)
    ListDatasets = _unimplemented("ListDatasets", streaming=False)


class JobServicer(rpc.JobServiceServicer):  # type: ignore[misc]
    CreateFineTuneJob = _unimplemented("CreateFineTuneJob", streaming=False)
    GetJob = _unimplemented("GetJob", streaming=False)
    ListJobs = _unimplemented("ListJobs", streaming=False)
    CancelJob = _unimplemented("CancelJob", streaming=False)
    WatchJob = _unimplemented("WatchJob", streaming=True)
