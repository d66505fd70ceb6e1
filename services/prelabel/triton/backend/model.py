"""Prelabel's one Triton python-backend model, following Triton's ``add_sub`` example.

Triton's dynamic batcher hands ``execute`` several requests at once; their images are run as one
batch and split back, one response per request. An image that cannot be decoded gets its gRPC
status code in ``ERROR_CODE`` and what is wrong in ``ERROR_MESSAGE`` (0 and "" for the others)
instead of failing its batch; a request that is malformed as a whole gets a TritonError. The
request parameter ``max_pixels`` bounds each image's pixel count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from prelabel.models.runner import Runner


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        self.runner = Runner(version_dir, device=device)
        self.name = f"{args['model_name']}/{args['model_version']}"
        config = json.loads(args["model_config"])
        self.max_batch_size = int(config.get("max_batch_size", 0))

    def execute(self, requests: list[Any]) -> list[Any]:
        images: list[bytes] = []
        limits: list[int] = []
        spans: list[tuple[int, int] | Any] = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            if tensor is None:
                spans.append(pb_utils.TritonError("input IMAGE is missing"))
                continue
            array = tensor.as_numpy().reshape(-1)
            start = len(images)
            images.extend(bytes(v) for v in array)
            limit = int(json.loads(request.parameters() or "{}").get("max_pixels", 0))
            limits.extend([limit] * len(array))
            spans.append((start, len(images)))
        outputs = self.runner.run(images, limits) if images else None
        responses = []
        for request, span in zip(requests, spans, strict=True):
            if not isinstance(span, tuple) or outputs is None:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            start, end = span
            wanted = set(request.requested_output_names()) or {"EMBEDDING"}
            messages = np.array([[m.encode()] for m in outputs.error_messages[start:end]], dtype=np.object_)
            tensors = [
                pb_utils.Tensor("PROBABILITIES", outputs.probabilities[start:end]),
                pb_utils.Tensor("ERROR_CODE", outputs.error_codes[start:end].reshape(-1, 1)),
                pb_utils.Tensor("ERROR_MESSAGE", messages),
            ]
            if "EMBEDDING" in wanted:
                tensors.append(pb_utils.Tensor("EMBEDDING", outputs.embeddings[start:end]))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.runner.pool.shutdown(wait=False)
