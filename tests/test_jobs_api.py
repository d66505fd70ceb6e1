"""Datasets and fine-tune jobs through the real gateway of `prelabel serve` (SQLite queue, its own
trainer process, the embedded Triton): end to end, status codes, cancel, pagination, the CLI."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
import uuid

import grpc
import pytest

from prelabel.datasets import shapes
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode, request
from tests.stack import PRELABEL, Stack

pytestmark = pytest.mark.stack
TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def examples(per_class: int, seed: int, classes: tuple[str, ...] = shapes.NOVEL_CLASSES) -> list[pb.Example]:
    images, labels = shapes.sample(per_class * len(classes), 64, seed, classes)
    return [
        pb.Example(image=pb.Image(id=f"{seed}-{i}", content=encode(im, "PNG")), label=classes[y])
        for i, (im, y) in enumerate(zip(images, labels, strict=True))
    ]


def upload(channel: grpc.Channel, dataset: str, items: list[pb.Example], per_message: int = 16) -> pb.Dataset:
    messages = [pb.UploadExamplesRequest(dataset=dataset, examples=items[i : i + per_message])
                for i in range(0, len(items), per_message)]  # fmt: skip
    response: pb.Dataset = rpc.DatasetServiceStub(channel).UploadExamples(iter(messages), timeout=60)
    return response


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def served_by_trainer(stack: Stack, sample: str, wait_s: float = 10) -> float:
    """A sample of ``serve``'s /metrics that its trainer writes (the trainer counts a job just after ending it)."""
    assert stack.metrics_url
    deadline = time.monotonic() + wait_s
    while True:
        text = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
        if values or time.monotonic() > deadline:
            assert values, f"{sample} is not in serve's /metrics:\n{text}"
            return values[0]
        time.sleep(0.2)


def watch_to_end(jobs: rpc.JobServiceStub, job_id: str, timeout: float = 240) -> list[pb.Job]:
    seen = list(jobs.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout))
    assert seen and seen[-1].state in TERMINAL
    return seen


def test_upload_fine_tune_watch_and_predict_with_the_new_version(stack, channel, predict_stub):
    items = examples(10, 1)
    dataset = upload(channel, "e2e-shapes", items)
    assert dataset.example_count == 60 and set(dataset.class_counts) == set(shapes.NOVEL_CLASSES)
    datasets = rpc.DatasetServiceStub(channel)
    assert datasets.GetDataset(pb.GetDatasetRequest(name="e2e-shapes")).example_count == 60
    assert "e2e-shapes" in [d.name for d in datasets.ListDatasets(pb.ListDatasetsRequest()).datasets]

    jobs = rpc.JobServiceStub(channel)
    create = pb.CreateFineTuneJobRequest(
        dataset="e2e-shapes", output_model="e2e-shapes", request_id=uuid.uuid4().hex, epochs=3
    )  # AUTO with a short budget: the path, not the recipe, is tested
    job = jobs.CreateFineTuneJob(create, timeout=30)
    assert job.state in (pb.QUEUED, pb.RUNNING) and job.requested_strategy == pb.STRATEGY_AUTO
    assert jobs.CreateFineTuneJob(create, timeout=30).id == job.id  # a retried call: the same job

    seen = watch_to_end(jobs, job.id)
    final = seen[-1]
    assert final.state == pb.SUCCEEDED, final.error
    assert pb.RUNNING in [j.state for j in seen]
    progress = [j.progress for j in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert final.model_version == "1" and final.chosen_strategy in (pb.STRATEGY_FEATURE_EXTRACTION,
                                                                    pb.STRATEGY_FREEZE_FIRST_K)  # fmt: skip
    assert "10 per class" in final.strategy_reason and "paired trial" in final.strategy_reason
    assert final.metrics["val_accuracy"] > 0.5 and final.message.startswith("cross-validated accuracy")
    assert final.attempts == 1 and final.finished_at.seconds >= final.started_at.seconds >= final.created_at.seconds
    assert jobs.GetJob(pb.GetJobRequest(id=job.id)) == final
    assert served_by_trainer(stack, 'prelabel_jobs_ended_total{state="SUCCEEDED"}') >= 1
    assert served_by_trainer(stack, "prelabel_publish_duration_seconds_count") >= 1

    images, labels = shapes.sample(36, 96, 2, shapes.NOVEL_CLASSES)
    response = predict_stub.Predict(
        request([(str(i), encode(im, "PNG")) for i, im in enumerate(images)], model="e2e-shapes"), timeout=60
    )
    assert response.version == "1"
    correct = sum(
        p.labels[0].name == shapes.NOVEL_CLASSES[y] for p, y in zip(response.predictions, labels, strict=True)
    )
    assert correct / len(labels) > 0.6  # the base model knows none of these classes


def test_dataset_requests_get_clear_status_codes(channel):
    datasets = rpc.DatasetServiceStub(channel)
    items = examples(1, 3)
    items[3].image.content = b"\x89PNG\r\n\x1a\n truncated"
    with pytest.raises(grpc.RpcError) as info:
        upload(channel, "bad-upload", items, per_message=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "example 3" in info.value.details()
    assert code_of(lambda: datasets.GetDataset(pb.GetDatasetRequest(name="bad-upload"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: upload(channel, "../etc", examples(1, 4))) == grpc.StatusCode.INVALID_ARGUMENT
    mixed = [pb.UploadExamplesRequest(dataset="a1", examples=examples(1, 5)[:1]),
             pb.UploadExamplesRequest(dataset="b2", examples=examples(1, 5)[1:2])]  # fmt: skip
    assert code_of(lambda: datasets.UploadExamples(iter(mixed))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: datasets.UploadExamples(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: datasets.GetDataset(pb.GetDatasetRequest(name="a1"))) == grpc.StatusCode.NOT_FOUND


def test_job_requests_get_clear_status_codes(channel):
    jobs = rpc.JobServiceStub(channel)
    upload(channel, "one-class", examples(4, 6, classes=("only",)))
    upload(channel, "codes", examples(3, 7))

    def create(**fields: object) -> grpc.StatusCode:
        return code_of(lambda: jobs.CreateFineTuneJob(
            pb.CreateFineTuneJobRequest(**{"dataset": "codes", "output_model": "codes", **fields})))  # fmt: skip

    assert create(dataset="missing") == grpc.StatusCode.NOT_FOUND
    assert create(dataset="one-class") == grpc.StatusCode.FAILED_PRECONDITION
    assert create(base_model="no-such-model") == grpc.StatusCode.NOT_FOUND
    assert create(output_model="") == grpc.StatusCode.INVALID_ARGUMENT
    assert create(output_model="../models") == grpc.StatusCode.INVALID_ARGUMENT
    assert create(epochs=-1) == grpc.StatusCode.INVALID_ARGUMENT
    assert create(strategy=42) == grpc.StatusCode.INVALID_ARGUMENT
    assert create(target_precision=1.5) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: jobs.GetJob(pb.GetJobRequest(id="../x"))) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = pb.GetJobRequest(id="0" * 32)
    assert code_of(lambda: jobs.GetJob(unknown)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(jobs.WatchJob(pb.WatchJobRequest(id="0" * 32)))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: jobs.ListJobs(pb.ListJobsRequest(page_token="x"))) == grpc.StatusCode.INVALID_ARGUMENT

    done = jobs.CreateFineTuneJob(pb.CreateFineTuneJobRequest(
        dataset="codes", output_model="codes", strategy=pb.STRATEGY_FEATURE_EXTRACTION))  # fmt: skip
    assert watch_to_end(jobs, done.id)[-1].state == pb.SUCCEEDED
    with pytest.raises(grpc.RpcError) as info:
        jobs.CancelJob(pb.CancelJobRequest(id=done.id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended SUCCEEDED" in info.value.details()


def test_cancel_a_running_and_a_queued_job_and_page_through_jobs(channel):
    jobs = rpc.JobServiceStub(channel)
    upload(channel, "cancel-me", examples(4, 8))
    long = pb.CreateFineTuneJobRequest(dataset="cancel-me", output_model="cancel-me",
                                       strategy=pb.STRATEGY_FROM_SCRATCH, epochs=500)  # fmt: skip
    running = jobs.CreateFineTuneJob(long)
    queued = jobs.CreateFineTuneJob(long)  # one trainer: this one waits behind the first
    for job in jobs.WatchJob(pb.WatchJobRequest(id=running.id), timeout=120):
        if "step" in job.message:
            break
    cancelled = jobs.CancelJob(pb.CancelJobRequest(id=queued.id))
    assert cancelled.state == pb.CANCELLED and not cancelled.HasField("started_at")
    assert cancelled.message == "cancelled before it started"

    asked = time.monotonic()
    assert jobs.CancelJob(pb.CancelJobRequest(id=running.id)).state == pb.RUNNING  # asked; stops at a heartbeat
    final = watch_to_end(jobs, running.id)[-1]
    assert final.state == pb.CANCELLED and time.monotonic() - asked < 10
    assert re.fullmatch(r"cancelled at \d+%", final.message), final.message  # not its last step's "about 90s left"
    assert jobs.GetJob(pb.GetJobRequest(id=queued.id)).attempts == 0  # it never started

    cancelled_ids, token = [], ""
    while True:
        page = jobs.ListJobs(pb.ListJobsRequest(state=pb.CANCELLED, page_size=1, page_token=token))
        assert len(page.jobs) <= 1 and all(j.state == pb.CANCELLED for j in page.jobs)
        cancelled_ids += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert cancelled_ids[:2] == [queued.id, running.id]  # newest first


def test_cli_finetune_shows_progress_and_prints_the_version(stack, tmp_path):
    folder = tmp_path / "labelled"
    images, labels = shapes.sample(8 * 3, 64, 9, shapes.NOVEL_CLASSES[:3])
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (folder / shapes.NOVEL_CLASSES[y]).mkdir(parents=True, exist_ok=True)
        im.save(folder / shapes.NOVEL_CLASSES[y] / f"{i}.png")
    cli = [PRELABEL, "finetune", str(folder), "--name", "cli-shapes", "--strategy", "feature_extraction",
           "--server", stack.address]  # fmt: skip
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dataset 'cli-shapes': 24 images" in done.stderr and "uploading" in done.stderr
    # the job's bar: its state, the percentage and what it is doing, e.g. "running:  60%|██████    | feature ..."
    assert re.search(r"succeeded: 100%\|[^|]+\| cross-validated accuracy", done.stderr), done.stderr[-500:]
    assert "published cli-shapes version 1" in done.stdout and "cross-validated accuracy" in done.stdout
    listed = subprocess.run([PRELABEL, "jobs", "--server", stack.address, "--state", "succeeded"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0 and "cli-shapes v1" in listed.stdout
    (row,) = [line for line in listed.stdout.splitlines() if "cli-shapes v1" in line]
    assert row.endswith("…") and len(row.split("cli-shapes v1", 1)[1].strip()) == 100  # the long message, cut visibly
    # `prelabel serve` started its trainer while gRPC calls were in flight: no gRPC fork-handler noise
    assert not [line for line in stack.process.stderr if "fork()" in line], "".join(stack.process.stderr[-20:])
