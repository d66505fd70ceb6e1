"""Publishing a training result: a new numbered version in the model repository, loaded by Triton.

Triton runs with explicit model control and ``version_policy: all``, so ``load_model`` adds the new
version while the old ones keep answering: calls in flight do not fail, and ``Predict`` with an
empty version moves to the new one as soon as it is ready.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from prelabel.errors import PrelabelError
from prelabel.training.engine import Base, TrainResult
from prelabel.triton.client import TritonClient
from prelabel.triton.repository import ModelRepository, VersionCard

log = logging.getLogger("prelabel.training")


def publish(repository: ModelRepository, name: str, result: TrainResult, base: Base) -> int:
    card = VersionCard(
        arch=result.arch,
        labels=result.classes,
        preprocess=result.preprocess,
        base_model=f"{base.name}/{base.version}",
        strategy=result.decision.chosen,
        strategy_reason=result.decision.reason,
        metrics=result.metrics,
        temperature=result.temperature,
        auto_accept_threshold=result.threshold,
        extra={"decision": dataclasses.asdict(result.decision)},
    )

    def write(folder: Path) -> None:
        torch.save(result.model.state_dict(), folder / "weights.pt")
        np.savez_compressed(folder / "reference.npz", **result.reference)

    version = repository.add_version(name, card, write)
    log.info("published %s version %d (%s)", name, version, result.decision.reason)
    return version


async def load_into_triton(url: str, name: str, timeout_s: float = 300.0) -> bool:
    """Ask Triton to load every version of ``name``; False (and a log line) if it is unreachable."""
    client = TritonClient(url)
    try:
        await client.load_model(name, timeout_s)
        return True
    except PrelabelError as exc:
        log.warning("%s; Triton loads the new version when it next starts", exc.message)
        return False
    finally:
        await client.close()
