"""Cross-fitting a deep strategy: k runs, each without one fold, give every example an out-of-fold prediction.

The folds' mean held-out loss curve chooses the training length; the final run on every example
stops there (training/engine.py). Built models come from a ``Build`` so this module knows nothing of
strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from prelabel.models import backbones
from prelabel.training import data, loop
from prelabel.training.runs import Runs

# A fresh model to train: (the model, its frozen parameters, its architecture's name); loop.strategy_model.
Build = Callable[[], tuple[backbones.Classifier, list[torch.nn.Module], str]]
Report = Callable[..., None]  # Runs.run's report(step, loss, accuracy, speed, steps)


def crossfit(build: Build, stage: str, examples: data.Examples, folds: list[torch.Tensor],
             normalize: backbones.Normalizer, recipe: loop.Recipe, seed: int, job: Runs, prefix: str = ""
             ) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Out-of-fold logits of the model ``build`` makes, at the step where the folds' mean held-out loss is lowest;
    and that step. ``prefix`` names its runs apart from another strategy's in the job's checkpoint."""
    runs = []
    for i, held in enumerate(folds):
        name = f"{prefix}fold{i}"
        inside = torch.ones(len(examples), dtype=torch.bool)
        inside[held] = False
        train_set, held_out = examples.subset(torch.nonzero(inside).flatten()), examples.subset(held)

        def start(resume: dict[str, Any] | None, report: Report, seed: int = seed + i,
                  train_set: data.Examples = train_set, held_out: data.Examples = held_out, name: str = name
                  ) -> loop.Run:  # fmt: skip
            torch.manual_seed(seed)
            model, frozen, _ = build()
            return _fit(model, frozen, train_set, held_out, normalize, recipe, seed, job, name, resume, report)

        runs.append(job.run(name, f"{stage}, fold {i + 1} of {len(folds)}", start))
    # Runs that stopped early keep their last value for the evaluations they did not reach.
    length = max(len(r["losses"]) for r in runs)
    curves = torch.tensor([r["losses"] + [r["losses"][-1]] * (length - len(r["losses"])) for r in runs])
    sizes = torch.tensor([float(len(f)) for f in folds])
    skip = min(recipe.warmup_evals, length - 1)  # never a point within the warm-up (Recipe.warmup_evals)
    best = skip + int(torch.argmin((curves[:, skip:] * sizes[:, None]).sum(0)))
    oof = torch.zeros(len(examples), len(examples.classes))
    for r, held in zip(runs, folds, strict=True):
        oof[held] = r["logits"][min(best, len(r["logits"]) - 1)]
    return oof, recipe.eval_steps[best]


def final_run(
    build: Build,
    stage: str,
    examples: data.Examples,
    normalize: backbones.Normalizer,
    recipe: loop.Recipe,
    seed: int,
    job: Runs,
) -> tuple[str, backbones.Classifier, int]:
    """The model ``build`` makes, trained on every example: ``(its architecture, the model, steps run)``."""
    arch = ""

    def start(resume: dict[str, Any] | None, report: Report) -> loop.Run:
        nonlocal arch
        torch.manual_seed(seed)
        model, frozen, arch = build()
        return _fit(model, frozen, examples, None, normalize, recipe, seed, job, "final", resume, report)

    summary = job.run("final", f"{stage}, on every example", start, keep=False)
    model: backbones.Classifier = summary["model"]
    return arch, model, int(summary["steps_done"])


def _fit(model: backbones.Classifier, frozen: list[torch.nn.Module], train_set: data.Examples,
         held_out: data.Examples | None, normalize: backbones.Normalizer, recipe: loop.Recipe, seed: int, job: Runs,
         name: str, resume: dict[str, Any] | None, report: Report) -> loop.Run:  # fmt: skip
    """One run of the training loop, stoppable, saving its state in the job's checkpoint under ``name``."""
    return loop.fit(model, frozen, train_set, held_out, normalize, recipe, seed,
                    lambda s, loss, acc, speed: report(s, loss, acc, speed, recipe.steps), job.should_stop,
                    job.save_on_stop, resume=resume, save=job.save_current(name),
                    save_every_s=job.save_every_s)  # fmt: skip
