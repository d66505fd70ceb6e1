"""Runs one model version on encoded images: decode once, batch, forward, calibrated probabilities.

Transport-free so the Triton python backend model, benchmarks and tests share it.
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

from prelabel.models import backbones
from prelabel.preprocessing import ImageError, decode
from prelabel.triton.repository import VersionCard


@dataclass
class Outputs:
    probabilities: npt.NDArray[Any]  # float32 [N, classes]; zeros for failed images
    embeddings: npt.NDArray[Any]  # float32 [N, dim]
    errors: list[str]  # "" where the image was used


class Runner:
    def __init__(self, version_dir: Path, device: str = "cpu", max_pixels: int = 0) -> None:
        self.card = VersionCard.from_json((version_dir / "card.json").read_text())
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        model = backbones.build(self.card.arch, len(self.card.labels), image_size=self.card.preprocess.crop)
        backbones.load_state(model, version_dir / "weights.pt")
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        p = self.card.preprocess
        self.mean = torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(p.std, device=self.device).view(1, 3, 1, 1) * 255
        # PIL releases the GIL while decoding, so threads decode a batch in parallel.
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))

    def _decode(self, content: bytes) -> npt.NDArray[Any] | str:
        try:
            return decode(content, self.card.preprocess, self.max_pixels)
        except ImageError as exc:
            return str(exc)

    def run(self, images: list[bytes]) -> Outputs:
        decoded = list(self.pool.map(self._decode, images)) if len(images) > 1 else [self._decode(images[0])]
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        errors = [d if isinstance(d, str) else "" for d in decoded]
        probabilities = np.zeros((len(images), len(self.card.labels)), dtype=np.float32)
        embeddings = np.zeros((len(images), self.model.embedding_dim), dtype=np.float32)
        if ok:
            pixels = np.stack([decoded[i] for i in ok])
            probs, emb = self.forward(torch.from_numpy(pixels))
            probabilities[ok] = probs
            embeddings[ok] = emb
        return Outputs(probabilities, embeddings, errors)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``uint8 [N, H, W, 3]`` to calibrated probabilities and embeddings."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                logits, embedding = self.model(x)
        else:
            logits, embedding = self.model(x)
        probs = torch.softmax(logits.float() / self.card.temperature, dim=1)
        return probs.cpu().numpy(), embedding.float().cpu().numpy()
