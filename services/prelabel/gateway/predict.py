"""Predict and PredictStream, free of gRPC transport: proto messages in, proto messages out.

The gateway never decodes pixels. It reads each image's header to reject what Triton could not use
(empty, unknown format, too many pixels), sends the encoded bytes to Triton in chunks of the model's
max batch size (Triton's dynamic batcher merges concurrent chunks), and turns probabilities into
top-k labels, uncertainty and auto-accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from google.rpc import status_pb2

from prelabel import metrics
from prelabel.errors import DeadlineExceeded, InvalidArgument, PrelabelError, ResourceExhausted
from prelabel.gateway.catalog import ModelCatalog, Resolved
from prelabel.preprocessing import ImageError, inspect
from prelabel.settings import Settings
from prelabel.v1 import prelabel_pb2 as pb


def image_error(code: grpc.StatusCode, message: str, reason: str) -> status_pb2.Status:
    metrics.IMAGE_ERRORS.labels(reason).inc()
    return status_pb2.Status(code=code.value[0], message=message)


class Predictor:
    def __init__(self, settings: Settings, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.catalog = catalog

    def _check(self, request: pb.PredictRequest) -> int:
        """Request-level limits; returns the effective top_k."""
        s = self.settings
        if not request.images:
            raise InvalidArgument("the request has no images; send at least one Image{id, content}")
        if len(request.images) > s.max_images_per_request:
            raise ResourceExhausted(
                f"{len(request.images)} images in one request is over the limit of {s.max_images_per_request} "
                "(PRELABEL_MAX_IMAGES_PER_REQUEST); split the batch or use PredictStream"
            )
        if request.top_k < 0 or request.top_k > s.max_top_k:
            raise InvalidArgument(
                f"top_k={request.top_k} is out of range; use 1..{s.max_top_k}, or 0 for {s.default_top_k}"
            )
        for image in request.images:
            if len(image.content) > s.max_image_bytes:
                raise ResourceExhausted(
                    f"image {image.id!r} is {len(image.content)} bytes, over the limit of {s.max_image_bytes} "
                    "(PRELABEL_MAX_IMAGE_BYTES); downscale or recompress it"
                )
        return request.top_k or s.default_top_k

    async def predict(self, request: pb.PredictRequest, time_remaining: float | None = None) -> pb.PredictResponse:
        top_k = self._check(request)
        target = await self.catalog.resolve(request.model, request.version)
        predictions = [pb.Prediction(image_id=image.id) for image in request.images]
        usable: list[int] = []
        for i, image in enumerate(request.images):
            metrics.IMAGE_BYTES.inc(len(image.content))
            try:
                header = inspect(image.content)
            except ImageError as exc:
                predictions[i].error.CopyFrom(image_error(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "undecodable"))
                continue
            if header.pixels > self.settings.max_image_pixels:
                predictions[i].error.CopyFrom(
                    image_error(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{header.width}x{header.height} pixels is over the limit of {self.settings.max_image_pixels} "
                        "(PRELABEL_MAX_IMAGE_PIXELS); downscale the image",
                        "too_many_pixels",
                    )
                )
                continue
            usable.append(i)
        if usable:
            await self._infer(request, target, usable, predictions, top_k, time_remaining)
        return pb.PredictResponse(model=target.name, version=target.version, predictions=predictions)

    async def _infer(
        self,
        request: pb.PredictRequest,
        target: Resolved,
        usable: list[int],
        predictions: list[pb.Prediction],
        top_k: int,
        time_remaining: float | None,
    ) -> None:
        timeout = (
            self.settings.default_timeout_s
            if time_remaining is None
            else min(time_remaining, self.settings.default_timeout_s)
        )
        if timeout <= 0:
            raise DeadlineExceeded("the deadline passed before inference started; retry with a longer deadline")
        size = target.max_batch_size or len(usable)
        chunks = [usable[i : i + size] for i in range(0, len(usable), size)]
        results = await asyncio.gather(
            *(
                self._call(target, [request.images[i].content for i in c], request.include_embedding, timeout)
                for c in chunks
            )
        )
        labels = target.card.labels
        threshold = target.card.auto_accept_threshold
        k = min(top_k, len(labels))
        for chunk, result in zip(chunks, results, strict=True):
            probs = result.probabilities
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            top = np.take_along_axis(probs, order, axis=1)
            second = (
                top[:, 1] if k > 1 else np.sort(probs, axis=1)[:, -2] if probs.shape[1] > 1 else np.zeros(len(probs))
            )
            entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1) / max(np.log(probs.shape[1]), 1e-12)
            for row, i in enumerate(chunk):
                p = predictions[i]
                if result.errors[row]:
                    p.error.CopyFrom(image_error(grpc.StatusCode.INVALID_ARGUMENT, result.errors[row], "undecodable"))
                    continue
                p.labels.extend(
                    pb.Label(name=labels[j], score=float(s)) for j, s in zip(order[row], top[row], strict=True)
                )
                p.uncertainty.entropy = float(np.clip(entropy[row], 0.0, 1.0))
                p.uncertainty.margin = float(top[row, 0] - second[row])
                p.uncertainty.least_confidence = float(1.0 - top[row, 0])
                p.auto_accept = threshold is not None and float(top[row, 0]) >= threshold
                if result.embeddings is not None:
                    p.embedding.extend(result.embeddings[row].tolist())
            metrics.IMAGES.labels(target.name).inc(len(chunk) - sum(1 for e in result.errors if e))

    async def _call(self, target: Resolved, images: list[bytes], embedding: bool, timeout: float):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return await self.catalog.triton.infer(target.name, target.version, images, embedding, timeout)
        except PrelabelError as exc:
            metrics.TRITON_ERRORS.labels(exc.code.name).inc()
            raise
        finally:
            metrics.TRITON_LATENCY.labels(target.name).observe(time.perf_counter() - started)

    async def predict_stream(
        self, requests: AsyncIterator[pb.PredictRequest], time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[pb.PredictResponse]:
        """Responses in request order; at most ``stream_max_in_flight`` requests are worked on ahead.

        The bounded queue is the back-pressure: when it is full, no more requests are read, so gRPC's
        flow control slows the client down. Cancelling the stream cancels everything in flight.
        """
        pending: asyncio.Queue[asyncio.Task[pb.PredictResponse] | Exception | None] = asyncio.Queue(
            maxsize=self.settings.stream_max_in_flight
        )

        async def read() -> None:
            try:
                async for request in requests:
                    await pending.put(asyncio.create_task(self.predict(request, time_remaining())))
                await pending.put(None)
            except Exception as exc:  # the writer keeps draining, so this put gets through
                await pending.put(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await pending.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield await item
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
