"""The Prelabel gateway as the adapter uses it: a grpc.aio channel with the CLI's TLS and token options."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from prelabel.cli.client import Credentials, channel_options
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc

MODELS_TTL_S = 2.0  # /setup comes before every prediction run and must answer within 3 s
UPLOAD_CHUNK = 32  # examples per UploadExamples message


class Prelabel:
    def __init__(self, server: str, credentials: Credentials, timeout: float) -> None:
        options = channel_options()
        if credentials.tls:
            self.channel = grpc.aio.secure_channel(server, credentials.ssl(), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(server, options=options)
        self.metadata = (("authorization", f"Bearer {credentials.token}"),) if credentials.token else ()
        self.timeout = timeout
        self.target = server
        self.predictions = rpc.PredictionServiceStub(self.channel)
        self.models_stub = rpc.ModelServiceStub(self.channel)
        self.datasets = rpc.DatasetServiceStub(self.channel)
        self.jobs = rpc.JobServiceStub(self.channel)
        self._models: tuple[float, pb.ListModelsResponse] | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def models(self, fresh: bool = False) -> pb.ListModelsResponse:
        """The gateway's models, cached for a moment: Label Studio asks for the version very often."""
        if fresh or self._models is None or time.monotonic() - self._models[0] > MODELS_TTL_S:
            response = await self.models_stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=self.metadata)
            self._models = (time.monotonic(), response)
        return self._models[1]

    async def predict(
        self, model: str, version: str, images: list[tuple[str, bytes]], top_k: int
    ) -> pb.PredictResponse:
        request = pb.PredictRequest(model=model, version=version, top_k=top_k,
                                    images=[pb.Image(id=i, content=c) for i, c in images])  # fmt: skip
        response: pb.PredictResponse = await self.predictions.Predict(request, timeout=self.timeout,
                                                                      metadata=self.metadata)  # fmt: skip
        return response

    async def upload(self, dataset: str, examples: list[tuple[str, bytes, str]], replace: bool) -> pb.Dataset:
        def requests() -> list[pb.UploadExamplesRequest]:
            return [
                pb.UploadExamplesRequest(
                    dataset=dataset,
                    replace=replace,
                    examples=[pb.Example(image=pb.Image(id=i, content=c), label=y) for i, c, y in chunk],
                )
                for chunk in (examples[k : k + UPLOAD_CHUNK] for k in range(0, len(examples), UPLOAD_CHUNK))
            ]

        info: pb.Dataset = await self.datasets.UploadExamples(iter(requests()), timeout=self.timeout,
                                                              metadata=self.metadata)  # fmt: skip
        return info

    async def create_job(self, request: pb.CreateFineTuneJobRequest) -> pb.Job:
        job: pb.Job = await self.jobs.CreateFineTuneJob(request, timeout=self.timeout, metadata=self.metadata)
        return job

    async def list_jobs(self, state: pb.JobState) -> list[pb.Job]:
        response = await self.jobs.ListJobs(pb.ListJobsRequest(state=state, page_size=1000), timeout=self.timeout,
                                            metadata=self.metadata)  # fmt: skip
        return list(response.jobs)

    async def watch(self, job_id: str) -> AsyncIterator[pb.Job]:
        async for job in self.jobs.WatchJob(pb.WatchJobRequest(id=job_id), metadata=self.metadata):
            yield job
