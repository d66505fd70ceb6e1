#!/usr/bin/env python3
"""Label efficiency: accuracy vs labels per class for each strategy and AUTO, on two transfer tasks.

    .venv/bin/python bench/label_efficiency.py [--per-class 5 10 25 50 0] [--tasks novel-shapes digits]

Tasks: ``novel-shapes`` (six shapes the base model never saw, drawn like its pre-training data:
similar) and ``digits`` (sklearn's handwritten digits: dissimilar). For every row the same
labelled subset (seeded, per class) trains each strategy with its defaults, and accuracy is
measured on a held-out test set that no strategy sees; 0 in ``--per-class`` means all labels.
Prints, per row, accuracy and training seconds per strategy, AUTO's choice, AUTO minus the best
fixed strategy, and how much faster feature extraction trains than full fine-tuning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prelabel.datasets import digits, shapes
from prelabel.models import backbones
from prelabel.models.defaults import ensure_default_model
from prelabel.training import data, engine
from prelabel.triton.repository import ModelRepository

FIXED = [engine.FEATURE_EXTRACTION, engine.FREEZE_FIRST_K, engine.FULL_FINE_TUNE, engine.FROM_SCRATCH]
SHORT = {engine.FEATURE_EXTRACTION: "FE", engine.FREEZE_FIRST_K: "freeze-k", engine.FULL_FINE_TUNE: "full",
         engine.FROM_SCRATCH: "scratch", engine.AUTO: "AUTO"}  # fmt: skip


def task(name: str) -> tuple[list[Image.Image], list[str], list[Image.Image], list[str]]:
    """(train pool, labels, test images, labels)."""
    if name == "novel-shapes":
        pool, y = shapes.sample(150 * 6, 64, 1, shapes.NOVEL_CLASSES)
        test, ty = shapes.sample(50 * 6, 64, 2, shapes.NOVEL_CLASSES)
        return pool, [shapes.NOVEL_CLASSES[i] for i in y], test, [shapes.NOVEL_CLASSES[i] for i in ty]
    images, labels = digits.load()
    order = np.random.default_rng(0).permutation(len(images))
    test_index, pool_index = order[:300], order[300:]
    return ([images[i] for i in pool_index], [str(labels[i]) for i in pool_index],
            [images[i] for i in test_index], [str(labels[i]) for i in test_index])  # fmt: skip


def subset(labels: list[str], per_class: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        chosen += list(rng.permutation(members)[: per_class or len(members)])
    return sorted(chosen)


def test_accuracy(result: engine.TrainResult, test: data.Examples) -> float:
    normalize = backbones.Normalizer(result.preprocess, torch.device("cpu"))
    with torch.no_grad():
        logits, _ = result.model(normalize(test.pixels))
    predicted = [result.classes[i] for i in logits.argmax(1).tolist()]
    return float(np.mean([p == test.classes[t] for p, t in zip(predicted, test.labels.tolist(), strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[5, 10, 25, 50, 0])
    parser.add_argument("--tasks", nargs="+", default=["novel-shapes", "digits"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    repo = ModelRepository(Path(tempfile.mkdtemp(prefix="prelabel-bench-")) / "models")
    ensure_default_model(repo, "prelabel-base", "builtin")
    base = engine.load_base(repo, "prelabel-base")
    for name in args.tasks:
        pool, pool_labels, test_images, test_labels = task(name)
        test = data.from_images(test_images, test_labels, base.preprocess)
        everything = data.from_images(pool, pool_labels, base.preprocess)
        print(f"\n{name}: {len(test)} held-out test images; accuracy % (training seconds)")
        header = f"{'labels/class':>12} | " + " | ".join(f"{SHORT[s]:>14}" for s in [*FIXED, engine.AUTO])
        print(header + f" | {'AUTO chose':>10} | {'AUTO-best':>9} | {'FE speed-up':>11}")
        print("-" * (len(header) + 40))
        for per_class in args.per_class:
            index = torch.tensor(subset(pool_labels, per_class, args.seed))
            examples = everything.subset(index)
            cells, accuracy, seconds, chosen = [], {}, {}, ""
            for strategy in [*FIXED, engine.AUTO]:
                started = time.perf_counter()
                result = engine.train(base, examples, engine.TrainConfig(strategy=strategy, seed=args.seed))
                seconds[strategy] = time.perf_counter() - started
                accuracy[strategy] = test_accuracy(result, test) * 100
                cells.append(f"{accuracy[strategy]:6.1f} ({seconds[strategy]:5.1f})")
                if strategy == engine.AUTO:
                    chosen = SHORT[result.decision.chosen]
            best = max(accuracy[s] for s in FIXED)
            speed = seconds[engine.FULL_FINE_TUNE] / seconds[engine.FEATURE_EXTRACTION]
            label = "all" if per_class == 0 else str(per_class)
            row = f"{label:>12} | " + " | ".join(f"{c:>14}" for c in cells)
            print(f"{row} | {chosen:>10} | {accuracy[engine.AUTO] - best:>+9.1f} | {speed:>10.0f}x", flush=True)


if __name__ == "__main__":
    main()
