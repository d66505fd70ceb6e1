"""Feature extraction: a linear head on the frozen backbone's cached embeddings.

The head is multinomial logistic regression on standardised embeddings (full batch, label
smoothing, L-BFGS), folded back into one ``nn.Linear`` on the raw embeddings. Two knobs matter with a
few hundred examples, and both are chosen by the out-of-fold loss over the same cross-fitting folds
as everything else (seconds: no image passes through the backbone again):

- the L2 penalty;
- the *emphasis* on the embedding's leading columns, the input's own colour and grey-level
  statistics (``texture`` pooling, models/backbones.py): scaling a standardised column by ``w``
  divides its penalty by ``w**2``, so a handful of colour statistics are not shrunk as hard as a
  thousand backbone features. Chosen on the tuning tasks (docs/benchmarks.md): +1.0 to +1.5 points
  on the three colour tasks, no change elsewhere; the fold loss picks 1 where colour is no signal.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PENALTIES = (1e-4, 1e-3, 1e-2, 3e-2)
EMPHASES = (1.0, 2.0, 4.0)
STEPS = 100  # L-BFGS iterations at most
HISTORY = 10  # L-BFGS curvature pairs kept
SMOOTHING = 0.1  # label smoothing


@dataclass(frozen=True)
class Setting:
    """The head's L2 penalty, and the weight of the ``leading`` columns relative to the others."""

    penalty: float = PENALTIES[1]
    emphasis: float = 1.0
    leading: int = 0

    def scale(self, width: int) -> torch.Tensor:
        scale = torch.ones(width)
        scale[: self.leading] = self.emphasis
        return scale


def fit(embeddings: torch.Tensor, labels: torch.Tensor, classes: int, setting: Setting, seed: int,
        steps: int = STEPS) -> nn.Linear:  # fmt: skip
    torch.manual_seed(seed)
    mean, std = embeddings.mean(0), embeddings.std(0).clamp_min(1e-6)
    scale = std / setting.scale(embeddings.shape[1])  # x = (embedding - mean) / scale
    x = (embeddings - mean) / scale
    head = nn.Linear(x.shape[1], classes)
    weight, bias = head.weight, head.bias
    target = smoothed(labels, classes)
    # Strongly convex (L2): full-batch L-BFGS converges in tens of evaluations. A short history (scipy's
    # default) and the gradient in closed form instead of autograd: at this size the optimiser's and
    # autograd's bookkeeping, not the arithmetic, took the time (2.5x faster, accuracy within noise:
    # bench/head_fit.py, docs/benchmarks.md).
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=HISTORY,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> float:
        loss, weight.grad, bias.grad = objective(weight, bias, x, target, setting.penalty)
        return float(loss)

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    folded = nn.Linear(x.shape[1], classes)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - W m / s)
        folded.weight.copy_(weight / scale)
        folded.bias.copy_(bias - (weight / scale) @ mean)
    return folded


def smoothed(labels: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot rows with label smoothing, as ``F.cross_entropy(label_smoothing=SMOOTHING)`` applies it."""
    target = torch.full((len(labels), classes), SMOOTHING / classes, dtype=dtype)
    target[torch.arange(len(labels)), labels] += 1 - SMOOTHING
    return target


@torch.no_grad()
def objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, target: torch.Tensor, penalty: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cross-entropy against ``target`` (smoothed one-hot rows) plus the L2 penalty, and its gradients."""
    log_p = torch.addmm(bias, x, weight.t()).log_softmax(1)
    loss = -(target * log_p).sum() / len(x) + penalty * weight.pow(2).sum()
    residual = (log_p.exp() - target) / len(x)  # the loss's gradient with respect to the logits
    return loss, torch.addmm(weight, residual.t(), x, beta=2 * penalty), residual.sum(0)


def crossfit(embeddings: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor], classes: int, seed: int,
             leading: int = 0) -> tuple[torch.Tensor, Setting]:  # fmt: skip
    """Out-of-fold logits of the setting whose out-of-fold loss is lowest, and that setting.

    ``leading``: how many first columns are the input's statistics (they get an emphasis of their own).
    """
    best: tuple[float, torch.Tensor, Setting] | None = None
    emphases = EMPHASES if leading else (1.0,)
    for penalty, emphasis in itertools.product(PENALTIES, emphases):
        setting = Setting(penalty, emphasis, leading)
        oof = torch.zeros(len(labels), classes)
        for held in folds:
            inside = torch.ones(len(labels), dtype=torch.bool)
            inside[held] = False
            head = fit(embeddings[inside], labels[inside], classes, setting, seed)
            with torch.no_grad():
                oof[held] = head(embeddings[held])
        loss = float(F.cross_entropy(oof, labels))
        if best is None or loss < best[0]:
            best = (loss, oof, setting)
    assert best is not None
    return best[1], best[2]
