"""What a fine-tune job asks for: one typed spec, built once from the request, carried by the queue,
run by the trainer and shown by the job's protobuf view. Its defaults and the strategy names live
here and nowhere else (the engine, the CLI's choices and the gateway read them; a test checks that
the names are the ``Strategy`` enum of ``protos/``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from prelabel.errors import InvalidArgument

AUTO = "STRATEGY_AUTO"
FEATURE_EXTRACTION = "STRATEGY_FEATURE_EXTRACTION"
FREEZE_FIRST_K = "STRATEGY_FREEZE_FIRST_K"
FULL_FINE_TUNE = "STRATEGY_FULL_FINE_TUNE"
FROM_SCRATCH = "STRATEGY_FROM_SCRATCH"
STRATEGIES = (AUTO, FEATURE_EXTRACTION, FREEZE_FIRST_K, FULL_FINE_TUNE, FROM_SCRATCH)
NAMES = {  # for people: logs, reasons, progress
    FEATURE_EXTRACTION: "feature extraction",
    FREEZE_FIRST_K: "freeze the first k stages",
    FULL_FINE_TUNE: "full fine-tuning",
    FROM_SCRATCH: "training from scratch",
}

DEFAULT_TARGET_PRECISION = 0.95  # what auto-accept promises unless the request asks otherwise
# When AUTO's trial also cross-fits from scratch (PRELABEL_TRAINER_SCRATCH_TRIAL): never (the default),
# on a GPU, always.
SCRATCH_TRIAL = ("never", "gpu", "always")


def check_scratch_trial(value: str, name: str) -> None:
    """``value`` is one of :data:`SCRATCH_TRIAL`, or InvalidArgument naming ``name`` (the setting or field)."""
    if value not in SCRATCH_TRIAL:
        raise InvalidArgument(f"{name}={value!r}: choose one of {', '.join(SCRATCH_TRIAL)}")


def short_name(strategy: str) -> str:
    """``STRATEGY_FREEZE_FIRST_K`` -> ``freeze_first_k``: the CLI's spelling."""
    return strategy.removeprefix("STRATEGY_").lower()


def full_name(short: str) -> str:
    """``freeze_first_k`` (or the full name) -> ``STRATEGY_FREEZE_FIRST_K``."""
    name = short.upper()
    return name if name.startswith("STRATEGY_") else f"STRATEGY_{name}"


@dataclass(frozen=True)
class JobSpec:
    dataset: str
    output_model: str
    base_model: str
    base_version: int | None = None  # pinned when the job is created: a later version does not change it
    dataset_revision: int | None = None  # likewise: the examples as they were when the job was created
    strategy: str = AUTO
    freeze_first_k: int = 0  # 0: half of the stages
    epochs: int = 0  # 0: the strategy's budget of steps
    learning_rate: float = 0.0  # 0: the strategy's default
    target_precision: float = DEFAULT_TARGET_PRECISION
    seed: int = 0

    @property
    def description(self) -> str:
        return (f"dataset {self.dataset!r} -> model {self.output_model!r} from {self.base_model!r}, "
                f"{NAMES.get(self.strategy, 'automatic strategy')}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """From a stored job; unknown keys (a newer writer's) are ignored, missing ones take the defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["strategy"] = values.get("strategy") or AUTO
        values["target_precision"] = values.get("target_precision") or DEFAULT_TARGET_PRECISION
        return cls(**values)
