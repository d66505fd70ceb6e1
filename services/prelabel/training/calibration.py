"""Calibrated confidence, and an auto-accept threshold whose precision holds with stated confidence.

Temperature scaling (Guo et al., 2017) divides logits by one scalar T that minimises the negative
log-likelihood of out-of-fold predictions (every labelled example, predicted by a model that did
not train on it).

Auto-accept is a promise: "labels at or above this confidence are right at least ``target`` of the
time". Picking the lowest threshold whose *observed* precision reaches the target over-promises
(a few lucky confident images qualify). Instead, thresholds are tested in a fixed order from the
most confident down, as in Learn-then-Test (Angelopoulos et al., 2021): at each one, the one-sided
Clopper-Pearson lower bound on the precision of the images at or above it must reach the target at
confidence ``1 - delta``; the first that fails ends the search. Thresholds with too few images
above them for any bound to reach the target are passed over untested (that depends on the
confidences alone, not on which labels are right). Fixed-sequence testing needs no multiplicity
correction, so with probability at least ``1 - delta`` the chosen threshold's precision
on new images from the same distribution is at least the target. When no threshold passes, there
is no auto-accept, and :func:`labels_needed` estimates how many labels would change that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# The thresholds tested, most confident first; fixed in advance, as the guarantee requires.
GRID: tuple[float, ...] = tuple(float(x) for x in np.round(1 - np.geomspace(1e-4, 0.7, 60), 6))
DELTA = 0.05  # the guarantee holds with probability 1 - DELTA
ESTIMATE_FROM = 30  # labels_needed extrapolates only from thresholds with this many examples above


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


def lower_bound(successes: int, trials: int, delta: float = DELTA) -> float:
    """One-sided Clopper-Pearson lower bound: the p with P(Binomial(trials, p) >= successes) = delta."""
    if successes <= 0 or trials <= 0:
        return 0.0
    if successes >= trials:
        return float(delta ** (1 / trials))
    j = torch.arange(successes, trials + 1, dtype=torch.float64)
    log_choose = (
        torch.lgamma(torch.tensor(trials + 1.0, dtype=torch.float64))
        - torch.lgamma(j + 1)
        - torch.lgamma(trials - j + 1)
    )
    lo, hi = 0.0, successes / trials
    for _ in range(60):  # bisection: the upper tail grows with p
        p = (lo + hi) / 2
        tail = torch.logsumexp(log_choose + j * math.log(p) + (trials - j) * math.log1p(-p), 0)
        if float(tail) < math.log(delta):
            lo = p
        else:
            hi = p
    return lo


def min_trials(target: float, delta: float = DELTA) -> int:
    """The fewest images, all correct, whose lower bound reaches ``target``."""
    return math.ceil(math.log(delta) / math.log(target))


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: no threshold is certified; nothing is auto-accepted
    coverage: float  # share of the out-of-fold predictions at or above it
    precision: float  # observed precision of those
    bound: float  # the lower confidence bound on their precision (what is promised)
    examples: int  # out-of-fold predictions the decision rests on


def threshold_with_guarantee(
    confidence: torch.Tensor, correct: torch.Tensor, target: float, delta: float = DELTA
) -> Threshold:
    """The lowest grid threshold reached, testing from the most confident down, whose bound >= ``target``."""
    n = len(confidence)
    chosen = Threshold(None, 0.0, 0.0, 0.0, n)
    fewest = min_trials(target, delta)
    for value in GRID:
        above = confidence >= value
        trials = int(above.sum())
        if trials < fewest:
            continue  # untestable yet: even all-correct could not reach the target
        successes = int(correct[above].sum())
        bound = lower_bound(successes, trials, delta)
        if bound < target:
            break
        chosen = Threshold(value, trials / n, successes / trials, bound, n)
    return chosen


def labels_needed(confidence: torch.Tensor, correct: torch.Tensor, target: float, delta: float = DELTA) -> int | None:
    """Roughly how many labelled examples in all would certify some threshold, if accuracy stays as observed.

    For each grid threshold with at least ``ESTIMATE_FROM`` examples above it (fewer say nothing
    about its precision) whose observed precision beats the target, the smallest total N at which
    that many confident examples (its coverage times N) would bound the precision above the target;
    the least such N. None when no threshold's observed precision beats the target: more labels of
    the same kind would not help, a better model would.
    """
    n = len(confidence)
    best: int | None = None
    for value in GRID:
        above = confidence >= value
        trials = int(above.sum())
        if trials < ESTIMATE_FROM:
            continue
        precision, coverage = float(correct[above].float().mean()), trials / n
        if precision <= target:
            continue
        total = math.ceil(n * 1.25)  # at n itself the fixed sequence already stopped above this threshold
        while total < 1_000_000:
            m = max(1, round(coverage * total))
            if lower_bound(math.floor(precision * m), m, delta) >= target:
                best = total if best is None else min(best, total)
                break
            total = math.ceil(total * 1.25)
    return best
