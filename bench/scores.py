#!/usr/bin/env python3
"""Top-k and uncertainty (the gateway's ``Scores.of``) against the full sort it replaced, one run.

    .venv/bin/python bench/scores.py

For every shape (images x classes: batch 1 and 64, the built-in base's 256 classes and ImageNet's
1,000) it checks that both give the same scores, margins and entropies, then prints the time per
call of each and their ratio. The gateway runs this on every Predict call, on its one CPU-bound
event loop: at saturation on a GPU its CPU per call is what caps throughput.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prelabel.gateway.predict import Scores


def full_sort(probs: npt.NDArray[np.float32], labels: list[str], k: int, threshold: float | None) -> Scores:
    """``Scores.of`` before 2026-12-05: two full sorts of every row and an object array of the labels."""
    order = np.argsort(-probs, axis=1)[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    best = probs.max(axis=1)
    second = np.sort(probs, axis=1)[:, -2] if probs.shape[1] > 1 else np.zeros(len(probs), np.float32)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1) / max(np.log(probs.shape[1]), 1e-12)
    return Scores(
        names=np.asarray(labels, dtype=object)[order].tolist(),
        scores=top.tolist(),
        entropy=np.clip(entropy, 0.0, 1.0).tolist(),
        margin=(best - second).tolist(),
        least_confidence=(1.0 - best).tolist(),
        accept=(best >= threshold).tolist() if threshold is not None else [False] * len(probs),
    )


def best_of(fn: Callable[..., Scores], probs: npt.NDArray[np.float32], labels: list[str]) -> float:
    return min(timeit.repeat(lambda: fn(probs, labels, 5, 0.9), number=100, repeat=7)) / 100


def main() -> None:
    rng = np.random.default_rng(0)
    print("| images x classes | full sort ms | Scores.of ms | ratio |\n|---|---|---|---|")
    for n, classes in ((1, 256), (1, 1000), (64, 256), (64, 1000)):
        probs = rng.dirichlet(np.full(classes, 0.1), n).astype(np.float32)
        labels = [f"class-{i}" for i in range(classes)]
        before, now = full_sort(probs, labels, 5, 0.9), Scores.of(probs, labels, 5, 0.9)
        assert before.scores == now.scores and before.margin == now.margin and before.accept == now.accept
        assert np.allclose(before.entropy, now.entropy, atol=1e-6)
        times = [best_of(fn, probs, labels) for fn in (full_sort, Scores.of)]
        print(f"| {n} x {classes} | {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | {times[0] / times[1]:.1f}x |")


if __name__ == "__main__":
    main()
