"""Conversions between Prelabel's own types and the protobuf messages of ``protos/``: in one place.

Servicers and the transport-free core speak Python types; these functions are the only code that
builds ``Job``, ``Dataset`` and ``Model`` messages or reads enums from requests.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from prelabel.datasets.store import DatasetInfo
from prelabel.errors import InvalidArgument
from prelabel.models.card import VersionCard
from prelabel.queue.contract import Job
from prelabel.spec import AUTO
from prelabel.v1 import prelabel_pb2 as pb


def timestamp(seconds: float) -> Timestamp | None:
    """A protobuf timestamp; None (the field unset) for 0, "not yet"."""
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def enum_name(enum: Any, number: int, field: str) -> str:
    """The enum value's name, "" for 0 (unspecified); INVALID_ARGUMENT for a number the enum lacks."""
    try:
        return str(enum.Name(number)) if number else ""
    except ValueError:
        raise InvalidArgument(
            f"{field}={number} is not a known value; use one of {', '.join(enum.keys()[1:])}"
        ) from None


def job_to_pb(job: Job) -> pb.Job:
    spec, result = job.spec, job.result
    return pb.Job(
        id=job.id,
        state=pb.JobState.Value(job.state),
        progress=job.progress,
        message=job.message,
        dataset=spec.dataset,
        base_model=spec.base_model,
        output_model=spec.output_model,
        requested_strategy=pb.Strategy.Value(spec.strategy or AUTO),
        chosen_strategy=pb.Strategy.Value(result.get("chosen_strategy") or "STRATEGY_UNSPECIFIED"),
        strategy_reason=result.get("strategy_reason", ""),
        model_version=result.get("model_version", ""),
        metrics=job.metrics,
        error=job.error,
        attempts=job.attempts,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
    )


def dataset_to_pb(info: DatasetInfo) -> pb.Dataset:
    return pb.Dataset(
        name=info.name,
        example_count=info.example_count,
        class_counts=info.class_counts,
        created_at=timestamp(info.created_at),
        updated_at=timestamp(info.updated_at),
    )


def version_to_pb(number: int, card: VersionCard, ready: bool) -> pb.ModelVersion:
    return pb.ModelVersion(
        version=str(number),
        base_model=card.base_model,
        architecture=card.arch,
        strategy=card.strategy if card.strategy in pb.Strategy.DESCRIPTOR.values_by_name else None,
        strategy_reason=card.strategy_reason,
        labels=card.labels,
        metrics=card.metrics,
        ready=ready,
        created_at=timestamp(card.created_at),
    )
