"""A full data volume, for real: a small tmpfs filled to the last page (tests run as root, as CI does);
and a Redis queue at its maxmemory.

A full disk is the most common way a long-running service's writes fail. It must read as what it is
(RESOURCE_EXHAUSTED "the data volume is full", the file named in the log), never as INTERNAL or as
torch's "unexpected pos", and must lose nothing: the same upload or job succeeds once there is space.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prelabel.datasets import shapes
from prelabel.datasets.store import dataset_store
from prelabel.errors import ResourceExhausted, volume_full
from prelabel.queue.contract import QUEUED, SUCCEEDED
from prelabel.queue.redis import RedisQueue
from prelabel.queue.sqlite import SQLiteQueue
from prelabel.settings import Settings
from prelabel.spec import JobSpec
from prelabel.training import engine, worker
from prelabel.training.worker import Trainer
from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import repository_for
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode
from tests.stack import PRELABEL, RedisServer, Stack, environment

FULL = "the data volume is full"


class Volume:
    """A mounted tmpfs of ``size_mb``; :meth:`fill` takes every free page, :meth:`free` gives them back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * (1 << 20))  # a short write when nearly full, then ENOSPC
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        assert os.statvfs(self.root).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture()
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    root = tmp_path / "volume"
    root.mkdir()
    size_mb = getattr(request, "param", 64)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)],
                             capture_output=True, text=True)  # fmt: skip
    assert mounted.returncode == 0, f"mounting a {size_mb} MB tmpfs needs root (CI runs as root): {mounted.stderr}"
    try:
        yield Volume(root)
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=True)


def labelled(count: int, seed: int) -> list[pb.Example]:
    classes = shapes.NOVEL_CLASSES[:3]
    images, labels = shapes.sample(count, 64, seed, classes)
    return [pb.Example(image=pb.Image(id=f"{seed}-{i}", content=encode(im, "PNG")), label=classes[y])
            for i, (im, y) in enumerate(zip(images, labels, strict=True))]  # fmt: skip


def test_errors_of_a_full_volume_are_named_and_nothing_else_is(tmp_path):
    for exc in (OSError(errno.ENOSPC, "No space left on device", "/data/x"), OSError(errno.EDQUOT, "Quota"),
                sqlite3.OperationalError("database or disk is full")):  # fmt: skip
        full = volume_full(exc)
        assert isinstance(full, ResourceExhausted) and FULL in full.message and "nothing was saved" in full.message
    for other in (OSError(errno.EACCES, "Permission denied"), sqlite3.OperationalError("database is locked"),
                  ValueError("No space left on device")):  # fmt: skip
        assert volume_full(other) is None
    # SQLite says only "disk I/O error" when its WAL index cannot grow: full only where space is short
    assert volume_full(sqlite3.OperationalError("disk I/O error"), tmp_path) is None


def test_a_gateway_on_a_full_volume_says_so_keeps_the_dataset_and_takes_the_upload_later(volume):
    """Through a real gateway process over gRPC: RESOURCE_EXHAUSTED (was INTERNAL), the dataset as it was,
    the blob's path in the log, the volume's free space in /metrics; the same upload succeeds after."""
    gateway = Stack.serve(volume.root / "data", command="gateway", extra=["--triton-url", "127.0.0.1:9"])
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            datasets = rpc.DatasetServiceStub(channel)
            first = datasets.UploadExamples(iter([pb.UploadExamplesRequest(dataset="d", examples=labelled(9, 1))]))
            assert first.example_count == 9
            volume.fill()
            more = pb.UploadExamplesRequest(dataset="d", examples=labelled(9, 2))
            with pytest.raises(grpc.RpcError) as err:
                datasets.UploadExamples(iter([more]), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert FULL in err.value.details() and "nothing was saved" in err.value.details()
            assert datasets.GetDataset(pb.GetDatasetRequest(name="d")).example_count == 9
            assert gateway.metrics_url
            exposition = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
            volume_metrics = {
                line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                for line in exposition.splitlines()
                if line.startswith("prelabel_data_volume_") and f'{{path="{volume.root / "data"}"}}' in line
            }
            assert volume_metrics == {"prelabel_data_volume_free_bytes": 0, "prelabel_data_volume_size_bytes": 64 << 20}
            assert 'prelabel_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="UploadExamples"} 1.0' in exposition
            volume.free()
            assert datasets.UploadExamples(iter([more]), timeout=60).example_count == 18
    finally:
        gateway.stop()
    log = gateway.process.log()
    assert f"UploadExamples failed: {FULL}" in log and "/datasets/.blobs/" in log and "Traceback" not in log


def test_the_sqlite_queue_on_a_full_volume_refuses_a_job_as_full(volume):
    queue = SQLiteQueue(volume.root / "queue.db")
    spec = JobSpec(dataset="d", base_model="prelabel-base", output_model="m")
    queue.submit(spec)
    volume.fill()
    with pytest.raises(ResourceExhausted, match=FULL):  # SQLite said "disk I/O error": it was UNAVAILABLE
        for _ in range(100):  # the first inserts may fit in pages SQLite holds already
            queue.submit(spec)
    with pytest.raises(ResourceExhausted, match=FULL):  # a new queue's first start, too
        SQLiteQueue(volume.root / "new" / "queue.db")
    volume.free()
    assert queue.submit(spec).state == QUEUED


def test_a_job_that_meets_a_full_volume_fails_saying_so_and_succeeds_once_there_is_space(volume, tmp_path, monkeypatch):
    """The volume fills while the job trains, so that its weights (torch.save, which says "unexpected pos"
    on a full disk) are what cannot be written. The attempt ends saying the volume is full, leaves no
    version and no staging folder behind; the next attempt, with space, publishes version 1."""
    settings = Settings(data_dir=volume.root / "data", queue_url=f"sqlite:///{tmp_path / 'queue.db'}",
                        trainer_device="cpu", job_lease_s=5.0)  # fmt: skip
    ensure_default_model(repository_for(settings), settings.default_model, "builtin")
    upload = dataset_store(settings).upload("novel")
    upload.add([(e.image.id, e.image.content, e.label) for e in labelled(24, 3)])
    upload.commit()
    trainer = Trainer(settings, name="full-volume")
    publish = worker.publish

    def fill_then_publish(*args, **kwargs):
        volume.fill()
        return publish(*args, **kwargs)

    monkeypatch.setattr(worker, "publish", fill_then_publish)
    job = trainer.queue.submit(JobSpec(dataset="novel", base_model="prelabel-base", output_model="novel",
                                       strategy=engine.FEATURE_EXTRACTION))  # fmt: skip
    trainer.run_job(trainer.queue.claim(trainer.name, settings.job_lease_s))
    failed = trainer.queue.get(job.id)
    assert failed.state == QUEUED and f"attempt 1 failed: {FULL}" in failed.error, failed.error
    assert trainer.repository.versions("novel") == []
    assert not any((volume.root / "data" / ".models.staging").iterdir())

    volume.free()
    monkeypatch.setattr(worker, "publish", publish)
    trainer.run_job(trainer.queue.claim(trainer.name, settings.job_lease_s))
    done = trainer.queue.get(job.id)
    assert done.state == SUCCEEDED and done.result["model_version"] == "1"
    assert trainer.repository.versions("novel") == [1]


@pytest.mark.parametrize("volume", [8], indirect=True)
def test_init_on_a_volume_too_small_for_the_base_model_says_so(volume):
    init = subprocess.run([PRELABEL, "init"], env=environment(volume.root / "data"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert init.returncode == 1, init.stderr
    assert f"prelabel: {FULL}" in init.stderr and "weights.pt" in init.stderr and "Traceback" not in init.stderr


def test_redis_at_its_maxmemory_refuses_jobs_as_full_and_trainers_wait(tmp_path):
    """Managed Redis (and deploy/'s) has a maxmemory: at it, writes fail OutOfMemoryError. A client gets
    RESOURCE_EXHAUSTED (was INTERNAL), the refused write applies nothing, and a trainer waits instead of
    dying (it crashed on the error: a restart loop)."""
    server = RedisServer(tmp_path).start()
    trainer = None
    try:
        queue = RedisQueue(server.url)
        kept = queue.submit(JobSpec(dataset="d", base_model="prelabel-base", output_model="m"), request_id="kept")
        queue.redis.config_set("maxmemory", 1)
        with pytest.raises(ResourceExhausted, match="Redis is at its maxmemory"):
            queue.submit(JobSpec(dataset="d", base_model="prelabel-base", output_model="m"), request_id="refused")
        assert [job.id for job in queue.list()[0]] == [kept.id]
        trainer = Trainer(Settings(data_dir=tmp_path / "data", queue_url=server.url, trainer_poll_s=0.1))
        running = threading.Thread(target=trainer.run)
        running.start()
        time.sleep(1.0)
        assert running.is_alive() and queue.get(kept.id).state == QUEUED  # waited: claiming is a write
        queue.redis.config_set("maxmemory", 0)
        deadline = time.monotonic() + 30
        while queue.get(kept.id).state == QUEUED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue.get(kept.id).state != QUEUED  # claimed once Redis takes writes again
    finally:
        if trainer is not None:
            trainer.stopping.set()
            running.join(60)
        server.stop()
