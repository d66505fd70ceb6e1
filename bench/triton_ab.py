#!/usr/bin/env python3
"""Two commits' Triton model served side by side, every call alternated between them (paired latencies).

    .venv/bin/python bench/triton_ab.py --old dc69ad6 --new HEAD   # BYTES wire (before issue 13) vs HEAD
    .venv/bin/python bench/triton_ab.py --old HEAD --new dc69ad6   # the same, started the other way round

Serving the two codes one after the other on this noisy machine measured order effects of 10-25 %;
here both run at once and each call goes to one then the other (order alternating), so that noise
hits both alike. Each commit is checked out in a temporary git worktree and served from a small
environment laid over ``.venv`` (its ``services/`` first on the path, Triton's stub included), the
two alike, so that only the code differs. The
client speaks each commit's wire format: BYTES ``IMAGE`` before issue 13, then ``IMAGES`` + ``SIZES``
as one batch row per request (65ab960..c62fb07), now one batch row per image.
``--old HEAD --new HEAD`` measures the harness's own bias (which server started first); swapping
``--old`` and ``--new`` cancels it: the true ratio is about the square root of one run's ratio over
the swapped run's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as tg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_vs_triton import images
from prelabel.triton.client import image_inputs
from tests.stack import Stack, wait_for_health

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = [tg.InferRequestedOutput(n) for n in ("PROBABILITIES", "ERROR_CODE", "ERROR_MESSAGE")]


def bytes_inputs(batch: list[bytes]) -> list[tg.InferInput]:
    data = np.empty((len(batch), 1), dtype=np.object_)
    data[:, 0] = batch
    tensor = tg.InferInput("IMAGE", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def environment_at(commit: str, folder: Path) -> str:
    """A python that imports Prelabel from ``commit`` and everything else from ``.venv``."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(folder / "src"), commit],
                   check=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "env")], check=True)
    python = folder / "env" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "zz-ab.pth").write_text(
        f"{folder / 'src' / 'services'}\nimport site; site.addsitedir({sysconfig.get_path('purelib')!r})\n"
    )
    return str(python)


PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


async def statistics_of(client: tg.InferenceServerClient) -> dict[str, float]:
    """Triton's cumulative per-model counters: requests, executions and nanoseconds in each phase."""
    stats = (await client.get_inference_statistics("prelabel-base", as_json=True))["model_stats"]
    totals = {"requests": 0.0, "executions": 0.0, **{p: 0.0 for p in PHASES}}
    for version in stats:
        inference = version.get("inference_stats", {})
        totals["requests"] += float(inference.get("success", {}).get("count", 0))
        totals["executions"] += float(version.get("execution_count", 0))
        for phase in PHASES:
            totals[phase] += float(inference.get(phase, {}).get("ns", 0))
    return totals


def where_time_went(batch: int, key: str, before: dict[str, float], after: dict[str, float]) -> str:
    """One row: per request, how many executions and how many ms in each of Triton's phases."""
    delta = {k: after[k] - before[k] for k in after}
    requests = max(delta["requests"], 1.0)
    phases = " | ".join(f"{delta[p] / requests / 1e6:.2f}" for p in PHASES)
    return f"| {batch} | {key} | {delta['requests']:.0f} | {delta['executions'] / requests:.2f} | {phases} |"


def one_row_inputs(batch: list[bytes]) -> list[tg.InferInput]:
    """The wire of commits 65ab960..c62fb07: IMAGES ``[1, total]`` and SIZES ``[1, n]``, one batch row per request."""
    flat = np.frombuffer(b"".join(batch), dtype=np.uint8).reshape(1, -1)
    sizes = np.array([[len(b) for b in batch]], dtype=np.int64)
    tensors = [tg.InferInput("IMAGES", list(flat.shape), "UINT8"), tg.InferInput("SIZES", list(sizes.shape), "INT64")]
    tensors[0].set_data_from_numpy(flat)
    tensors[1].set_data_from_numpy(sizes)
    return tensors


def wire_of(commit: str) -> Callable[[list[bytes]], list[tg.InferInput]]:
    """How ``commit``'s model takes images: BYTES (before issue 13), one row per request, or one row per image."""
    config = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:services/prelabel/triton/repository.py"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    if '"IMAGES"' not in config:
        return bytes_inputs
    return image_inputs if '"SIZES", data_type: TYPE_INT64, dims: [ 1 ]' in config else one_row_inputs


async def compare(urls: dict[str, str], plan: list[tuple[int, int]], make: dict[str, Callable[..., Any]]) -> None:
    clients = {k: tg.InferenceServerClient(u) for k, u in urls.items()}
    pool = images(64, 256)
    print("| batch | pairs | paired new/old latency: median (quartiles) | p50 old / new ms |\n|---|---|---|---|")
    breakdown = []
    for batch, calls in plan:
        latency: dict[str, list[float]] = {"old": [], "new": []}
        before = {k: await statistics_of(c) for k, c in clients.items()}
        for i in range(calls):
            chunk = pool[i % 8 : i % 8 + batch]
            for k in ("old", "new") if i % 2 == 0 else ("new", "old"):
                t = time.perf_counter()
                result = await clients[k].infer("prelabel-base", make[k](chunk), outputs=OUTPUTS)
                result.as_numpy("PROBABILITIES")
                latency[k].append(time.perf_counter() - t)
        ratios = sorted(n / o for o, n in zip(latency["old"][5:], latency["new"][5:], strict=True))
        q = [ratios[int(f * (len(ratios) - 1))] for f in (0.25, 0.5, 0.75)]
        old, new = (statistics.median(latency[k]) * 1000 for k in ("old", "new"))
        print(f"| {batch} | {len(ratios)} | {q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f}) | {old:.1f} / {new:.1f} |", flush=True)
        for k, c in clients.items():
            breakdown.append(where_time_went(batch, k, before[k], await statistics_of(c)))
    print("\nInside Triton, per request (ms):\n")
    print("| batch | code | requests | executions per request | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    print("\n".join(breakdown))
    for client in clients.values():
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="dc69ad6", help="the commit to compare with")
    parser.add_argument("--new", default="HEAD", help="the commit compared (commit your changes first)")
    parser.add_argument("--calls", type=int, nargs=3, default=[300, 120, 60], help="pairs at batch 1, 8, 32")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="prelabel-ab-"))
    try:
        old = Stack.serve(folder / "old", python=environment_at(args.old, folder / "old-code"))
        new = Stack.serve(folder / "new", python=environment_at(args.new, folder / "new-code"))
        try:
            wait_for_health(old.address)
            wait_for_health(new.address)
            plan = list(zip((1, 8, 32), args.calls, strict=True))
            wires = {"old": wire_of(args.old), "new": wire_of(args.new)}
            asyncio.run(compare({"old": old.triton_url, "new": new.triton_url}, plan, wires))
        finally:
            old.stop()
            new.stop()
    finally:
        for code in ("old-code", "new-code"):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder / code / "src")],
                           check=False)  # fmt: skip


if __name__ == "__main__":
    main()
