"""The four transfer-learning strategies, and AUTO's rule for choosing among them.

The rule follows the four cases of transfer learning: the dataset's size (labelled examples per
class) against its similarity to the base model's pre-training data, *measured*
(training/similarity.py). Its boundaries were set on the tuning tasks of
``bench/label_efficiency.py`` only; the held-out tasks there check them. The engine then confirms
the rule's choice against feature extraction on out-of-fold predictions of the same examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# The names are defined once, with the job spec (prelabel/spec.py); re-exported for the engine.
from prelabel.spec import AUTO, FEATURE_EXTRACTION, FREEZE_FIRST_K, FROM_SCRATCH, FULL_FINE_TUNE, NAMES, STRATEGIES

__all__ = ["AUTO", "FEATURE_EXTRACTION", "FREEZE_FIRST_K", "FROM_SCRATCH", "FULL_FINE_TUNE", "NAMES", "STRATEGIES",
           "Decision", "decide", "paired_trial"]  # fmt: skip

# Below this many examples per class a dataset of similar images is "small" (feature extraction).
SMALL_PER_CLASS = 20
# Below this many examples per class a dataset of different images is too small to learn features
# from scratch. bench/label_efficiency.py, tuning tasks at 20 per class, all of low similarity to
# the built-in base: freezing the first stages was best or within 1.5 points of the best on each,
# training from scratch fell 7 points behind on one and to chance on another, full fine-tuning 6
# behind on one. From scratch wins with plenty of data (digits, about 150 per class).
SCRATCH_PER_CLASS = 100
# At or above this similarity the new images are "like" the pre-training data; one boundary per
# measure (training/similarity.py), since the two measures have different scales.
HIGH_SIMILARITY = {"frechet": 0.5, "confidence": 0.5}


@dataclass
class Decision:
    requested: str
    chosen: str
    reason: str
    examples: int
    per_class: float
    similarity: float
    measure: str = ""  # how similarity was measured: frechet | confidence
    freeze_first_k: int = 0
    trial: dict[str, float] = field(default_factory=dict)  # strategy name -> out-of-fold accuracy


def decide(
    requested: str, examples: int, classes: int, similarity: float, measure: str, n_stages: int,
    freeze_first_k: int,
) -> Decision:  # fmt: skip
    per_class = examples / classes
    k = freeze_first_k or n_stages // 2
    if requested != AUTO:
        reason = f"{NAMES[requested]}, as requested"
        return Decision(requested, requested, reason, examples, per_class, similarity, measure, k)
    high = similarity >= HIGH_SIMILARITY[measure]
    small = per_class < (SMALL_PER_CLASS if high else SCRATCH_PER_CLASS)
    if small and high:
        chosen, why = FEATURE_EXTRACTION, "few examples of similar images: a new head on the frozen backbone"
    elif small:
        chosen, why = FREEZE_FIRST_K, f"few examples of different images: keep the first {k} stages' generic features"
    elif high:
        chosen, why = FULL_FINE_TUNE, "many examples of similar images: adapt every layer from the pre-trained start"
    else:
        chosen, why = FROM_SCRATCH, "many examples of different images: learn features for them from scratch"
    measured = f"{measure} similarity {similarity:.2f}"
    reason = f"{examples} examples, {per_class:.0f} per class, {measured}: {NAMES[chosen]} ({why})"
    return Decision(requested, chosen, reason, examples, per_class, similarity, measure, k)


def paired_trial(decision: Decision, oof: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    """Cross-validated model selection: the strategy right on the most examples out of fold is published;
    a tie keeps the rule's choice (``decision.chosen``), then the earlier candidate in ``oof``.

    Every candidate predicted the same examples, each from models that never saw it (paired), so each
    challenger is reported by its paired difference from the rule's choice with its standard error.
    An earlier version kept the rule's choice unless feature extraction won by two paired standard
    errors (about 6 points at 160 examples); once feature extraction read every stage of the base,
    that margin kept the worse strategy on the photo tasks (docs/benchmarks.md).
    """
    rule = decision.chosen
    right = {s: (logits.argmax(1) == labels).float() for s, logits in oof.items()}
    decision.trial = {NAMES[s]: float(r.mean()) for s, r in right.items()}
    order = [rule, *(s for s in right if s != rule)]
    best = max(order, key=lambda s: float(right[s].sum()))  # max keeps the first of equals
    accuracies = ", ".join(f"{NAMES[s]} {decision.trial[NAMES[s]]:.1%}" for s in order)
    differences = "; ".join(f"{NAMES[s]} {_paired(right[s] - right[rule])}" for s in order[1:])
    tried = f"{accuracies} out of fold; difference from {NAMES[rule]}: {differences}"
    if best != rule:
        decision.reason += f"; the paired trial preferred {NAMES[best]} ({tried})"
        decision.chosen = best
    else:
        decision.reason += f"; confirmed by a paired trial ({tried})"


def _paired(diff: torch.Tensor) -> str:
    error = float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return f"{float(diff.mean()):+.1%} ± {error:.1%}"
