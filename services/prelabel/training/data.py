"""Labelled images for training: loaded, checked and decoded once, then split by class.

Images are decoded to the model's input size a single time (uint8, a few KB each); every epoch
then reads tensors, never files. Problems are found before any training starts and reported all
at once, so nothing is half-published. The encoded files stay at hand (``Examples.source``) so
that a strategy with an input size of its own (from scratch, training/resolution.py) can decode
them once more at that size.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prelabel.datasets.folder import labelled_files
from prelabel.datasets.store import MIN_PER_CLASS
from prelabel.errors import InvalidArgument
from prelabel.preprocessing import ImageError, Preprocess, decode_or_error

DECODE_BLOCK = 64  # images decoded between two interrupt checks


@dataclass(frozen=True)
class Source:
    """The encoded files the examples were decoded from, in the same order, to decode them again."""

    images: list[bytes]
    names: list[str] | None
    max_pixels: int

    def subset(self, index: list[int]) -> Source:
        names = [self.names[i] for i in index] if self.names else None
        return Source([self.images[i] for i in index], names, self.max_pixels)

    def short_sides(self) -> list[int]:
        """Each image's shorter side in pixels, read from its header (nothing is decoded)."""
        sides = []
        for content in self.images:
            with Image.open(io.BytesIO(content)) as image:
                sides.append(min(image.size))
        return sides


@dataclass
class Examples:
    pixels: torch.Tensor  # uint8 [N, H, W, 3], already resized and cropped for the model
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    source: Source | None = None  # None when made from pixels alone

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        counted = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counted, strict=True))

    def subset(self, index: torch.Tensor) -> Examples:
        source = self.source.subset(index.tolist()) if self.source else None
        return Examples(self.pixels[index], self.labels[index], self.classes, source)

    def decoded(self, preprocess: Preprocess, interrupt: Callable[[], None] = lambda: None) -> Examples:
        """The same examples decoded again for ``preprocess`` (same order, labels and classes)."""
        if self.source is None:
            raise ValueError("these examples were made from pixels, not files; they cannot be decoded again")
        labels = [self.classes[i] for i in self.labels.tolist()]
        return from_encoded(self.source.images, labels, preprocess, self.source.names, self.source.max_pixels,
                            interrupt)  # fmt: skip


def from_encoded(
    images: list[bytes], labels: list[str], preprocess: Preprocess, names: list[str] | None = None,
    max_pixels: int = 0, interrupt: Callable[[], None] = lambda: None,
) -> Examples:  # fmt: skip
    """Decode and check ``images`` (encoded files) labelled ``labels``; raises with every problem found.

    ``max_pixels`` bounds each image as it bounds prediction (a decompression bomb uploaded into a
    dataset must not reach the trainer); ``interrupt`` is called before each block of images and may
    raise to stop.
    """
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    pixels, targets, problems = [], [], []

    # Pillow releases the GIL while decoding: threads decode in parallel, a block at a time between checks.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(images), DECODE_BLOCK):
            interrupt()
            block = images[start : start + DECODE_BLOCK]
            results = pool.map(decode_or_error, block, [preprocess] * len(block), [max_pixels] * len(block))
            for n, result in enumerate(results, start):
                if isinstance(result, ImageError):
                    problems.append(f"{names[n] if names else f'image {n}'} ({result})")
                else:
                    pixels.append(result)
                    targets.append(index[labels[n]])
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InvalidArgument(f"{len(problems)} image(s) could not be read: {shown}. Remove or replace them")
    examples = Examples(torch.from_numpy(np.stack(pixels)), torch.tensor(targets, dtype=torch.int64), classes,
                        Source(images, names, max_pixels))  # fmt: skip
    check(examples)
    return examples


def from_images(images: list[Image.Image], labels: list[str], preprocess: Preprocess) -> Examples:
    encoded = []
    for image in images:
        out = io.BytesIO()
        image.save(out, "PNG")
        encoded.append(out.getvalue())
    return from_encoded(encoded, labels, preprocess)


def from_folder(root: Path, preprocess: Preprocess) -> Examples:
    """An image folder with one subfolder per class (``root/cat/1.jpg``, ``root/dog/2.png``...)."""
    files = labelled_files(root)
    return from_encoded([p.read_bytes() for p, _ in files], [c for _, c in files], preprocess,
                        names=[str(p.relative_to(root)) for p, _ in files])  # fmt: skip


def check(examples: Examples) -> None:
    if len(examples.classes) < 2:
        raise InvalidArgument(
            f"found {len(examples.classes)} class ({', '.join(examples.classes) or 'none'}); a classifier needs at "
            "least 2 classes with examples of each"
        )
    few = {c: n for c, n in examples.counts().items() if n < MIN_PER_CLASS}
    if few:
        listed = ", ".join(f"{c} ({n})" for c, n in sorted(few.items()))
        raise InvalidArgument(f"every class needs at least {MIN_PER_CLASS} examples; too few: {listed}. Add more")


def folds(labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` seeded stratified folds (fewer when a class has fewer than ``k`` examples): index tensors.

    Each class's examples are shuffled and dealt round-robin, starting at a random fold, so every
    fold holds each class's share and fold sizes differ by at most one per class.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels)
    k = max(2, min(k, int(counts[counts > 0].min())))
    members: list[list[int]] = [[] for _ in range(k)]
    for c in range(len(counts)):
        of_class = torch.nonzero(labels == c).flatten()
        shuffled: list[int] = of_class[torch.randperm(len(of_class), generator=generator)].tolist()
        offset = int(torch.randint(0, k, (1,), generator=generator))
        for j, i in enumerate(shuffled):
            members[(j + offset) % k].append(i)
    return [torch.tensor(sorted(m), dtype=torch.int64) for m in members]
