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
