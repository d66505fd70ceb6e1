"""Crashes and faults with real processes on both queue backends (a SQLite file, a real redis-server):
kill -9 of trainers mid-training, two trainers on one queue, a gateway restart, a Redis restart."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prelabel.datasets import shapes
from prelabel.datasets.store import dataset_store
from prelabel.queue import open_queue
from prelabel.queue.contract import RUNNING, SUCCEEDED, TERMINAL, Job, JobQueue
from prelabel.settings import Settings
from prelabel.spec import JobSpec
from prelabel.training import engine
from prelabel.training.publish import published_by
from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import repository_for
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode, request
from tests.stack import PRELABEL, Process, RedisServer, Stack, environment, free_port, wait_for_health

pytestmark = pytest.mark.stack
DONE = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)  # terminal states on the wire
RESTART_EPOCHS = 15  # from scratch on 24 images: about 60 steps, long enough to restart a gateway mid-job


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url = f"{request.getfixturevalue('redis_server').url}/{abs(hash(request.node.name)) % 15 + 1}"
    open_queue(url).redis.flushdb()  # type: ignore[attr-defined]
    return url


def labelled(per_class: int, seed: int) -> list[pb.Example]:
    classes = shapes.NOVEL_CLASSES[:3]
    images, labels = shapes.sample(per_class * len(classes), 64, seed, classes)
    return [pb.Example(image=pb.Image(id=str(i), content=encode(im, "PNG")), label=classes[y])
            for i, (im, y) in enumerate(zip(images, labels, strict=True))]  # fmt: skip


def prepare(data_dir: Path, dataset: str) -> None:
    """A data directory with the default model and a small dataset, as a gateway would leave it."""
    settings = Settings(data_dir=data_dir)
    ensure_default_model(repository_for(settings), settings.default_model, "builtin")
    upload = dataset_store(settings).upload(dataset)
    upload.add([(e.image.id, e.image.content, e.label) for e in labelled(8, 3)])
    upload.commit()


def trainer(data_dir: Path, queue_url: str, **settings: object) -> Process:
    options = {"queue_url": queue_url, "job_lease_s": 2, "trainer_poll_s": 0.2, "metrics_port": -1,
               "trainer_device": "cpu", "log_level": "INFO", **settings}  # fmt: skip
    return Process(["trainer"], environment(data_dir, **options)).start()


def wait_until(queue: JobQueue, job_id: str, done: object, timeout: float = 180) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.get(job_id)
        if done(job):  # type: ignore[operator]
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {queue.get(job_id)}")


def training(job: Job | pb.Job) -> float:
    """How far a RUNNING job that is training is (its progress), else 0."""
    return job.progress if job.state in (RUNNING, pb.RUNNING) and "step" in job.message else 0.0


def test_kill_9_mid_training_resumes_from_checkpoints_and_publishes_once(tmp_path, queue_url):
    prepare(tmp_path, "crash")
    queue = open_queue(queue_url)
    job = queue.submit(JobSpec(dataset="crash", base_model="prelabel-base", output_model="crash",
                               strategy=engine.FROM_SCRATCH, epochs=24), max_attempts=6)  # fmt: skip
    saved = tmp_path / "checkpoints" / job.id / "training.pt"
    reached = 0.0
    for _ in range(3):
        worker = trainer(tmp_path, queue_url, checkpoint_every_s=0.5)
        reached = training(wait_until(queue, job.id, lambda j, r=reached: training(j) >= r + 0.08))
        last_save = saved.stat().st_mtime if saved.exists() else 0.0
        while not saved.exists() or saved.stat().st_mtime == last_save:  # a save after this progress
            time.sleep(0.05)
        worker.stop(signal.SIGKILL)  # mid-run, no goodbye: the lease must expire
    final = trainer(tmp_path, queue_url)
    try:
        done = wait_until(queue, job.id, lambda j: j.state in TERMINAL)
    finally:
        final.stop()
    assert done.state == SUCCEEDED, done.error
    assert done.attempts == 4 and done.result["model_version"] == "1"
    # Resumed, not restarted from zero: three kills, each after 8 % more progress of about 100 steps.
    assert done.metrics["resumed_from_step"] >= 18
    repository = repository_for(Settings(data_dir=tmp_path))
    assert repository.versions("crash") == [1] and published_by(repository, "crash", job.id) == 1
    assert not (tmp_path / "checkpoints" / job.id).exists()


def test_two_trainers_never_run_the_same_job(tmp_path, queue_url):
    prepare(tmp_path, "pair")
    queue = open_queue(queue_url)
    jobs = [queue.submit(JobSpec(dataset="pair", base_model="prelabel-base", output_model=f"pair-{i}",
                                 strategy=engine.FEATURE_EXTRACTION)) for i in range(4)]  # fmt: skip
    workers = [trainer(tmp_path, queue_url), trainer(tmp_path, queue_url)]
    try:
        for job in jobs:
            assert wait_until(queue, job.id, lambda j: j.state in TERMINAL).state == SUCCEEDED
    finally:
        for w in workers:
            w.stop()
    repository = repository_for(Settings(data_dir=tmp_path))
    for i, job in enumerate(jobs):
        assert queue.get(job.id).attempts == 1 and repository.versions(f"pair-{i}") == [1]
        runs = [w for w in workers if f"job {job.id}: attempt" in w.log()]
        assert len(runs) == 1, f"job {job.id} ran in {len(runs)} workers"


def gateway(data_dir: Path, triton_url: str, queue_url: str) -> Stack:
    gw = Stack.serve(data_dir, "gateway", ["--triton-url", triton_url], queue_url=queue_url)
    wait_for_health(gw.address, timeout=60)
    return gw


def start_job(address: str, dataset: str) -> pb.Job:
    with grpc.insecure_channel(address) as channel:
        rpc.DatasetServiceStub(channel).UploadExamples(
            iter([pb.UploadExamplesRequest(dataset=dataset, examples=labelled(8, 5))]), timeout=60
        )
        create = pb.CreateFineTuneJobRequest(
            dataset=dataset, output_model=dataset, strategy=pb.STRATEGY_FROM_SCRATCH, epochs=RESTART_EPOCHS
        )
        job: pb.Job = rpc.JobServiceStub(channel).CreateFineTuneJob(create, timeout=30)
    return job


def watch(address: str, job_id: str, until: object) -> pb.Job:
    with grpc.insecure_channel(address) as channel:
        for job in rpc.JobServiceStub(channel).WatchJob(pb.WatchJobRequest(id=job_id), timeout=240):
            if until(job):  # type: ignore[operator]
                return job
    raise AssertionError(f"WatchJob ended before the condition held; last {job}")


def test_a_gateway_restart_does_not_stop_the_job_and_watching_resumes(stack, queue_url):
    dataset = f"gw-restart-{queue_url.split(':')[0]}"
    first = gateway(stack.data_dir, stack.triton_url, queue_url)
    worker = trainer(stack.data_dir, queue_url, triton_url=stack.triton_url)
    try:
        job = start_job(first.address, dataset)
        watch(first.address, job.id, lambda j: "step" in j.message)
        first.process.stop(signal.SIGKILL)
        second = gateway(stack.data_dir, stack.triton_url, queue_url)
        try:
            final = watch(second.address, job.id, lambda j: j.state in DONE)
            assert final.state == pb.SUCCEEDED and final.attempts == 1, final.error
            with grpc.insecure_channel(second.address) as channel:
                images, _ = shapes.sample(6, 64, 8, shapes.NOVEL_CLASSES[:3])
                response = rpc.PredictionServiceStub(channel).Predict(
                    request([(str(i), encode(im, "PNG")) for i, im in enumerate(images)], model=dataset), timeout=60
                )
            assert response.version == final.model_version == "1"
            assert {p.labels[0].name for p in response.predictions} <= set(shapes.NOVEL_CLASSES[:3])
        finally:
            second.stop()
    finally:
        worker.stop()
        first.stop()


def test_a_redis_restart_loses_nothing_and_everyone_reconnects(stack, tmp_path):
    redis = RedisServer(tmp_path).start()
    url = f"{redis.url}/0"
    gw = gateway(stack.data_dir, stack.triton_url, url)
    worker = trainer(stack.data_dir, url, triton_url=stack.triton_url, job_lease_s=15)
    try:
        job = start_job(gw.address, "redis-restart")
        watch(gw.address, job.id, lambda j: "step" in j.message)
        redis.stop()
        with grpc.insecure_channel(gw.address) as channel, pytest.raises(grpc.RpcError) as info:
            rpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(id=job.id), timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "check Redis" in info.value.details()
        time.sleep(2)  # the trainer's heartbeats fail meanwhile; training goes on
        redis.start()
        final = watch(gw.address, job.id, lambda j: j.state in DONE)
        assert final.state == pb.SUCCEEDED and final.attempts == 1 and final.model_version == "1", final.error
        assert "job queue reachable again" in gw.process.log()
        assert "reachable again" in worker.log() and "heartbeat for job" in worker.log()
    finally:
        worker.stop()
        gw.stop()
        redis.stop()


def test_stopping_prelabel_serve_hands_the_running_job_back_and_a_restart_resumes_it(stack, tmp_path):
    queue_url = f"sqlite:///{tmp_path / 'jobs.db'}"

    def serve() -> Stack:
        running = Stack.serve(stack.data_dir, "serve", ["--triton-url", stack.triton_url], queue_url=queue_url,
                              job_lease_s=60, trainer_device="cpu")  # fmt: skip
        wait_for_health(running.address, timeout=60)
        return running

    first = serve()
    job = start_job(first.address, "serve-restart")
    watch(first.address, job.id, lambda j: training(j) >= 0.2)
    assert first.stop() == 0  # SIGTERM: the trainer stops at the next batch and hands the job back
    queue = open_queue(queue_url)
    handed_back = queue.get(job.id)
    assert handed_back.state == "QUEUED" and handed_back.attempts == 0 and "shut down" in handed_back.message
    second = serve()  # a lease of 60 s would make a lost job wait; a handed-back one starts at once
    try:
        final = watch(second.address, job.id, lambda j: j.state in DONE)
    finally:
        second.stop()
    assert final.state == pb.SUCCEEDED and final.attempts == 1 and final.metrics["resumed_from_step"] >= 3


def test_prelabel_finetune_rides_out_a_gateway_restart(stack, tmp_path):
    queue_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    port = free_port()
    folder = tmp_path / "labelled"
    for i, example in enumerate(labelled(8, 11)):
        (folder / example.label).mkdir(parents=True, exist_ok=True)
        (folder / example.label / f"{i}.png").write_bytes(example.image.content)

    def start_gateway() -> Stack:
        gw = Stack.serve(stack.data_dir, "gateway", ["--triton-url", stack.triton_url, "--grpc-port", str(port)],
                         queue_url=queue_url)  # fmt: skip
        wait_for_health(gw.address, timeout=60)
        return gw

    first = start_gateway()
    worker = trainer(stack.data_dir, queue_url, triton_url=stack.triton_url)
    cli = subprocess.Popen(
        [PRELABEL, "finetune", str(folder), "--name", "cli-restart", "--strategy", "from_scratch",
         "--epochs", str(RESTART_EPOCHS), "--server", first.address, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    second = None
    try:
        queue = open_queue(queue_url)
        deadline = time.monotonic() + 120
        while not any(training(j) >= 0.1 for j in queue.list()[0]):
            assert time.monotonic() < deadline and cli.poll() is None, cli.communicate()
            time.sleep(0.2)
        first.process.stop(signal.SIGKILL)
        time.sleep(2)  # the CLI sees UNAVAILABLE and keeps retrying
        second = start_gateway()
        out, err = cli.communicate(timeout=240)
        assert cli.returncode == 0, err
        assert "published cli-restart version 1" in out and "attempts 1" in out
    finally:
        cli.kill()
        worker.stop()
        for gw in (first, second):
            if gw is not None:
                gw.stop()
