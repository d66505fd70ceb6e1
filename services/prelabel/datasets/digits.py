"""sklearn's 1,797 real handwritten digits (8x8, grey) as RGB images: a task unlike Prelabel Shapes."""

from __future__ import annotations

import numpy as np
from PIL import Image


def load(size: int = 64) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        Image.fromarray((d * (255.0 / 16.0)).astype(np.uint8), "L").resize((size, size), Image.Resampling.BILINEAR)
        for d in digits.images
    ]
    return [im.convert("RGB") for im in images], [int(t) for t in digits.target]
