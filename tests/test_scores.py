"""Top-k, uncertainty and auto-accept computed from probabilities (the gateway's post-processing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prelabel.gateway.predict import Scores


def test_top_k_uncertainty_and_auto_accept():
    probs = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]], np.float32)
    s = Scores.of(probs, ["cat", "dog", "fox"], k=2, threshold=0.65)
    assert s.names[0] == ["cat", "dog"] and s.names[2][0] == "fox"
    assert s.scores[0] == pytest.approx([0.7, 0.2])
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert s.entropy == pytest.approx([expected, 1.0, 0.0], abs=1e-5)
    assert s.margin == pytest.approx([0.5, 0.0, 1.0], abs=1e-6)
    assert s.least_confidence == pytest.approx([0.3, 2 / 3, 0.0], abs=1e-6)
    assert s.accept == [True, False, True]


def test_no_threshold_never_accepts_and_empty_batches_work():
    assert Scores.of(np.array([[1.0, 0.0]], np.float32), ["a", "b"], 1, None).accept == [False]
    empty = Scores.of(np.zeros((0, 4), np.float32), list("abcd"), 3, 0.5)
    assert empty.names == [] and empty.entropy == [] and empty.accept == []


def test_top_k_matches_a_plain_sort_on_many_shapes_with_ties_broken_by_the_lower_index():
    rng = np.random.default_rng(3)
    for classes, k in [(1, 1), (2, 1), (2, 2), (7, 3), (256, 1), (256, 5), (1000, 5), (1000, 100)]:
        probs = rng.dirichlet(np.full(classes, 0.2), 9).astype(np.float32)
        probs[0] = 1.0 / classes  # a row of ties
        probs[1, : min(3, classes)] = probs[1].max()  # ties at the top
        labels = [f"c{i}" for i in range(classes)]
        s = Scores.of(probs, labels, k, threshold=0.5)
        for row, names, scores, margin in zip(probs, s.names, s.scores, s.margin, strict=True):
            ranked = sorted(range(classes), key=lambda i: (-row[i], i))  # stable: the lower index first
            assert names == [labels[i] for i in ranked[:k]] and scores == [float(row[i]) for i in ranked[:k]]
            second = float(row[ranked[1]]) if classes > 1 else 0.0
            assert margin == pytest.approx(float(row[ranked[0]]) - second, abs=1e-7)
