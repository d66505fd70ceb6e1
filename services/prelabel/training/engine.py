"""The transfer-learning engine: :func:`train` orchestrates; each step lives in a module of its own.

| strategy             | backbone                         | trained                                  |
|----------------------|----------------------------------|------------------------------------------|
| feature extraction   | frozen; embeddings cached once   | a new linear head only                   |
| freeze first k       | first k stages frozen            | the other stages and a head              |
| full fine-tune       | every layer, pre-trained start   | all, the backbone at a lower rate        |
| from scratch         | a ResNet-18 from random weights  | all                                      |

1. One pass of the base model over the examples gives embeddings (feature extraction's cache) and
   the similarity to its pre-training data (training/similarity.py).
2. The rule (training/strategy.py) picks a strategy from size and similarity.
3. **Cross-fitting** (training/crossfit.py; the head's in training/head.py) of each candidate
   (feature extraction, the rule's choice, from scratch if asked: training/candidates.py): the
   examples are split into k stratified folds; each candidate strategy is trained k times, each time without one fold,
   and predicts that fold. Every labelled example thus gets an out-of-fold prediction. They choose
   the training length (training/loop.py), make AUTO's trial a paired comparison on the same
   examples (training/strategy.py), and calibrate confidence and the auto-accept threshold
   (training/calibration.py) on all labels instead of a 20 % split.
4. The chosen strategy is trained once more on every example, for the share of its budget the folds
   chose, its learning-rate schedule compressed to end there.

Progress across all these runs, and the checkpoint a killed job resumes from, are training/runs.py.
From scratch alone reads the images at their own resolution (up to 96 px; training/resolution.py),
decoded once more from the files; its version records that preprocessing in its card.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from prelabel.errors import InvalidArgument
from prelabel.models import backbones
from prelabel.models.base import reference_statistics
from prelabel.preprocessing import Preprocess
from prelabel.spec import DEFAULT_TARGET_PRECISION, check_scratch_trial
from prelabel.training import calibration, candidates, crossfit, data, head, loop, stages
from prelabel.training.loop import Stopped
from prelabel.training.runs import Checkpoint, Progress, ProgressCallback, Runs
from prelabel.training.similarity import confidence_similarity, similarity
from prelabel.training.strategy import (
    AUTO,
    FEATURE_EXTRACTION,
    FREEZE_FIRST_K,
    FROM_SCRATCH,
    FULL_FINE_TUNE,
    NAMES,
    STRATEGIES,
    Decision,
    decide,
    paired_trial,
)
from prelabel.triton.repository import ModelRepository

__all__ = ["AUTO", "FEATURE_EXTRACTION", "FREEZE_FIRST_K", "FROM_SCRATCH", "FULL_FINE_TUNE", "NAMES", "STRATEGIES",
           "Base", "Checkpoint", "Decision", "Progress", "Stopped", "TrainConfig", "TrainResult", "load_base",
           "train"]  # fmt: skip


@dataclass
class Base:
    """The model to start from: a version in the repository, with its reference statistics."""

    name: str
    version: int
    arch: str
    model: backbones.Classifier
    preprocess: Preprocess
    reference: dict[str, npt.NDArray[Any]] | None

    @property
    def family(self) -> str:
        return backbones.architecture(self.arch).family


def load_base(repository: ModelRepository, name: str, version: int | None = None) -> Base:
    versions = repository.versions(name)
    if not versions:
        raise InvalidArgument(f"base model {name!r} is not in the repository; models: {repository.models() or 'none'}")
    number = version or max(versions)
    card = repository.card(name, number)
    folder = repository.version_dir(name, number)
    model = backbones.build(card.arch, len(card.labels), card.preprocess.crop, card.pooling)
    backbones.load_state(model, folder / "weights.pt")
    reference = dict(np.load(folder / "reference.npz")) if (folder / "reference.npz").is_file() else None
    return Base(name, number, card.arch, model, card.preprocess, reference)


@dataclass
class TrainConfig:
    strategy: str = AUTO
    freeze_first_k: int = 0  # 0: half of the stages
    epochs: int = 0  # 0: the recipe's budget of steps (training/loop.py)
    learning_rate: float = 0.0  # the head's peak; 0: the strategy's default
    seed: int = 0
    folds: int = 3  # cross-fitting folds (fewer when a class has fewer examples)
    target_precision: float = DEFAULT_TARGET_PRECISION
    confidence: float = 1 - calibration.DELTA  # that auto-accept's precision holds
    device: str = "auto"
    trial: bool = True  # AUTO: confirm the rule's choice against feature extraction
    scratch_trial: str = "never"  # AUTO's trial also tries from scratch: never, gpu (when training on one), always


# Wider embeddings (a ResNet-50's stages: 3,840) would need a covariance of tens of MB per version; a
# version without reference statistics is measured by its own classifier's confidence instead. A
# ResNet-18's texture embedding (1,198 wide) keeps one: 2.9 MB in float16.
MAX_REFERENCE_DIM = 1280


@dataclass
class TrainResult:
    model: backbones.Classifier
    arch: str
    classes: list[str]
    preprocess: Preprocess
    decision: Decision
    metrics: dict[str, float]
    temperature: float
    threshold: float | None
    reference: dict[str, npt.NDArray[Any]] | None  # None for embeddings too wide to keep a covariance of
    summary: str  # one line for a person: accuracy, and what auto-accept promises or why it is off


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(
    base: Base,
    examples: data.Examples,
    config: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: Checkpoint | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    save_on_stop: Callable[[], bool] = lambda: True,
) -> TrainResult:
    """Adapt ``base`` to ``examples``; deterministic for a given seed on a given device and thread count.

    With a ``checkpoint``, a killed run resumes where it was; ``should_stop`` is asked throughout
    (between batches of every phase) and raises :class:`Stopped` when it answers True, after saving
    the run's state if ``save_on_stop`` answers True (a worker handing its job back: yes; a
    cancelled job: no, nothing will resume it).
    """
    config = config or TrainConfig()
    if config.strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown strategy {config.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not 0 < config.target_precision < 1:
        raise InvalidArgument(f"target_precision={config.target_precision} must be between 0 and 1")
    check_scratch_trial(config.scratch_trial, "scratch_trial")
    data.check(examples)
    torch.manual_seed(config.seed)
    device = _device(config.device)
    normalize = backbones.Normalizer(base.preprocess, device)
    n, n_classes = len(examples), len(examples.classes)
    folds = data.folds(examples.labels, config.folds, config.seed)
    key = f"{config.strategy}/{config.seed}/{config.epochs}/{config.learning_rate}/{len(folds)}/{n}/{base.name}"
    job = Runs(key, progress or (lambda p: None), checkpoint, should_stop, save_on_stop)

    # 1. The base's logits and embeddings: similarity, and feature extraction's cache, in one pass.
    # Feature extraction reads every stage of a ResNet (models/backbones.py), other bodies their output.
    base.model.to(device)
    fe_model = backbones.pooled_by_stage(base.model, base.family, len(examples.classes)) or base.model
    base_logits, embeddings, features = _base_pass(base.model, fe_model, examples.pixels, normalize, job.check)
    if base.reference is not None:
        measured, measure = similarity(embeddings.numpy(), base.reference), "frechet"
    else:
        measured, measure = confidence_similarity(base_logits.numpy()), "confidence"
    n_stages = len(stages.stages(base.model, base.family))
    decision = decide(config.strategy, n, n_classes, measured, measure, n_stages, config.freeze_first_k)
    if decision.chosen == FREEZE_FIRST_K and not 0 < decision.freeze_first_k <= n_stages:
        raise InvalidArgument(f"freeze_first_k={decision.freeze_first_k}: {base.arch} has {n_stages} stages")

    # 2. Cross-fitting: out-of-fold logits of feature extraction (cheap) and of each deep candidate.
    auto_trial = config.strategy == AUTO and config.trial
    deep = [] if decision.chosen == FEATURE_EXTRACTION else [decision.chosen]
    if auto_trial and FROM_SCRATCH not in deep and candidates.tries_scratch(config.scratch_trial, device):
        deep.append(FROM_SCRATCH)
    trial = {s: candidates.candidate(s, i, examples, base.preprocess, normalize, len(folds), config.epochs,
                                     config.learning_rate, job.check) for i, s in enumerate(deep)}  # fmt: skip
    planned_final = trial[decision.chosen].final.steps if decision.chosen in trial else 0  # the rule's choice's
    job.planned = sum(c.recipe.steps * len(folds) for c in trial.values()) + planned_final + 1
    oof: dict[str, torch.Tensor] = {}
    fe_setting = head.Setting()  # chosen below whenever feature extraction can be published
    if not deep or auto_trial:
        job.check()
        fe_oof, fe_setting = head.crossfit(features, examples.labels, folds, n_classes, config.seed,
                                           fe_model.statistics_dim)  # fmt: skip
        oof[FEATURE_EXTRACTION] = fe_oof
        job.report(NAMES[FEATURE_EXTRACTION], 1, 1, accuracy=_accuracy(fe_oof, examples.labels))

    def builder(c: candidates.Candidate) -> crossfit.Build:  # fresh models of one deep strategy
        return lambda: loop.strategy_model(base.model, base.arch, base.family, c.strategy, n_classes,
                                           decision.freeze_first_k, c.examples.pixels.shape[1])  # fmt: skip

    for c in trial.values():
        oof[c.strategy], c.best_step = crossfit.crossfit(builder(c), NAMES[c.strategy], c.examples, folds,
                                                         c.normalize, c.recipe, config.seed, job, c.prefix)  # fmt: skip

    # 3. AUTO's trial, paired on the same examples.
    if len(oof) > 1:
        paired_trial(decision, oof, examples.labels)

    # 4. The final model, on every example.
    chosen = decision.chosen
    preprocess = base.preprocess
    if chosen == FEATURE_EXTRACTION:
        model = copy.deepcopy(fe_model).cpu()
        model.head = head.fit(features, examples.labels, n_classes, fe_setting, config.seed)
        arch, steps_run = base.arch, 0
        final_embeddings = features
    else:
        c = trial[chosen]
        decision.reason += c.note
        # The folds' best share of their budget, the schedule compressed to end there: the learning rate
        # anneals to zero at the stop instead of being cut off mid-decay.
        shortened = loop.shortened(c.final, c.best_step / c.recipe.steps)
        job.planned += shortened.steps - planned_final  # the final run that runs, instead of the one planned
        arch, model, steps_run = crossfit.final_run(builder(c), NAMES[chosen], c.examples, c.normalize, shortened,
                                                    config.seed, job)  # fmt: skip
        final_embeddings = loop.predict(model, c.examples.pixels, c.normalize)[1]
        model = model.cpu().eval()
        preprocess = c.preprocess

    # 5. Calibration on the out-of-fold predictions.
    logits = oof[chosen]
    temperature = calibration.fit_temperature(logits, examples.labels)
    confidence, predicted = torch.softmax(logits / temperature, 1).max(1)
    correct = predicted == examples.labels
    threshold = calibration.threshold_with_guarantee(confidence, correct, config.target_precision,
                                                     1 - config.confidence)  # fmt: skip
    accuracy = _accuracy(logits, examples.labels)
    metrics = {
        "val_accuracy": accuracy,  # out-of-fold: every example predicted by a model that did not train on it
        "val_examples": float(n),
        "folds": float(len(folds)),
        "steps": float(steps_run),
        "epochs": steps_run / max(1, math.ceil(n / trial[chosen].final.batch_size)) if steps_run else 0.0,
        "train_seconds": time.monotonic() - job.started,
        "similarity": measured,
        "temperature": temperature,
        "target_precision": config.target_precision,
        "auto_accept_confidence": config.confidence,
        "auto_accept_coverage": threshold.coverage,
        "auto_accept_precision": threshold.precision,
        "auto_accept_precision_bound": threshold.bound,
    }
    if chosen == FEATURE_EXTRACTION:  # the head's setting, chosen out of fold (training/head.py)
        metrics["head_penalty"], metrics["head_emphasis"] = fe_setting.penalty, fe_setting.emphasis
    else:  # how much of its budget the folds chose: why a run was short or long
        metrics["budget_share"] = trial[chosen].best_step / trial[chosen].recipe.steps
    if threshold.value is None:
        needed = calibration.labels_needed(confidence, correct, config.target_precision, 1 - config.confidence)
        metrics["auto_accept_labels_needed"] = float(needed) if needed else math.nan
    if job.resumed_from:
        metrics["resumed_from_step"] = float(job.resumed_from)
    job.done = job.planned
    job.report("done", 1, 1, accuracy=accuracy)
    return TrainResult(
        model=model,
        arch=arch,
        classes=examples.classes,
        preprocess=preprocess,
        decision=decision,
        metrics=metrics,
        temperature=temperature,
        threshold=threshold.value,
        reference=reference_statistics(final_embeddings.numpy()) if model.embedding_dim <= MAX_REFERENCE_DIM else None,
        summary=_summary(accuracy, n, threshold, config, metrics.get("auto_accept_labels_needed")),
    )


def _base_pass(model: backbones.Classifier, fe_model: backbones.Classifier, pixels: torch.Tensor,
               normalize: backbones.Normalizer, check: Callable[[], None]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(base logits, base embeddings, feature-extraction features)`` from one pass over the images.

    Each pooling's embedding is a suffix of the richer ones (models/backbones.py), so the base's own
    embedding is the last columns of the features: its logits come from its head on those, not from a
    second pass."""
    if fe_model is model:
        logits, embeddings = loop.predict(model, pixels, normalize, check=check)
        return logits, embeddings, embeddings
    features = loop.predict(fe_model, pixels, normalize, check=check)[1]
    embeddings = features[:, -model.embedding_dim :]
    with torch.no_grad():
        logits = model.head(embeddings.to(next(model.head.parameters()).device)).cpu()
    return logits, embeddings, features


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def _summary(accuracy: float, n: int, threshold: calibration.Threshold, config: TrainConfig,
             needed: float | None) -> str:  # fmt: skip
    text = f"cross-validated accuracy {accuracy:.1%} on {n} examples; "
    if threshold.value is not None:
        return text + (
            f"auto-accept at confidence >= {threshold.value:.4g}: precision >= {config.target_precision:.0%} with "
            f"{config.confidence:.0%} confidence (lower bound {threshold.bound:.1%}), covering {threshold.coverage:.0%}"
        )
    more = (f"about {int(needed)} labelled examples in all, at this accuracy, would enable it"
            if needed and not math.isnan(needed) else "more labels alone will not enable it: the model is not yet "
            "accurate enough at any confidence")  # fmt: skip
    return text + (f"auto-accept is off: the evidence does not show {config.target_precision:.0%} precision with "
                   f"{config.confidence:.0%} confidence at any threshold; {more}")  # fmt: skip
