"""Thin grpc.aio servicers: unpack the call, delegate to the core, return its answer.

Errors are raised, never aborted here: ``interceptors.ErrorsAndMetrics`` maps them in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio

from prelabel.gateway.catalog import ModelCatalog
from prelabel.gateway.datasets import Datasets
from prelabel.gateway.jobs import Jobs
from prelabel.gateway.predict import Predictor
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc

ABANDON_GRACE_STEPS = 20  # x 10 ms: how long a finished upload waits for a late cancellation


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


class DatasetServicer(rpc.DatasetServiceServicer):  # type: ignore[misc]
    def __init__(self, datasets: Datasets) -> None:
        self.datasets = datasets

    async def UploadExamples(
        self, requests: AsyncIterator[pb.UploadExamplesRequest], context: aio.ServicerContext
    ) -> pb.Dataset:
        async def abandoned() -> bool:
            """Did the client cancel, or its deadline pass, rather than end its stream?

            gRPC ends the request stream the same way in all three cases; a cancellation is signalled
            separately and may arrive a moment later, so it is awaited for up to 0.2 s. Within that
            instant an upload can still be saved for a client that then sees CANCELLED: re-sending it
            is harmless (an image sent again is relabelled, never counted twice).
            """
            for _ in range(ABANDON_GRACE_STEPS):
                remaining = context.time_remaining()
                if context.cancelled() or (remaining is not None and remaining <= 0):
                    return True
                await asyncio.sleep(0.01)
            return False

        return await self.datasets.upload(requests, abandoned)

    async def GetDataset(self, request: pb.GetDatasetRequest, context: aio.ServicerContext) -> pb.Dataset:
        return await self.datasets.get(request.name)

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        return await self.datasets.list()


class JobServicer(rpc.JobServiceServicer):  # type: ignore[misc]
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    async def CreateFineTuneJob(self, request: pb.CreateFineTuneJobRequest, context: aio.ServicerContext) -> pb.Job:
        return await self.jobs.create(request)

    async def GetJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.Job:
        return await self.jobs.get(request.id)

    async def ListJobs(self, request: pb.ListJobsRequest, context: aio.ServicerContext) -> pb.ListJobsResponse:
        return await self.jobs.list(request)

    async def CancelJob(self, request: pb.CancelJobRequest, context: aio.ServicerContext) -> pb.Job:
        return await self.jobs.cancel(request.id)

    async def WatchJob(self, request: pb.WatchJobRequest, context: aio.ServicerContext) -> AsyncIterator[pb.Job]:
        async for job in self.jobs.watch(request.id):
            yield job
