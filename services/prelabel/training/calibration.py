"""Calibrated confidence and the auto-accept threshold, both fitted on the validation split.

Temperature scaling (Guo et al., 2017) divides logits by one scalar T that minimises validation
negative log-likelihood. The auto-accept threshold is the lowest calibrated confidence at which
the images at or above it are labelled correctly at least ``target_precision`` of the time; the
share of images above it is the coverage that humans no longer need to review.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)
    loss_fn = torch.nn.CrossEntropyLoss()

    def closure() -> float:
        optimizer.zero_grad()
        loss = loss_fn(logits / log_t.exp(), labels)
        torch.autograd.backward(loss)
        return float(loss.detach())

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return float(log_t.detach().exp().clamp(0.05, 20.0))


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: no threshold reaches the target precision
    coverage: float
    precision: float


def threshold_for_precision(confidence: torch.Tensor, correct: torch.Tensor, target: float) -> Threshold:
    order = torch.argsort(confidence, descending=True)
    conf, hits = confidence[order], correct[order].float()
    precision = torch.cumsum(hits, 0) / torch.arange(1, len(hits) + 1)
    # Only cut where the confidence changes, so that every image at the threshold is counted.
    cut = torch.ones(len(conf), dtype=torch.bool)
    cut[:-1] = conf[:-1] != conf[1:]
    ok = torch.nonzero((precision >= target) & cut).flatten()
    if len(ok) == 0:
        return Threshold(None, 0.0, 0.0)
    last = int(ok[-1])
    return Threshold(float(conf[last]), (last + 1) / len(conf), float(precision[last]))
