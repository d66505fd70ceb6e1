"""The GPU benchmark runs, small, on the CPU: device time is scarce, and a bench that rotted since its
last run wastes a whole lent session (it happened once: docs/benchmarks.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_bench_runs_end_to_end_on_the_cpu_and_prints_every_ratio():
    run = subprocess.run(
        [sys.executable, "bench/gpu.py", "--quick", "--device", "cpu", "--gateway-workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [
        "gateway / raw torch",
        "gateway / straight to Triton",
        "batch-1 p50 added by the gateway",
        "of which one bare grpc.aio hop",
        "of which Prelabel's own work",
        "Prelabel training / raw training",
    ]
    for row in rows:
        assert re.search(rf"\| {re.escape(row)}[^|]* \| [+-]?\d+\.\d+( ms)? \|", run.stdout), (row, run.stdout[-2000:])
    cpu = r"\| gateway process at saturation: CPU per call of \d+ / cores busy \| \d+\.\d ms / \d+\.\d\d \|"
    assert re.search(cpu, run.stdout), run.stdout[-2000:]
