"""The one adapter between Prelabel and Triton's gRPC API (``tritonclient.grpc.aio``).

tritonclient reports failures as ``InferenceServerException`` with the gRPC status as text; they are
converted here, once, into Prelabel's errors. The client is created lazily so that it belongs to
the running event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from prelabel.errors import DeadlineExceeded, Internal, NotFound, PrelabelError, Unavailable

_KEEPALIVE = KeepAliveOptions()
# tritonclient's own channel options, plus a short reconnect back-off: gRPC's default grows to 120 s,
# so after a Triton restart the gateway would stay UNAVAILABLE for up to two minutes after Triton is
# back. Reconnecting to a local or in-cluster address every second at most costs nothing.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", _KEEPALIVE.keepalive_time_ms),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE.keepalive_timeout_ms),
    ("grpc.keepalive_permit_without_calls", _KEEPALIVE.keepalive_permit_without_calls),
    ("grpc.http2.max_pings_without_data", _KEEPALIVE.http2_max_pings_without_data),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

OUTPUTS = [triton_grpc.InferRequestedOutput(name) for name in ("PROBABILITIES", "ERROR_CODE", "ERROR_MESSAGE")]
OUTPUTS_WITH_EMBEDDING = [*OUTPUTS, triton_grpc.InferRequestedOutput("EMBEDDING")]


@dataclass(frozen=True)
class ModelState:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str = ""


@dataclass
class InferOutputs:
    probabilities: npt.NDArray[Any]
    embeddings: npt.NDArray[Any] | None
    error_codes: list[int]  # per image: 0, or the gRPC status code of why it got no prediction
    error_messages: list[str]


class TritonClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client: triton_grpc.InferenceServerClient | None = None

    @property
    def client(self) -> triton_grpc.InferenceServerClient:
        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def convert(self, exc: InferenceServerException, what: str) -> PrelabelError:
        status, message = str(exc.status() or ""), str(exc.message() or exc)
        if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in message:
            return DeadlineExceeded(f"{what}: the deadline passed before Triton answered; retry with a longer deadline")
        if "UNAVAILABLE" in status:
            return Unavailable(f"{what}: Triton at {self.url} is unreachable ({message}); check that it is running")
        if "NOT_FOUND" in status or "unknown model" in message:
            return NotFound(f"{what}: {message}")
        if "INVALID_ARGUMENT" in status:
            return Internal(f"{what}: Triton rejected the request: {message}")
        return Unavailable(f"{what}: Triton failed: {message}; retry, and see Triton's log if it persists")

    async def server_live(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=timeout_s))
        except (InferenceServerException, asyncio.TimeoutError, OSError):
            return False

    async def model_index(self, timeout_s: float = 5.0) -> list[ModelState]:
        try:
            index: dict[str, Any] = await self.client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self.convert(exc, "listing Triton's models") from None
        return [
            ModelState(m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", ""))
            for m in index.get("models", [])
        ]

    async def max_batch_size(self, model: str) -> int:
        try:
            config: dict[str, Any] = await self.client.get_model_config(model, as_json=True, client_timeout=5.0)
        except InferenceServerException as exc:
            raise self.convert(exc, f"reading model {model!r}'s config") from None
        return int(config.get("config", {}).get("max_batch_size", 0))

    async def load_model(self, model: str, timeout_s: float = 300.0) -> None:
        try:
            await self.client.load_model(model, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self.convert(exc, f"loading model {model!r}") from None

    async def infer(
        self,
        model: str,
        version: str,
        images: list[bytes],
        want_embedding: bool,
        timeout_s: float | None,
        max_pixels: int = 0,
    ) -> InferOutputs:
        inputs = image_inputs(images)
        try:
            result = await self.client.infer(
                model,
                inputs,
                model_version=version,
                outputs=OUTPUTS_WITH_EMBEDDING if want_embedding else OUTPUTS,
                client_timeout=timeout_s,
                parameters={"max_pixels": max_pixels} if max_pixels else None,
            )
        except InferenceServerException as exc:
            raise self.convert(exc, f"inference on {model}/{version}") from None
        codes = result.as_numpy("ERROR_CODE").reshape(-1).tolist()
        return InferOutputs(
            probabilities=result.as_numpy("PROBABILITIES").reshape(len(images), -1),
            embeddings=result.as_numpy("EMBEDDING").reshape(len(images), -1) if want_embedding else None,
            error_codes=codes,
            error_messages=messages_of(result.as_numpy("ERROR_MESSAGE").reshape(len(images), -1), codes),
        )


def image_inputs(images: list[bytes]) -> list[triton_grpc.InferInput]:
    """One request's images as Triton inputs: ``IMAGES``, the encoded files end to end, zero-padded by
    fewer than n bytes and laid out as n equal rows ``[n, ceil(total bytes / n)]``, and ``SIZES``, each
    file's length ``[n, 1]``.

    The rows do not follow the files (SIZES cuts them out); they make the request's batch dimension its
    image count, so Triton's batcher counts images: a full request runs at once, and concurrent ones
    are spread over the instances instead of merged into one call. Not a BYTES tensor: tritonclient
    and the python backend (de)serialise those with a Python loop per element, and Triton 2.51's
    python backend cannot read them at all with numpy 2 in its environment.
    """
    total = sum(len(image) for image in images)
    width = -(-total // max(1, len(images)))
    padded = b"".join([*images, bytes(width * len(images) - total)])
    flat = np.frombuffer(padded, dtype=np.uint8).reshape(len(images), width)
    sizes = np.array([[len(image)] for image in images], dtype=np.int64)
    data = triton_grpc.InferInput("IMAGES", list(flat.shape), "UINT8")
    data.set_data_from_numpy(flat)
    lengths = triton_grpc.InferInput("SIZES", list(sizes.shape), "INT64")
    lengths.set_data_from_numpy(sizes)
    return [data, lengths]


def messages_of(rows: npt.NDArray[Any], codes: list[int]) -> list[str]:
    """``ERROR_MESSAGE``'s rows (each image's message in UTF-8, zero-padded) as text, "" where the code is 0."""
    pairs = zip(rows, codes, strict=True)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") if code else "" for row, code in pairs]
