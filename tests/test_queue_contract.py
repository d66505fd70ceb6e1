"""One contract, two backends: a real SQLite file and a real Redis server (started on a free port)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prelabel.errors import FailedPrecondition, InvalidArgument, NotFound
from prelabel.queue import open_queue
from prelabel.queue.contract import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobQueue
from prelabel.spec import AUTO, DEFAULT_TARGET_PRECISION, STRATEGIES, JobSpec, full_name
from tests.stack import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> JobQueue:
    if request.param == "sqlite":
        return open_queue(f"sqlite:///{tmp_path / 'jobs.db'}")
    url = request.getfixturevalue("redis_url")
    db = abs(hash(request.node.name)) % 15 + 1  # a database of its own per test
    q = open_queue(f"{url}/{db}")
    q.redis.flushdb()  # type: ignore[attr-defined]
    return q


SPEC = JobSpec(dataset="pets", base_model="prelabel-base", output_model="pets", base_version=1, dataset_revision=4)


def test_submit_is_idempotent_and_durable(queue, tmp_path):
    job = queue.submit(SPEC, request_id="r-1")
    assert job.state == QUEUED and queue.submit(SPEC, request_id="r-1").id == job.id
    assert queue.submit(SPEC).id != job.id  # no request_id: a new job each time
    assert queue.get(job.id).spec == SPEC
    with pytest.raises(NotFound, match="does not exist"):
        queue.get("nope")


def test_claim_lease_heartbeat_and_finish(queue):
    first, second = queue.submit(SPEC), queue.submit(SPEC)
    claimed = queue.claim("w1", lease_s=30)
    assert claimed is not None and claimed.id == first.id and claimed.state == RUNNING and claimed.attempts == 1
    assert queue.heartbeat(first.id, "w1", 30, 0.5, "epoch 3/6")
    assert not queue.heartbeat(first.id, "someone-else", 30, 0.9, "")
    assert queue.get(first.id).progress == 0.5 and queue.get(first.id).message == "epoch 3/6"
    done = queue.finish(first.id, "w1", SUCCEEDED, result={"model_version": "2"}, metrics={"val_accuracy": 0.9})
    assert done.state == SUCCEEDED and done.progress == 1.0 and done.result == {"model_version": "2"}
    with pytest.raises(FailedPrecondition):
        queue.finish(first.id, "w1", SUCCEEDED)
    assert queue.claim("w2", 30).id == second.id and queue.claim("w3", 30) is None
    assert queue.depth() == {QUEUED: 0, RUNNING: 1, SUCCEEDED: 1, FAILED: 0, CANCELLED: 0}


def test_an_expired_lease_is_claimed_again_until_attempts_run_out(queue):
    job = queue.submit(SPEC, max_attempts=2)
    assert queue.claim("dead-1", lease_s=0.05).attempts == 1
    time.sleep(0.1)
    again = queue.claim("w2", lease_s=0.05)
    assert again.id == job.id and again.attempts == 2 and again.worker == "w2"
    time.sleep(0.1)
    assert queue.claim("w3", 30) is None  # two attempts used: no poison loop
    failed = queue.get(job.id)
    assert failed.state == FAILED and "stopped answering" in failed.error


def test_stats_show_backlog_age_and_dead_workers(queue):
    assert queue.stats(time.time()).oldest_queued_age_s == 0 and queue.stats(time.time()).expired_leases == 0
    first = queue.submit(SPEC)
    queue.submit(SPEC)
    queue.claim("dies", lease_s=0.05)
    later = time.time() + 60
    stats = queue.stats(later)
    assert stats.depth[QUEUED] == 1 and stats.depth[RUNNING] == 1 and stats.expired_leases == 1
    assert 59 < stats.oldest_queued_age_s < 70
    assert queue.stats(queue.get(first.id).lease_expires_at - 1).expired_leases == 0


def test_release_hands_the_job_back_without_charging_an_attempt(queue):
    job = queue.submit(SPEC, max_attempts=1)
    queue.claim("leaving", 30)
    back = queue.release(job.id, "leaving", "worker shut down")
    assert back.state == QUEUED and back.attempts == 0 and back.worker == "" and back.message == "worker shut down"
    assert queue.claim("next", 30).attempts == 1  # its one attempt is still there
    with pytest.raises(FailedPrecondition):
        queue.release(job.id, "leaving", "")


def test_failed_attempts_retry_then_fail_with_the_last_error(queue):
    job = queue.submit(SPEC, max_attempts=2)
    queue.claim("w1", 30)
    assert queue.finish(job.id, "w1", QUEUED, error="CUDA out of memory").state == QUEUED
    queue.claim("w1", 30)
    ended = queue.finish(job.id, "w1", QUEUED, error="CUDA out of memory again")
    assert ended.state == FAILED and ended.error == "CUDA out of memory again"


def test_cancel(queue):
    waiting, running = queue.submit(SPEC), queue.submit(SPEC)
    cancelled = queue.cancel(waiting.id)
    assert (cancelled.state, cancelled.message) == (CANCELLED, "cancelled before it started")
    assert queue.claim("w1", 30).id == running.id  # the cancelled job never starts
    assert queue.cancel(running.id).cancel_requested
    assert not queue.heartbeat(running.id, "w1", 30, 0.4, "full fine-tuning: step 9/20, about 60s left")
    ended = queue.finish(running.id, "w1", CANCELLED)
    # not the last progress message, which would read as if the job were still running
    assert (ended.state, ended.message) == (CANCELLED, "cancelled at 40%")
    with pytest.raises(FailedPrecondition, match="already ended CANCELLED"):
        queue.cancel(running.id)


def test_a_cancelled_job_whose_attempt_failed_is_not_claimed_again(queue):
    job = queue.submit(SPEC, max_attempts=3)
    queue.claim("w1", 30)
    queue.cancel(job.id)
    ended = queue.finish(job.id, "w1", QUEUED, error="attempt 1 failed: out of memory")
    assert ended.state == CANCELLED and ended.finished_at > 0
    assert queue.claim("w2", 30) is None


def test_the_spec_is_typed_round_trips_and_reads_what_older_writers_stored():
    job = Job.new(SPEC)
    assert Job.from_dict(job.to_dict()) == job and isinstance(Job.from_dict(job.to_dict()).spec, JobSpec)
    stored = {"dataset": "d", "base_model": "b", "output_model": "o", "strategy": "", "target_precision": 0.0,
              "from_a_newer_writer": 1}  # fmt: skip
    spec = JobSpec.from_dict(stored)
    assert (spec.strategy, spec.target_precision, spec.epochs) == (AUTO, DEFAULT_TARGET_PRECISION, 0)


def test_strategy_names_are_the_protos_enum():
    """Defined once in prelabel/spec.py; the contract (protos/) must say the same."""
    from prelabel.cli.main import parser
    from prelabel.v1 import prelabel_pb2 as pb

    assert set(STRATEGIES) == set(pb.Strategy.keys()) - {"STRATEGY_UNSPECIFIED"}
    train = parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    choices = next(a.choices for a in train._actions if a.dest == "strategy")
    assert [full_name(c) for c in choices] == list(STRATEGIES)


def test_list_filters_and_paginates_newest_first(queue):
    ids = [queue.submit(SPEC).id for _ in range(5)]
    queue.cancel(ids[0])
    page, token = queue.list(page_size=2)
    assert [j.id for j in page] == ids[:-3:-1] and token
    rest, token2 = queue.list(page_size=10, page_token=token)
    assert [j.id for j in rest] == ids[2::-1] and token2 == ""
    assert [j.id for j in queue.list(state=CANCELLED)[0]] == [ids[0]]
    with pytest.raises(InvalidArgument):
        queue.list(state="DONE")


def test_revision_grows_with_every_change(queue):
    job = queue.submit(SPEC)
    revisions = [job.revision]
    queue.claim("w1", 30)
    revisions.append(queue.get(job.id).revision)
    queue.heartbeat(job.id, "w1", 30, 0.1, "")
    revisions.append(queue.get(job.id).revision)
    assert revisions == sorted(set(revisions))


def test_two_workers_never_claim_one_job(queue):
    jobs = {queue.submit(SPEC).id for _ in range(30)}
    claims: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def work(name: str) -> None:
        while (job := queue.claim(name, 30)) is not None:
            claims[name].append(job.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [j for c in claims.values() for j in c]
    assert sorted(taken) == sorted(jobs)  # every job exactly once


def test_unknown_url():
    with pytest.raises(InvalidArgument, match="sqlite:///PATH or redis://"):
        open_queue("postgres://x")


def test_redis_restart_loses_nothing_and_the_queue_reconnects(tmp_path):
    from prelabel.errors import Unavailable

    server = RedisServer(tmp_path).start()
    queue = open_queue(f"{server.url}/0")
    job = queue.submit(SPEC, request_id="survives")
    queue.claim("w1", 30)
    server.stop()
    with pytest.raises(Unavailable, match="unreachable"):
        queue.get(job.id)
    server.start()
    try:
        again = queue.get(job.id)  # same client object: it reconnects by itself
        assert again.state == RUNNING and again.worker == "w1"
        assert queue.submit(SPEC, request_id="survives").id == job.id
    finally:
        server.stop()
