"""Runs one model version on encoded images: decode once, batch, forward, calibrated probabilities.

Transport-free so the Triton python backend model, benchmarks and tests share it. On the CPU, Pillow
decodes in threads (JPEG draft mode makes large photos cheap); on a GPU, nvJPEG decodes on the card
(:mod:`prelabel.models.device_decode`), so the CPU does not cap the GPU's throughput.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from prelabel.models import backbones, device_decode
from prelabel.models.card import VersionCard
from prelabel.preprocessing import ImageError, decode_or_error


@dataclass
class Outputs:
    probabilities: npt.NDArray[Any]  # float32 [N, classes]; zeros for failed images
    embeddings: npt.NDArray[Any]  # float32 [N, dim]
    error_codes: npt.NDArray[Any]  # int32 [N]: 0 where the image was used, else its gRPC status code
    error_messages: list[str]  # "" where the image was used, else what is wrong with it


class Runner:
    """``max_batch`` bounds the images of one forward pass (memory); ``decode_on_device`` defaults to
    True on a GPU (and may be set on the CPU, where it is slower than Pillow, to test that path)."""

    def __init__(self, version_dir: Path, device: str = "cpu", max_batch: int = 64,
                 decode_on_device: bool | None = None) -> None:  # fmt: skip
        self.card = VersionCard.from_json((version_dir / "card.json").read_text())
        self.device = torch.device(device)
        self.max_batch = max(1, max_batch)
        self.decode_on_device = self.device.type == "cuda" if decode_on_device is None else decode_on_device
        model = backbones.build(self.card.arch, len(self.card.labels), self.card.preprocess.crop, self.card.pooling)
        backbones.load_state(model, version_dir / "weights.pt")
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.normalize = backbones.Normalizer(self.card.preprocess, self.device)
        # PIL releases the GIL while decoding, so threads decode a batch in parallel.
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))

    def decode(self, images: list[bytes], max_pixels: list[int]) -> list[Any]:
        """uint8 ``[crop, crop, 3]`` pixels (numpy on the CPU path, a tensor on the device path) or an ImageError."""
        if self.decode_on_device:
            return list(device_decode.decode_batch(images, self.card.preprocess, self.device, max_pixels))
        if len(images) > 1:
            return list(self.pool.map(decode_or_error, images, [self.card.preprocess] * len(images), max_pixels))
        return [decode_or_error(images[0], self.card.preprocess, max_pixels[0])]

    def run(self, images: list[bytes], max_pixels: list[int] | None = None) -> Outputs:
        """``max_pixels[i]`` bounds image i (0: no limit); the header is checked before decoding.

        Images are decoded and forwarded ``max_batch`` at a time, so memory stays bounded for any
        caller (Triton hands at most its ``max_batch_size`` images; benchmarks and tests pass more)."""
        limits = max_pixels or [0] * len(images)
        codes = np.zeros(len(images), dtype=np.int32)
        messages = [""] * len(images)
        probabilities = np.zeros((len(images), len(self.card.labels)), dtype=np.float32)
        embeddings = np.zeros((len(images), self.model.embedding_dim), dtype=np.float32)
        for start in range(0, len(images), self.max_batch):
            decoded = self.decode(images[start : start + self.max_batch], limits[start : start + self.max_batch])
            ok = []
            for i, d in enumerate(decoded, start):
                if isinstance(d, ImageError):
                    codes[i], messages[i] = d.status, str(d)
                else:
                    ok.append(i)
            if not ok:
                continue
            usable = [d for d in decoded if not isinstance(d, ImageError)]
            pixels = torch.stack(usable) if self.decode_on_device else torch.from_numpy(np.stack(usable))
            probabilities[ok], embeddings[ok] = self.forward(pixels)
        return Outputs(probabilities, embeddings, codes, messages)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``uint8 [N, H, W, 3]`` to calibrated probabilities and embeddings."""
        x = self.normalize(pixels)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits, embedding = self.model(x)
        else:
            logits, embedding = self.model(x)
        probs = torch.softmax(logits.float() / self.card.temperature, dim=1)
        return probs.cpu().numpy(), embedding.float().cpu().numpy()
