"""Publishing a training result: a new numbered version in the model repository, loaded by Triton.

Triton runs with explicit model control and keeps the newest ``PRELABEL_TRITON_LOADED_VERSIONS``
versions of each model loaded (``version_policy: latest``), so ``load_model`` adds the new version
while the previous one keeps answering, and unloads the one that falls out of the policy (Triton
lets its calls in flight finish): calls do not fail, ``Predict`` with an empty version moves to the
new one as soon as it is ready, and memory does not grow with every fine-tune (each loaded version
holds its own python stubs: about 420 MB on a CPU, 1.5 GB of GPU memory per instance on a GPU).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from prelabel.errors import PrelabelError
from prelabel.models.backbones import save_state
from prelabel.models.card import VersionCard
from prelabel.settings import Settings
from prelabel.training.engine import Base, TrainResult
from prelabel.triton.client import TritonClient
from prelabel.triton.repository import ModelRepository

log = logging.getLogger("prelabel.training")


def publish(repository: ModelRepository, name: str, result: TrainResult, base: Base, job_id: str = "") -> int:
    """Add ``result`` as the next version of ``name``; a job publishes once, however often it is retried."""
    if job_id and (done := published_by(repository, name, job_id)):
        log.info("job %s already published %s version %d; not publishing again", job_id, name, done)
        return done
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
        pooling=result.model.pooling,
        extra={"decision": dataclasses.asdict(result.decision), **({"job_id": job_id} if job_id else {})},
    )

    def write(folder: Path) -> None:
        save_state(compact(result.model.state_dict()), folder / "weights.pt")
        if result.reference is not None:
            np.savez_compressed(folder / "reference.npz", **result.reference)

    version = repository.add_version(name, card, write)
    log.info("published %s version %d (%s)", name, version, result.decision.reason)
    return version


def compact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 tensors that float16 holds exactly, stored as float16 (loading turns them back):
    lossless. A frozen backbone from the built-in base (stored in float16) is all of that, so a
    feature-extraction version's weights take 22 MB of disk instead of 45; trained weights stay float32."""

    def exact(t: torch.Tensor) -> bool:
        return t.dtype == torch.float32 and bool(torch.equal(t.half().float(), t))

    return {k: v.half() if exact(v) else v for k, v in state.items()}


def published_by(repository: ModelRepository, name: str, job_id: str) -> int | None:
    """The version of ``name`` that job ``job_id`` published, if it did."""
    for version in repository.versions(name):
        if repository.card(name, version).extra.get("job_id") == job_id:
            return version
    return None


def running_triton(settings: Settings) -> str:
    """The configured Triton, else the one a local ``prelabel serve`` runs on this data directory."""
    if settings.triton_url:
        return settings.triton_url
    url_file = settings.triton_url_file
    return url_file.read_text().strip() if url_file.is_file() else ""


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
