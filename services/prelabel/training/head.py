"""Feature extraction: a linear head on the frozen backbone's cached embeddings.

The head is multinomial logistic regression on standardised embeddings (full batch, label
smoothing, L-BFGS), folded back into one ``nn.Linear`` on the raw embeddings. Its L2 penalty, the one
knob that matters with a few hundred examples, is chosen by the out-of-fold loss over the same
cross-fitting folds as everything else; seconds, since no image passes through the backbone again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PENALTIES = (1e-4, 1e-3, 1e-2, 3e-2)
STEPS = 100  # L-BFGS iterations at most


def fit(embeddings: torch.Tensor, labels: torch.Tensor, classes: int, penalty: float, seed: int,
        steps: int = STEPS) -> nn.Linear:  # fmt: skip
    torch.manual_seed(seed)
    mean, std = embeddings.mean(0), embeddings.std(0).clamp_min(1e-6)
    x = (embeddings - mean) / std
    head = nn.Linear(x.shape[1], classes)
    # Strongly convex (L2): full-batch L-BFGS converges in tens of evaluations.
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), labels, label_smoothing=0.1) + penalty * head.weight.pow(2).sum()
        torch.autograd.backward(loss)
        return float(loss.detach())

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    folded = nn.Linear(x.shape[1], classes)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - W m / s)
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight / std) @ mean)
    return folded


def crossfit(embeddings: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor], classes: int, seed: int
             ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Out-of-fold logits with the penalty whose out-of-fold loss is lowest, and that penalty."""
    best: tuple[float, torch.Tensor, float] | None = None
    for penalty in PENALTIES:
        oof = torch.zeros(len(labels), classes)
        for held in folds:
            inside = torch.ones(len(labels), dtype=torch.bool)
            inside[held] = False
            head = fit(embeddings[inside], labels[inside], classes, penalty, seed)
            with torch.no_grad():
                oof[held] = head(embeddings[held])
        loss = float(F.cross_entropy(oof, labels))
        if best is None or loss < best[0]:
            best = (loss, oof, penalty)
    assert best is not None
    return best[1], best[2]
