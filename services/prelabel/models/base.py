"""The project's own pre-trained base model, shipped inside the package.

No weights can be downloaded where Prelabel is developed and tested, so ``scripts/pretrain_base_model.py``
pre-trains a ResNet-18 on Prelabel Formulas (generated images only) and commits the result here: weights,
labels, preprocessing and reference statistics of the pre-training data's embeddings (used to
measure how similar a new dataset is).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from prelabel.preprocessing import Preprocess

ASSETS = Path(__file__).parent / "assets"
NAME = "prelabel-base"
ARCH = "resnet18"
IMAGE_SIZE = 64


@dataclass(frozen=True)
class BaseModelFiles:
    weights: Path
    card: Path
    reference: Path

    def read_card(self) -> dict[str, Any]:
        card: dict[str, Any] = json.loads(self.card.read_text())
        return card

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.read_card()["preprocess"])


def files(assets: Path = ASSETS) -> BaseModelFiles:
    return BaseModelFiles(
        weights=assets / f"{NAME}.pt",
        card=assets / f"{NAME}.json",
        reference=assets / f"{NAME}.reference.npz",
    )


def reference_statistics(embeddings: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
    """Mean and covariance of embeddings: a Gaussian fit for Fréchet-style similarity."""
    x = embeddings.astype(np.float64)
    return {
        "mean": x.mean(axis=0).astype(np.float32),
        "cov": np.cov(x, rowvar=False).astype(np.float16),
        "count": np.asarray(len(x)),
    }
