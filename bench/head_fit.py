#!/usr/bin/env python3
"""Feature extraction's head fit: Prelabel's (closed-form gradient, 10-pair L-BFGS history) against
the earlier autograd fit with a 100-pair history, side by side on the same cached features.

    .venv/bin/python bench/head_fit.py [--tasks digits china-grey flower-colour hopper-colour] [--seeds 0 1]

Per task and seed: the built-in base's features for the seeded 20-per-class subset that
bench/label_efficiency.py trains on, and its test set (digits: also 80 per class, 800 labelled
examples, what the auto-accept test in tests/test_training.py fits 20 times); then the
cross-fitted search over penalties and emphases and the final fit (training/head.py), timed, with
the chosen setting, the out-of-fold loss and the published head's test accuracy.
Prints one markdown table and the ratio of total times. About 3 minutes here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import label_efficiency as le
from prelabel.models import backbones
from prelabel.training import data, engine, head, loop
from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import ModelRepository

Fit = Callable[..., nn.Linear]


def autograd_fit(embeddings: torch.Tensor, labels: torch.Tensor, classes: int, setting: head.Setting, seed: int,
                 steps: int = head.STEPS) -> nn.Linear:  # fmt: skip
    """The fit before 2026-12-04: autograd through F.cross_entropy, L-BFGS's default 100-pair history."""
    torch.manual_seed(seed)
    mean, std = embeddings.mean(0), embeddings.std(0).clamp_min(1e-6)
    scale = std / setting.scale(embeddings.shape[1])
    x = (embeddings - mean) / scale
    linear = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), labels, label_smoothing=head.SMOOTHING)
        loss = loss + setting.penalty * linear.weight.pow(2).sum()
        torch.autograd.backward(loss)
        return float(loss.detach())

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    folded = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / scale)
        folded.bias.copy_(linear.bias - (linear.weight / scale) @ mean)
    return folded


def cases(base: engine.Base, tasks: list[str], seeds: list[int]):  # type: ignore[no-untyped-def]
    """(name, seed, train features, labels, test features, test labels, leading statistics columns)."""
    normalize = backbones.Normalizer(base.preprocess, torch.device("cpu"))
    for name in tasks:
        for seed in seeds:
            for per_class in [20, 80] if name == "digits" else [20]:
                pool, y, test, ty, _ = le.task(name, per_class + 10, seed)  # the subsets label_efficiency.py uses
                chosen = le.subset(y, per_class, seed)
                train = data.from_images([pool[i] for i in chosen], [y[i] for i in chosen], base.preprocess)
                held = data.from_images(test, ty, base.preprocess)
                fe = backbones.pooled_by_stage(base.model, base.family, len(train.classes))
                assert fe is not None
                x, x_test = (loop.predict(fe, e.pixels, normalize)[1] for e in (train, held))
                y_test = torch.tensor([train.classes.index(held.classes[int(t)]) for t in held.labels])
                yield f"{name} {per_class}/class", seed, x, train.labels, x_test, y_test, fe.statistics_dim


def measure(fit: Fit, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, seed: int,
            leading: int) -> tuple[float, head.Setting, float, float]:  # fmt: skip
    classes = int(y.max()) + 1
    head.fit = fit  # crossfit calls it by this name
    start = time.perf_counter()
    oof, setting = head.crossfit(x, y, data.folds(y, 3, seed), classes, seed, leading)
    final = fit(x, y, classes, setting, seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((final(x_test).argmax(1) == y_test).float().mean())
    return seconds, setting, float(F.cross_entropy(oof, y)), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "china-grey", "flower-colour", "hopper-colour"],
                        choices=le.TASKS)  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    repo = ModelRepository(Path(tempfile.mkdtemp(prefix="prelabel-bench-")) / "models")
    ensure_default_model(repo, "prelabel-base", "builtin")
    base = engine.load_base(repo, "prelabel-base")
    fits: dict[str, Fit] = {"autograd, history 100": autograd_fit, "Prelabel": head.fit}
    totals = dict.fromkeys(fits, 0.0)
    print("| task | seed | fit | seconds | penalty | emphasis | out-of-fold loss | test accuracy % |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, seed, x, y, x_test, y_test, leading in cases(base, args.tasks, args.seeds):
        for label, fit in fits.items():
            seconds, setting, loss, accuracy = measure(fit, x, y, x_test, y_test, seed, leading)
            totals[label] += seconds
            print(f"| {name} | {seed} | {label} | {seconds:.2f} | {setting.penalty:g} | {setting.emphasis:g} | "
                  f"{loss:.4f} | {100 * accuracy:.1f} |", flush=True)  # fmt: skip
    old, new = totals.values()
    print(f"\ntotal: {old:.1f} s against {new:.1f} s, {old / new:.2f}x faster")


if __name__ == "__main__":
    main()
