"""Label Studio's import format, for teams that pre-label offline: ``prelabel predict --format labelstudio``.

Each image becomes a task whose ``data`` points at the file (by default through Label Studio's local
files storage, ``/data/local-files/?d=PATH``) with one prediction: the top label, its score and the
model version. An image that could not be used becomes a task without a prediction, to label by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prelabel.v1 import prelabel_pb2 as pb


@dataclass(frozen=True)
class Names:
    from_name: str = "choice"  # the <Choices> tag
    to_name: str = "image"  # the <Image> tag
    data_key: str = "image"  # value="$image"
    url_prefix: str = "/data/local-files/?d="


def task(path: Path, response: pb.PredictResponse, p: pb.Prediction, names: Names) -> dict[str, Any]:
    out: dict[str, Any] = {"data": {names.data_key: f"{names.url_prefix}{path}"}}
    if p.HasField("error") or not p.labels:
        return out
    best = p.labels[0]
    score = round(float(best.score), 6)
    out["predictions"] = [{
        "model_version": f"{response.model}@{response.version}",
        "score": score,
        "result": [{"from_name": names.from_name, "to_name": names.to_name, "type": "choices",
                    "value": {"choices": [best.name]}, "score": score}],
    }]  # fmt: skip
    return out
