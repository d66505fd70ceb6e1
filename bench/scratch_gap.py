#!/usr/bin/env python3
"""Where FROM_SCRATCH loses to the textbook ResNet-18: input resolution, or the recipe?

    .venv/bin/python bench/scratch_gap.py [--tasks china-grey] [--seeds 0 1] [--columns recipe@64 recipe@96]

On one seeded 20-per-class subset per task and seed, side by side (test accuracy %):

- ``textbook@96`` / ``textbook@64``: bench/label_efficiency.py's textbook ResNet-18 (padded random
  crops, flips, AdamW, one-cycle, 40 epochs) at the photos' native 96 px and at the base's 64 px;
- ``recipe@64`` / ``recipe@96``: Prelabel's from-scratch recipe (training/loop.py: random resized
  crops, label smoothing, warm-up and cosine decay, its budget of steps) on every example, its
  whole schedule, without cross-fitting: what the job's final run does when the folds choose the
  whole budget;
- ``recipe+pad@64``: the same with the textbook's padded crops instead of random resized crops;
- ``recipe@80``: the recipe at 80 px, between the two (about 1.6x the compute of 64 px, 96 px 2.3x).

Each cell has the column's accuracy and its seconds (the compute a resolution costs).

Use tuning tasks (bench/label_efficiency.py) to decide; a run per seed takes about 8 minutes here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import label_efficiency as le
from prelabel.models import backbones
from prelabel.preprocessing import Preprocess
from prelabel.training import data, loop
from prelabel.training.strategy import FROM_SCRATCH


class PadCrop:
    """The textbook's augmentation as a recipe's ``augment``: reflect-pad by 1/8, one crop and flip per batch."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size = x.shape[-1]
        pad = size // 8
        x = F.pad(x, (pad,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        x = x[:, :, dy : dy + size, dx : dx + size]
        return x.flip(3) if float(torch.rand(1, generator=generator)) < 0.5 else x


def recipe_accuracy(train: list[Image.Image], y: list[str], test: list[Image.Image], ty: list[str], size: int,
                    seed: int, pad: bool) -> float:  # fmt: skip
    preprocess = Preprocess(resize=size, crop=size)
    train_set, test_set = data.from_images(train, y, preprocess), data.from_images(test, ty, preprocess)
    normalize = backbones.Normalizer(preprocess, torch.device("cpu"))
    torch.manual_seed(seed)
    model = backbones.build(loop.SCRATCH_ARCH, len(train_set.classes), image_size=size)
    recipe = loop.recipe(FROM_SCRATCH, len(train_set))
    if pad:
        recipe = dataclasses.replace(recipe, augment=PadCrop())  # type: ignore[arg-type]
    loop.fit(model, [], train_set, None, normalize, recipe, seed, lambda *_: None, lambda: False)
    logits, _ = loop.predict(model, test_set.pixels, normalize)
    return float((logits.argmax(1) == test_set.labels).float().mean())


# A column: the accuracy of one run on (train images, labels, test images, test labels, seed).
Run = Callable[[list[Image.Image], list[str], list[Image.Image], list[str], int], float]


def textbook(size: int) -> Run:
    return lambda train, y, test, ty, seed: le.baseline_resnet18(train, y, test, ty, size, seed)


def prelabel_recipe(size: int, pad: bool = False) -> Run:
    return lambda train, y, test, ty, seed: recipe_accuracy(train, y, test, ty, size, seed, pad)


COLUMNS: dict[str, Run] = {
    "textbook@96": textbook(96),
    "textbook@64": textbook(64),
    "recipe@64": prelabel_recipe(64),
    "recipe+pad@64": prelabel_recipe(64, pad=True),
    "recipe@80": prelabel_recipe(80),
    "recipe@96": prelabel_recipe(96),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["china-grey"], choices=le.TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    args = parser.parse_args()
    print("| task | seed | " + " | ".join(args.columns) + " |")
    print("|" + "---|" * (len(args.columns) + 2), flush=True)
    for name in args.tasks:
        for seed in args.seeds:
            pool, pool_labels, test, test_labels, _ = le.task(name, args.per_class + 10, seed)
            index = le.subset(pool_labels, args.per_class, seed)
            train, y = [pool[i] for i in index], [pool_labels[i] for i in index]
            cells = []
            for column in args.columns:
                started = time.perf_counter()
                accuracy = COLUMNS[column](train, y, test, test_labels, seed)
                cells.append(f"{accuracy * 100:.1f} ({time.perf_counter() - started:.0f} s)")
            print(f"| {name} | {seed} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
