"""How similar new images are to a model's pre-training data: from its embeddings, or from its own classifier.

With reference statistics of the pre-training data (``reference.npz``, stored with a version):
a Fréchet distance between Gaussian fits of the two embedding sets (as in FID), normalised by
their total variance so that it does not depend on the backbone's feature scale, and mapped to
[0, 1]: 1 means the same distribution, 0 means as far apart as the two sets are wide. Without
them (ImageNet weights from a file, say): :func:`confidence_similarity`.
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
    """Similarity in [0, 1] of ``embeddings`` [N, D] to reference statistics (``mean``, ``cov``).

    With fewer images than dimensions (the usual case) the new covariance is X^T X / (N - 1) for
    the centred embeddings X, and Tr((C_ref C)^1/2) is the sum of the square roots of the
    eigenvalues of the small symmetric N x N matrix X C_ref X^T / (N - 1): exact, and milliseconds
    instead of an eigendecomposition of a D x D product.
    """
    x = embeddings.astype(np.float64)
    n = len(x)
    mean = x.mean(axis=0)
    ref_mean, ref_cov = reference["mean"].astype(np.float64), reference["cov"].astype(np.float64)
    if n > x.shape[1]:
        cov = np.cov(x, rowvar=False)
        distance, trace_new = frechet(mean, cov, ref_mean, ref_cov), float(np.trace(cov))
    else:
        centred = x - mean
        gram = centred @ ref_cov @ centred.T / (n - 1)
        root_trace = float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum())
        trace_new = float(np.sum(centred * centred)) / (n - 1)
        diff = mean - ref_mean
        distance = float(diff @ diff) + trace_new + float(np.trace(ref_cov)) - 2.0 * root_trace
    scale = trace_new + float(np.trace(ref_cov))
    return float(np.clip(1.0 - distance / max(scale, 1e-12), 0.0, 1.0))


def confidence_similarity(logits: npt.NDArray[Any]) -> float:
    """Similarity in [0, 1] from the base model's own classifier, for bases without reference statistics.

    An out-of-distribution score (as in Hendrycks and Gimpel's maximum softmax probability, here
    the entropy of the whole prediction): on images like its pre-training data a classifier is
    confident, on foreign ones its predictions spread out. 1 minus the mean entropy of the
    softmax, as a share of the largest possible (log of the number of classes), so that bases
    with 10 or 1,000 classes are on one scale. Needs nothing but the base's head, which every
    version keeps (ImageNet weights from a file included).
    """
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return float(np.clip(1.0 - entropy.mean() / np.log(logits.shape[1]), 0.0, 1.0))
