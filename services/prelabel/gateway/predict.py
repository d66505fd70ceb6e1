"""Predict and PredictStream, free of gRPC transport: proto messages in, proto messages out.

The gateway does not parse images: it checks request-level limits, sends the encoded bytes to
Triton in chunks of the model's max batch size (Triton's dynamic batcher merges concurrent chunks)
with the pixel limit as a request parameter, and turns the probabilities into top-k labels,
uncertainty and auto-accept. The Triton model opens each image once and reports, per image, why
it could not be used. Every per-image step here is vectorised or a plain list operation, because
on a shared machine the gateway's CPU time is taken from Triton's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt

from prelabel import metrics
from prelabel.errors import DeadlineExceeded, InvalidArgument, PrelabelError, ResourceExhausted
from prelabel.gateway.catalog import ModelCatalog, Resolved
from prelabel.settings import Settings
from prelabel.triton.client import InferOutputs, TritonClient
from prelabel.v1 import prelabel_pb2 as pb

STATUS = {code.value[0]: code for code in grpc.StatusCode}


def _failure(code: int, message: str) -> tuple[grpc.StatusCode, str] | None:
    """The Triton model's per-image error, or None; an unknown code is still an error, not a success."""
    if not code:
        return None
    return STATUS.get(code, grpc.StatusCode.INVALID_ARGUMENT), message


@dataclass
class Scores:
    """Top-k and uncertainty for the images Triton could use, as Python lists (cheap to read per image)."""

    names: list[list[str]]
    scores: list[list[float]]
    entropy: list[float]
    margin: list[float]
    least_confidence: list[float]
    accept: list[bool]

    @classmethod
    def of(cls, probs: npt.NDArray[np.float32], labels: list[str], k: int, threshold: float | None) -> Scores:
        n, classes = probs.shape
        # The best max(k, 2) of each row by as many argmax passes, best first (ties: the lower index).
        # A full sort of 1,000 ImageNet classes for 64 images took 3 ms a call (bench/scores.py), most of
        # the gateway's own work per call; a few passes take a few hundredths of that.
        rest, rows = probs.copy(), np.arange(n)
        order = np.empty((n, min(max(k, 2), classes)), np.intp)
        for j in range(order.shape[1]):
            order[:, j] = best_j = rest.argmax(axis=1)
            rest[rows, best_j] = -np.inf
        top = np.take_along_axis(probs, order, axis=1)
        best = top[:, 0]
        second = top[:, 1] if classes > 1 else np.zeros(n, np.float32)
        entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=1) / max(np.log(classes), 1e-12)
        return cls(
            names=[[labels[j] for j in row] for row in order[:, :k].tolist()],
            scores=top[:, :k].tolist(),
            entropy=np.clip(entropy, 0.0, 1.0).tolist(),
            margin=(best - second).tolist(),
            least_confidence=(1.0 - best).tolist(),
            accept=(best >= threshold).tolist() if threshold is not None else [False] * n,
        )


class Predictor:
    def __init__(self, settings: Settings, catalog: ModelCatalog, triton: TritonClient) -> None:
        self.settings = settings
        self.catalog = catalog  # which version answers
        self.triton = triton  # and the one way to reach it

    def _check(self, request: pb.PredictRequest, contents: list[bytes]) -> int:
        """Request-level limits; returns the effective top_k."""
        s = self.settings
        if not contents:
            raise InvalidArgument("the request has no images; send at least one Image{id, content}")
        if len(contents) > s.max_images_per_request:
            raise ResourceExhausted(
                f"{len(contents)} images in one request is over the limit of {s.max_images_per_request} "
                "(PRELABEL_MAX_IMAGES_PER_REQUEST); split the batch or use PredictStream"
            )
        if request.top_k < 0 or request.top_k > s.max_top_k:
            raise InvalidArgument(
                f"top_k={request.top_k} is out of range; use 1..{s.max_top_k}, or 0 for {s.default_top_k}"
            )
        return request.top_k or s.default_top_k

    def _unusable(self, content: bytes) -> tuple[grpc.StatusCode, str] | None:
        """Why an image is not sent to Triton at all, or None."""
        if not content:
            return grpc.StatusCode.INVALID_ARGUMENT, "the image is empty; send the encoded file in Image.content"
        if len(content) > self.settings.max_image_bytes:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"the image is {len(content)} bytes, over the limit of "
                f"{self.settings.max_image_bytes} (PRELABEL_MAX_IMAGE_BYTES); downscale or recompress it"
            )
        return None

    async def predict(self, request: pb.PredictRequest, time_remaining: float | None = None) -> pb.PredictResponse:
        contents = [image.content for image in request.images]  # upb copies bytes on each access: once
        top_k = self._check(request, contents)
        target = await self.catalog.resolve(request.model, request.version)
        metrics.IMAGE_BYTES.inc(sum(map(len, contents)))
        errors = [self._unusable(c) for c in contents]
        usable = [i for i, e in enumerate(errors) if e is None]
        outputs = await self._infer(target, [contents[i] for i in usable], request.include_embedding, time_remaining)
        scores = Scores.of(
            outputs.probabilities, target.card.labels, min(top_k, len(target.card.labels)),
            target.card.auto_accept_threshold,
        )  # fmt: skip
        rows = {i: r for r, i in enumerate(usable)}
        response = pb.PredictResponse(model=target.name, version=target.version)
        for i, image in enumerate(request.images):
            p = response.predictions.add(image_id=image.id)
            r = rows.get(i)
            error = errors[i] if r is None else _failure(outputs.error_codes[r], outputs.error_messages[r])
            if error is not None:
                code, p.error.message = error
                p.error.code = code.value[0]
                metrics.IMAGE_ERRORS.labels(code.name.lower()).inc()
                continue
            assert r is not None
            for name, score in zip(scores.names[r], scores.scores[r], strict=True):
                p.labels.add(name=name, score=score)
            u = p.uncertainty
            u.entropy, u.margin, u.least_confidence = scores.entropy[r], scores.margin[r], scores.least_confidence[r]
            p.auto_accept = scores.accept[r]
            if outputs.embeddings is not None:
                p.embedding.extend(outputs.embeddings[r].tolist())
        metrics.IMAGES.labels(target.name).inc(len(usable) - sum(1 for c in outputs.error_codes if c))
        return response

    async def _infer(
        self, target: Resolved, images: list[bytes], embedding: bool, time_remaining: float | None
    ) -> InferOutputs:
        """All images through Triton, in concurrent chunks of the model's max batch size, in order."""
        if not images:
            return InferOutputs(np.zeros((0, len(target.card.labels)), np.float32), None, [], [])
        timeout = self.settings.default_timeout_s
        if time_remaining is not None:
            if time_remaining <= 0:
                raise DeadlineExceeded("the deadline passed before inference started; retry with a longer deadline")
            timeout = min(timeout, time_remaining)
        size = target.max_batch_size or len(images)
        if len(images) <= size:  # one call: awaited here, without a task of its own (batch 1's latency)
            return await self._call(target, images, embedding, timeout)
        chunks = [images[i : i + size] for i in range(0, len(images), size)]
        results = await asyncio.gather(*(self._call(target, chunk, embedding, timeout) for chunk in chunks))
        return InferOutputs(
            np.concatenate([r.probabilities for r in results]),
            np.concatenate([r.embeddings for r in results if r.embeddings is not None]) if embedding else None,
            [c for r in results for c in r.error_codes],
            [m for r in results for m in r.error_messages],
        )

    async def _call(self, target: Resolved, images: list[bytes], embedding: bool, timeout: float) -> InferOutputs:
        started = time.perf_counter()
        try:
            return await self.triton.infer(
                target.name, target.version, images, embedding, timeout, self.settings.max_image_pixels
            )
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
