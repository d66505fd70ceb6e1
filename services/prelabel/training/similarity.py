"""How similar new images are to a model's pre-training data, measured on the backbone's embeddings.

A Fréchet distance between Gaussian fits of the two embedding sets (as in FID), normalised by their
total variance so that it does not depend on the backbone's feature scale, and mapped to [0, 1]:
1 means the same distribution, 0 means as far apart as the two sets are wide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def frechet(mean1: npt.NDArray[Any], cov1: npt.NDArray[Any], mean2: npt.NDArray[Any], cov2: npt.NDArray[Any]) -> float:
    """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2), with the trace of the root from eigenvalues."""
    c1, c2 = cov1.astype(np.float64), cov2.astype(np.float64)
    eig = np.linalg.eigvals(c1 @ c2)
    root_trace = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    diff = mean1.astype(np.float64) - mean2.astype(np.float64)
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * root_trace)


def similarity(embeddings: npt.NDArray[Any], reference: dict[str, npt.NDArray[Any]]) -> float:
    """Similarity in [0, 1] of ``embeddings`` [N, D] to reference statistics (``mean``, ``cov``)."""
    x = embeddings.astype(np.float64)
    mean, cov = x.mean(axis=0), np.cov(x, rowvar=False)
    ref_mean, ref_cov = reference["mean"].astype(np.float64), reference["cov"].astype(np.float64)
    distance = frechet(mean, cov, ref_mean, ref_cov)
    scale = float(np.trace(cov) + np.trace(ref_cov))
    return float(np.clip(1.0 - distance / max(scale, 1e-12), 0.0, 1.0))
