"""The committed gRPC code is exactly what protoc makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    committed = ROOT / "services"
    for rel in generated:
        assert (committed / rel).read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run scripts/generate_protos.py and commit the result"
        )


def test_every_design_rpc_is_declared():
    from prelabel.v1 import prelabel_pb2 as pb

    methods = {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert methods == {
        "Predict",
        "PredictStream",
        "ListModels",
        "GetModel",
        "UploadExamples",
        "GetDataset",
        "ListDatasets",
        "CreateFineTuneJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
    }
    assert set(pb.JobState.keys()) >= {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}
    assert set(pb.Strategy.keys()) >= {
        "STRATEGY_AUTO",
        "STRATEGY_FEATURE_EXTRACTION",
        "STRATEGY_FREEZE_FIRST_K",
        "STRATEGY_FULL_FINE_TUNE",
        "STRATEGY_FROM_SCRATCH",
    }
