"""Prelabel's one Triton python-backend model, following Triton's ``add_sub`` example.

A request of n images has batch size n: ``IMAGES`` holds the encoded files end to end, zero-padded
into n equal rows (UINT8, the rows do not follow the files) and ``SIZES`` each file's length, so
Triton's batcher counts images, as it did when each image was a row of a BYTES tensor. There is no
BYTES tensor any more: Triton 2.51's python backend reads numpy
arrays with numpy 1's memory layout, so with numpy 2 in its environment its numpy glue returns empty
or garbage tensors (``../shared/GPU.md``), and BYTES tensors cost a Python loop per element on both
sides. With numpy 2, tensors cross into and out of Triton by DLPack instead.

Triton's dynamic batcher hands ``execute`` several requests at once, at most ``max_batch_size`` images
in all; their images are run together and split back, one response per request. An image that cannot
be decoded gets its gRPC status code in ``ERROR_CODE`` and what is wrong in its row of
``ERROR_MESSAGE`` (UTF-8, zero-padded; empty for the others) instead of failing its batch; a request
that is malformed as a whole gets a TritonError. The request parameter ``max_pixels`` bounds each
image's pixel count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from prelabel.models.runner import Runner


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        config = json.loads(args["model_config"])
        self.runner = Runner(version_dir, device=device, max_batch=int(config.get("max_batch_size", 0)) or 64)
        self.name = f"{args['model_name']}/{args['model_version']}"
        decoding = "nvJPEG on the device" if self.runner.decode_on_device else "Pillow on the CPU"
        pb_utils.Logger.log_info(
            f"prelabel: {self.name} on {device}, decoding with {decoding}, max batch {self.runner.max_batch}; "
            f"numpy {np.__version__}, torch {torch.__version__}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        images: list[bytes] = []
        limits: list[int] = []
        spans: list[tuple[int, int] | Any] = []
        for request in requests:
            try:
                request_images = _images(request)
            except ValueError as exc:
                spans.append(pb_utils.TritonError(str(exc)))
                continue
            start = len(images)
            images.extend(request_images)
            limit = int(json.loads(request.parameters() or "{}").get("max_pixels", 0))
            limits.extend([limit] * len(request_images))
            spans.append((start, len(images)))
        outputs = self.runner.run(images, limits) if images else None
        responses = []
        for request, span in zip(requests, spans, strict=True):
            if not isinstance(span, tuple) or outputs is None:
                error = span if not isinstance(span, tuple) else pb_utils.TritonError("the request holds no images")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            start, end = span
            wanted = set(request.requested_output_names()) or {"EMBEDDING"}
            tensors = [  # one row per image
                _output("PROBABILITIES", outputs.probabilities[start:end]),
                _output("ERROR_CODE", outputs.error_codes[start:end, None]),
                _output("ERROR_MESSAGE", _rows([m.encode() for m in outputs.error_messages[start:end]])),
            ]
            if "EMBEDDING" in wanted:
                tensors.append(_output("EMBEDDING", outputs.embeddings[start:end]))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.runner.pool.shutdown(wait=False)


def _images(request: Any) -> list[bytes]:
    """The request's encoded images, cut out of ``IMAGES`` by ``SIZES``; ValueError if they do not fit."""
    data = pb_utils.get_input_tensor_by_name(request, "IMAGES")
    sizes = pb_utils.get_input_tensor_by_name(request, "SIZES")
    if data is None or sizes is None:
        raise ValueError("inputs IMAGES (the encoded files end to end, UINT8) and SIZES (their lengths) are required")
    flat = _array(data).reshape(-1)
    lengths = _array(sizes).reshape(-1)
    total = int(lengths.sum())
    if (lengths < 0).any() or not 0 <= flat.size - total < max(1, lengths.size):
        raise ValueError(f"SIZES add up to {total} bytes but IMAGES holds {flat.size} "
                         f"(the files end to end, padded by fewer than one byte per image)")  # fmt: skip
    view = flat.data
    ends = np.cumsum(lengths).tolist()
    return [view[a:b].tobytes() for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _rows(texts: list[bytes]) -> np.ndarray[Any, Any]:
    """One zero-padded UINT8 row per text, at least one byte wide."""
    rows = np.zeros((len(texts), max([1, *map(len, texts)])), dtype=np.uint8)
    for row, text in zip(rows, texts, strict=True):
        if text:
            row[: len(text)] = np.frombuffer(text, dtype=np.uint8)
    return rows


# The backend's own numpy glue where it works (numpy 1: 3-4x cheaper per tensor, measured inside
# ``execute``), DLPack where it misreads arrays (numpy 2).
_DLPACK = int(np.__version__.split(".")[0]) >= 2


def _array(tensor: Any) -> np.ndarray[Any, Any]:
    return from_dlpack(tensor.to_dlpack()).numpy() if _DLPACK else tensor.as_numpy()


def _output(name: str, array: np.ndarray[Any, Any]) -> Any:
    if _DLPACK:
        return pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(array)))
    return pb_utils.Tensor(name, array)
