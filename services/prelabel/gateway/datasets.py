"""Datasets behind the gateway: client-streamed uploads, checked and stored off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from prelabel import metrics
from prelabel.datasets.store import DatasetStore
from prelabel.errors import InvalidArgument, quote
from prelabel.gateway.protos import dataset_to_pb
from prelabel.v1 import prelabel_pb2 as pb

log = logging.getLogger("prelabel.gateway")


class Datasets:
    def __init__(self, store: DatasetStore) -> None:
        self.store = store

    async def upload(self, requests: AsyncIterator[pb.UploadExamplesRequest],
                     abandoned: Callable[[], Awaitable[bool]] | None = None) -> pb.Dataset:  # fmt: skip
        """All or nothing: examples are added only when the client ends its stream, not when it goes away."""
        upload = None
        async for request in requests:
            if upload is None:
                if not request.dataset:
                    raise InvalidArgument("the first UploadExamplesRequest must name the dataset")
                upload = self.store.upload(request.dataset, request.replace)
            elif request.dataset and request.dataset != upload.name:
                raise InvalidArgument(
                    f"one upload goes to one dataset: got {quote(request.dataset)} after {upload.name!r}; "
                    "use one UploadExamples call per dataset"
                )
            examples = [(e.image.id, e.image.content, e.label) for e in request.examples]
            await asyncio.to_thread(upload.add, examples)
        if abandoned is not None and await abandoned():  # not ended by the client: it went away
            log.info("upload to dataset %r abandoned by its client; nothing was added", upload.name if upload else "")
            raise asyncio.CancelledError
        if upload is None:
            raise InvalidArgument("UploadExamples received no messages; send at least one with examples")
        info = await asyncio.to_thread(upload.commit)
        metrics.EXAMPLES_UPLOADED.inc(len(upload.added))
        log.info("dataset %r: %d examples added (%d bytes), %d in all", info.name, len(upload.added), upload.bytes,
                 info.example_count)  # fmt: skip
        return dataset_to_pb(info)

    async def get(self, name: str) -> pb.Dataset:
        return dataset_to_pb(await asyncio.to_thread(self.store.info, name))

    async def list(self) -> pb.ListDatasetsResponse:
        return pb.ListDatasetsResponse(datasets=[dataset_to_pb(i) for i in await asyncio.to_thread(self.store.all)])
