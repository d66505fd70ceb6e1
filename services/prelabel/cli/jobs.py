"""``prelabel finetune`` (upload a folder, run a job, follow it to the end) and ``prelabel jobs``."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from prelabel.cli.client import Credentials, batched, channel
from prelabel.cli.progress import StatusBar
from prelabel.datasets.folder import labelled_files
from prelabel.spec import full_name
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc

TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
UPLOAD_MESSAGE_BYTES = 3 * 1024 * 1024  # under every gateway's message limit (4 MiB at the least)
RECONNECT_FOR_S = 300.0  # a gateway restart is survived; a gateway gone this long is an error


def _upload(stub: rpc.DatasetServiceStub, dataset: str, files: list[tuple[Path, str]], quiet: bool) -> pb.Dataset:
    labels = {path: label for path, label in files}
    paths = [path for path, _ in files]
    with tqdm(total=len(paths), unit="img", desc="uploading", disable=quiet, file=sys.stderr) as bar:

        def requests() -> Iterator[pb.UploadExamplesRequest]:
            for batch in batched(paths, 256, UPLOAD_MESSAGE_BYTES):  # read lazily: any size in constant memory
                examples = [
                    pb.Example(image=pb.Image(id=str(p), content=p.read_bytes()), label=labels[p]) for p in batch
                ]
                yield pb.UploadExamplesRequest(dataset=dataset, examples=examples)
                bar.update(len(batch))

        response: pb.Dataset = stub.UploadExamples(requests())
        return response


def watch(stub: rpc.JobServiceStub, job: pb.Job, quiet: bool) -> pb.Job:
    """Follow ``job`` to a terminal state with a progress bar, reconnecting if the gateway restarts."""
    down_since: float | None = None
    with StatusBar(disable=quiet) as bar:
        while job.state not in TERMINAL:
            try:
                for update in stub.WatchJob(pb.WatchJobRequest(id=job.id)):
                    job, down_since = update, None
                    bar.show(pb.JobState.Name(job.state).lower(), job.message, job.progress)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > RECONNECT_FOR_S:
                    raise
                bar.show("reconnecting", "the gateway is unreachable; the job goes on", job.progress)
                time.sleep(1.0)
    return job


def finetune(server: str, creds: Credentials, args: argparse.Namespace) -> int:
    files = labelled_files(args.folder)
    dataset = args.dataset or args.name
    with channel(server, args.timeout, creds) as ch:
        info = _upload(rpc.DatasetServiceStub(ch), dataset, files, args.no_progress)
        counts = ", ".join(f"{c} {n}" for c, n in sorted(info.class_counts.items()))
        print(f"dataset {info.name!r}: {info.example_count} images ({counts})", file=sys.stderr)
        stub = rpc.JobServiceStub(ch)
        job = stub.CreateFineTuneJob(
            pb.CreateFineTuneJobRequest(
                dataset=dataset,
                base_model=args.base,
                output_model=args.name,
                strategy=pb.Strategy.Value(full_name(args.strategy)),
                freeze_first_k=args.freeze_first_k,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                target_precision=args.target_precision,
                request_id=uuid.uuid4().hex,
            ),
            timeout=args.timeout,
        )
        print(f"job {job.id} {pb.JobState.Name(job.state)}", file=sys.stderr)
        try:
            job = watch(stub, job, args.no_progress)
        except KeyboardInterrupt:
            print(f"\nstopped watching; job {job.id} goes on (`prelabel jobs` shows it, "
                  f"`prelabel jobs --cancel {job.id}` cancels it)", file=sys.stderr)  # fmt: skip
            return 130
    return _report(job)


def _report(job: pb.Job) -> int:
    state = pb.JobState.Name(job.state)
    if job.state != pb.SUCCEEDED:
        detail = job.error or job.message  # why it failed; how far a cancelled job got
        print(f"job {job.id} {state}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 1
    print(f"published {job.output_model} version {job.model_version}: {job.strategy_reason}")
    print(f"{job.message}; trained in {job.metrics['train_seconds']:.0f}s; attempts {job.attempts}")
    return 0


def jobs(server: str, creds: Credentials, args: argparse.Namespace) -> int:
    with channel(server, args.timeout, creds) as ch:
        stub = rpc.JobServiceStub(ch)
        if args.cancel:
            job = stub.CancelJob(pb.CancelJobRequest(id=args.cancel), timeout=args.timeout)
            print(f"job {job.id}: {pb.JobState.Name(job.state)} ({job.message or 'cancelled'})")
            return 0
        state: Any = pb.JobState.Value(args.state.upper()) if args.state else 0
        found: list[pb.Job] = []
        token = ""
        while len(found) < args.limit:
            page = stub.ListJobs(pb.ListJobsRequest(state=state, page_size=min(args.limit, 100), page_token=token),
                                 timeout=args.timeout)  # fmt: skip
            found.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
    print(f"{'ID':<32}  {'STATE':<9} {'PROGRESS':>8}  {'CREATED':<19}  {'MODEL':<28} DETAIL")
    for job in found[: args.limit]:
        created = datetime.fromtimestamp(job.created_at.seconds).strftime("%Y-%m-%d %H:%M:%S")
        model = job.output_model + (f" v{job.model_version}" if job.model_version else "")
        detail = job.error or job.message or job.strategy_reason
        detail = detail if len(detail) <= 100 else detail[:99] + "…"  # cut, and visibly so
        print(f"{job.id:<32}  {pb.JobState.Name(job.state):<9} {job.progress:>8.0%}  {created:<19}  "
              f"{model:<28} {detail}")  # fmt: skip
    return 0
