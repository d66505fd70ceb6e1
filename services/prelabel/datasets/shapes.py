"""Prelabel Shapes: a procedurally generated image dataset for pre-training without downloads.

Formula-driven pre-training (FractalDB, Kataoka et al. 2020; Baradad et al. 2021) shows that
generated images teach features that transfer to real photos. Each image is one shape or texture
class drawn with a random colour, size, position and rotation over a random noisy background, so a
network must learn edges, corners, curvature and periodic texture to tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "stripes",
    "checkerboard",
    "dots",
    "hexagon",
)


# Shapes the base model never saw, drawn the same way: a new task that is similar to pre-training.
NOVEL_CLASSES: tuple[str, ...] = ("pentagon", "octagon", "ellipse", "crescent", "semicircle", "outlined-square")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _contrasting(rng: np.random.Generator, bg: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        fg = _colour(rng)
        if sum(abs(a - b) for a, b in zip(fg, bg, strict=True)) > 180:
            return fg


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * i / sides),
            cy + radius * math.sin(angle + 2 * math.pi * i / sides),
        )
        for i in range(sides)
    ]


def _star(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.42
        a = angle + math.pi * i / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _texture(
    draw: ImageDraw.ImageDraw, label: str, size: int, fg: tuple[int, int, int], rng: np.random.Generator
) -> None:
    period = int(rng.integers(max(4, size // 10), max(6, size // 4)))
    if label == "stripes":
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle), math.sin(angle)
        width = max(1, period // 2)
        for offset in range(-2 * size, 2 * size, period):
            cx, cy = size / 2 + offset * -dy, size / 2 + offset * dx
            draw.line(
                [(cx - 2 * size * dx, cy - 2 * size * dy), (cx + 2 * size * dx, cy + 2 * size * dy)],
                fill=fg,
                width=width,
            )
    elif label == "checkerboard":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    else:  # dots
        r = max(1.0, period / 4)
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                jx, jy = rng.uniform(-1, 1, size=2)
                draw.ellipse([x + jx - r, y + jy - r, x + jx + r, y + jy + r], fill=fg)


def render(label: int, size: int, rng: np.random.Generator, classes: tuple[str, ...] = CLASSES) -> Image.Image:
    """Draw one image of class ``classes[label]`` (``CLASSES`` or ``NOVEL_CLASSES``)."""
    name = classes[label]
    bg = _colour(rng)
    noise = rng.normal(0, rng.uniform(2, 25), size=(size, size, 3))
    base = np.clip(np.asarray(bg, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    fg = _contrasting(rng, bg)
    if name in ("stripes", "checkerboard", "dots"):
        _texture(draw, name, size, fg, rng)
    else:
        radius = rng.uniform(0.2, 0.42) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if name == "circle":
            draw.ellipse(box, fill=fg)
        elif name == "ring":
            draw.ellipse(box, outline=fg, width=max(2, int(radius * rng.uniform(0.15, 0.35))))
        elif name == "square":
            draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=fg)
        elif name == "triangle":
            draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=fg)
        elif name == "hexagon":
            draw.polygon(_polygon(cx, cy, radius, 6, angle), fill=fg)
        elif name == "star":
            draw.polygon(_star(cx, cy, radius, angle), fill=fg)
        elif name == "pentagon":
            draw.polygon(_polygon(cx, cy, radius, 5, angle), fill=fg)
        elif name == "octagon":
            draw.polygon(_polygon(cx, cy, radius, 8, angle), fill=fg)
        elif name == "ellipse":
            squash = rng.uniform(0.35, 0.6)
            if rng.random() < 0.5:
                draw.ellipse([cx - radius, cy - radius * squash, cx + radius, cy + radius * squash], fill=fg)
            else:
                draw.ellipse([cx - radius * squash, cy - radius, cx + radius * squash, cy + radius], fill=fg)
        elif name == "crescent":
            draw.ellipse(box, fill=fg)
            shift = radius * rng.uniform(0.35, 0.6)
            dx, dy = shift * math.cos(angle), shift * math.sin(angle)
            draw.ellipse([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], fill=bg)
        elif name == "semicircle":
            start = math.degrees(angle)
            draw.pieslice(box, start, start + 180, fill=fg)
        elif name == "outlined-square":
            draw.polygon(_polygon(cx, cy, radius, 4, angle), outline=fg, width=max(2, int(radius * 0.25)))
        else:  # cross
            w = radius * rng.uniform(0.25, 0.45)
            draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=fg)
            draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=fg)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image


def batches(batch_size: int, size: int, seed: int) -> Iterator[tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
    """An endless stream of ``(images uint8 [N,H,W,3], labels int64 [N])`` with balanced classes."""
    rng = np.random.default_rng(seed)
    while True:
        labels = rng.integers(0, len(CLASSES), size=batch_size)
        images = np.stack([np.asarray(render(int(y), size, rng)) for y in labels])
        yield images, labels.astype(np.int64)


def sample(count: int, size: int, seed: int, classes: tuple[str, ...] = CLASSES) -> tuple[list[Image.Image], list[int]]:
    """``count`` images with their labels, cycling through the classes."""
    rng = np.random.default_rng(seed)
    labels = [i % len(classes) for i in range(count)]
    return [render(y, size, rng, classes) for y in labels], labels
