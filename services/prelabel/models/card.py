"""What Prelabel knows about one model version, kept beside its weights as ``card.json``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from prelabel.preprocessing import Preprocess


@dataclass
class VersionCard:
    """What Prelabel knows about one model version (``card.json``)."""

    arch: str
    labels: list[str]
    preprocess: Preprocess
    base_model: str = ""
    strategy: str = ""
    strategy_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    # Temperature for calibrated probabilities and the auto-accept threshold on them (None: never).
    temperature: float = 1.0
    auto_accept_threshold: float | None = None
    pooling: str = "last"  # what the embedding is (models/backbones.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VersionCard:
        data = json.loads(text)
        data["preprocess"] = Preprocess.from_dict(data["preprocess"])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
