"""The deep strategies an AUTO job cross-fits, each with the images it reads and its recipes.

The rule's choice is always one; from scratch joins AUTO's trial when ``TrainConfig.scratch_trial``
says so (training/engine.py). From scratch reads the images at their own resolution
(training/resolution.py), decoded once more, so each candidate carries its own images and
normalisation, and its runs' names in the job's checkpoint are kept apart from another's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prelabel.models import backbones
from prelabel.preprocessing import Preprocess
from prelabel.spec import FROM_SCRATCH, short_name
from prelabel.training import data, loop, resolution


@dataclass
class Candidate:
    """A deep strategy to cross-fit: the images it reads, its recipes, and the step its folds chose."""

    strategy: str
    examples: data.Examples
    normalize: backbones.Normalizer
    preprocess: Preprocess
    recipe: loop.Recipe  # a fold's
    final: loop.Recipe  # on every example
    prefix: str  # of its runs' names in the checkpoint
    note: str = ""  # for the reason, should it be published
    best_step: int = 0


def candidate(strategy: str, index: int, examples: data.Examples, base: Preprocess, normalize: backbones.Normalizer,
              folds: int, epochs: int, learning_rate: float, check: Callable[[], None]) -> Candidate:  # fmt: skip
    """``strategy``'s candidate; ``index`` 0 (the rule's choice) keeps the plain run names ``fold0``..."""
    n = len(examples)
    fold, final = (loop.recipe(strategy, size, epochs, learning_rate) for size in (n - n // folds, n))
    c = Candidate(strategy, examples, normalize, base, fold, final, "" if index == 0 else f"{short_name(strategy)}-")
    if strategy == FROM_SCRATCH and examples.source is not None:
        c.preprocess = resolution.scratch_preprocess(base, examples.source.short_sides())
        if c.preprocess != base:
            c.examples = examples.decoded(c.preprocess, check)
            c.normalize = backbones.Normalizer(c.preprocess, normalize.device)
            c.note = (f"; from scratch at {c.preprocess.crop} px, the images' own resolution "
                      f"(the base reads {base.crop} px)")  # fmt: skip
    return c


def tries_scratch(setting: str, device: torch.device) -> bool:
    """Whether AUTO's trial also cross-fits from scratch (``TrainConfig.scratch_trial``).

    From scratch can be the most accurate strategy on colour photos even at 20 labels per class, but its
    folds cost 2-3 minutes on 2 CPU cores, more than the rest of an AUTO job, and in the one measured
    run the trial's pick of it published a model less accurate than feature extraction's
    (docs/benchmarks.md): so it is opt-in until measured over seeds."""
    return setting == "always" or (setting == "gpu" and device.type == "cuda")
