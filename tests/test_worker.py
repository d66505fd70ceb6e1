"""The trainer worker in-process, on a real SQLite queue and real files: success, publish-once,
permanent failures, cancel, shutdown, and checkpoints that resume a run exactly."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from PIL import Image

from prelabel.datasets import shapes
from prelabel.datasets.store import dataset_store
from prelabel.errors import InvalidArgument
from prelabel.preprocessing import Preprocess
from prelabel.queue.contract import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from prelabel.settings import Settings
from prelabel.spec import JobSpec
from prelabel.training import data, engine
from prelabel.training.publish import published_by
from prelabel.training.worker import Trainer
from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import repository_for
from tests.conftest import encode


@pytest.fixture()
def trainer(tmp_path) -> Trainer:
    settings = Settings(data_dir=tmp_path, job_lease_s=2.0, trainer_poll_s=0.1, trainer_device="cpu")
    ensure_default_model(repository_for(settings), settings.default_model, "builtin")
    images, labels = shapes.sample(8 * 3, 64, 5, shapes.NOVEL_CLASSES[:3])
    upload = dataset_store(settings).upload("novel")
    pairs = zip(images, labels, strict=True)
    upload.add([(str(i), encode(im, "PNG"), shapes.NOVEL_CLASSES[y]) for i, (im, y) in enumerate(pairs)])
    upload.commit()
    return Trainer(settings, name="test-worker")


def spec(**changes: Any) -> JobSpec:
    return JobSpec(**{"dataset": "novel", "base_model": "prelabel-base", "output_model": "novel",
                      "strategy": engine.FEATURE_EXTRACTION, **changes})  # fmt: skip


def run_next(trainer: Trainer) -> None:
    job = trainer.queue.claim(trainer.name, trainer.settings.job_lease_s)
    assert job is not None
    trainer.run_job(job)


def test_a_job_trains_publishes_and_records_its_result(trainer):
    job = trainer.queue.submit(spec())
    run_next(trainer)
    done = trainer.queue.get(job.id)
    assert done.state == SUCCEEDED and done.progress == 1.0 and done.attempts == 1
    assert done.result["model_version"] == "1" and done.result["chosen_strategy"] == engine.FEATURE_EXTRACTION
    assert "as requested" in done.result["strategy_reason"] and 0 < done.metrics["val_accuracy"] <= 1
    assert published_by(trainer.repository, "novel", job.id) == 1
    assert not (trainer.settings.checkpoints / job.id).exists()


def test_the_scratch_trial_setting_reaches_auto_jobs(trainer, tmp_path):
    """PRELABEL_TRAINER_SCRATCH_TRIAL=always: an AUTO job on this CPU cross-fits from scratch too, and
    its reason shows it among the trial's candidates; a value the trainer does not know stops it at start."""
    trainer.settings = trainer.settings.replace(trainer_scratch_trial="always")
    job = trainer.queue.submit(spec(strategy=engine.AUTO, epochs=1))
    run_next(trainer)
    done = trainer.queue.get(job.id)
    assert done.state == SUCCEEDED and "paired trial" in done.result["strategy_reason"]
    assert "training from scratch" in done.result["strategy_reason"]
    with pytest.raises(InvalidArgument, match="PRELABEL_TRAINER_SCRATCH_TRIAL='sometimes'"):
        Trainer(trainer.settings.replace(trainer_scratch_trial="sometimes"))


def test_a_job_retried_after_publishing_does_not_publish_again(trainer):
    job = trainer.queue.submit(spec())
    claimed = trainer.queue.claim(trainer.name, 0.5)
    assert claimed is not None
    from prelabel.training.worker import Heartbeat

    trainer._execute(claimed, Heartbeat(trainer.queue, claimed, trainer.name, 0.5))  # then "killed": no finish
    time.sleep(0.6)
    run_next(trainer)  # the lease expired: claimed again
    done = trainer.queue.get(job.id)
    assert done.state == SUCCEEDED and done.attempts == 2 and done.result["model_version"] == "1"
    assert trainer.repository.versions("novel") == [1]


def test_bad_input_fails_at_once_without_retries(trainer):
    missing = trainer.queue.submit(spec(dataset="gone"))
    run_next(trainer)
    failed = trainer.queue.get(missing.id)
    assert failed.state == FAILED and failed.attempts == 1 and "dataset 'gone' does not exist" in failed.error
    too_deep = trainer.queue.submit(spec(strategy=engine.FREEZE_FIRST_K, freeze_first_k=99))
    run_next(trainer)
    assert "freeze_first_k=99" in trainer.queue.get(too_deep.id).error


def long_job(trainer: Trainer) -> tuple[str, threading.Thread]:
    job = trainer.queue.submit(spec(strategy=engine.FROM_SCRATCH, epochs=200))
    worker = threading.Thread(target=run_next, args=(trainer,))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = trainer.queue.get(job.id)
        if current.state == RUNNING and "step" in current.message:
            return job.id, worker
        time.sleep(0.1)
    raise AssertionError(f"the job never reported a training step: {trainer.queue.get(job.id)}")


def test_cancel_stops_a_running_job_within_seconds(trainer):
    job_id, worker = long_job(trainer)
    asked = time.monotonic()
    trainer.queue.cancel(job_id)
    worker.join(30)
    job = trainer.queue.get(job_id)
    assert job.state == CANCELLED and time.monotonic() - asked < 5
    assert trainer.repository.versions("novel") == []


@pytest.mark.parametrize("phase", ["decoding", "publishing"])
def test_cancel_before_training_or_after_it_never_publishes(trainer, monkeypatch, phase):
    """Issue 11: should_stop was only asked inside the training loop; a cancel while the images were
    decoded, or once training had ended, still published a version and ended SUCCEEDED."""
    job = trainer.queue.submit(spec())
    claimed = trainer.queue.claim(trainer.name, trainer.settings.job_lease_s)
    assert claimed is not None
    if phase == "decoding":
        real = data.decode_or_error

        def slow_decode(*args, **kwargs):
            if not trainer.queue.get(job.id).cancel_requested:
                trainer.queue.cancel(job.id)
            time.sleep(0.25)  # 24 images: 6 s, long enough for the heartbeat to hear of the cancel
            return real(*args, **kwargs)

        monkeypatch.setattr(data, "decode_or_error", slow_decode)
    else:
        real_train = engine.train

        def train_then_cancel(*args, **kwargs):
            result = real_train(*args, **kwargs)
            trainer.queue.cancel(job.id)  # the heartbeat has not heard yet: the queue is asked
            return result

        monkeypatch.setattr(engine, "train", train_then_cancel)
    trainer.run_job(claimed)
    assert trainer.queue.get(job.id).state == CANCELLED
    assert trainer.repository.versions("novel") == []


def test_training_data_honours_the_pixel_limit(trainer):
    """A decompression bomb uploaded into a dataset must not reach the trainer undecoded-unchecked."""
    import zlib

    blob = encode(Image.new("RGB", (321, 123)), "PNG")
    ihdr = b"IHDR" + (9_000).to_bytes(4, "big") * 2 + blob[24:29]
    bomb = blob[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + blob[33:]
    base_images, base_labels = trainer.store.examples("novel")
    with pytest.raises(InvalidArgument, match="9000x9000 pixels is over the limit"):
        data.from_encoded([*base_images, bomb], [*base_labels, base_labels[0]], Preprocess(64, 64),
                          max_pixels=trainer.settings.max_image_pixels)  # fmt: skip


def test_shutdown_hands_the_job_back_uncharged(trainer):
    job_id, worker = long_job(trainer)
    trainer.stopping.set()
    worker.join(30)
    job = trainer.queue.get(job_id)
    assert job.state == QUEUED and job.attempts == 0 and "shut down" in job.message
    assert (trainer.settings.checkpoints / job_id / "training.pt").is_file()  # the next worker resumes


def test_a_resumed_run_equals_an_uninterrupted_one(trainer, tmp_path):
    base = engine.load_base(trainer.repository, "prelabel-base")
    images, labels = trainer.store.examples("novel")
    examples = data.from_encoded(images, labels, base.preprocess)
    config = engine.TrainConfig(strategy=engine.FULL_FINE_TUNE, epochs=8)
    whole = engine.train(base, examples, config)

    checkpoint = engine.Checkpoint(tmp_path / "ckpt.pt", every_s=3600)  # saved only because it is stopped
    seen: list[engine.Progress] = []
    with pytest.raises(engine.Stopped, match="stopped at step"):
        engine.train(base, examples, config, seen.append, checkpoint,
                     should_stop=lambda: any("fold 2 of 3" in p.stage for p in seen))  # fmt: skip
    resumed = engine.train(base, examples, config, checkpoint=checkpoint)
    assert resumed.metrics["resumed_from_step"] > config.epochs  # fold 1 whole, and part of fold 2
    assert resumed.metrics["steps"] == whole.metrics["steps"]
    assert resumed.metrics["val_accuracy"] == whole.metrics["val_accuracy"]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_a_job_id_that_is_not_one_of_ours_never_becomes_a_path(trainer, tmp_path, caplog):
    victim = tmp_path / "victim"  # what checkpoints/../victim would reach
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    forged = trainer.queue.get(trainer.queue.submit(spec()).id)
    forged.id = "../victim"  # as if someone had written it into the queue by hand
    trainer.run_job(forged)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert "refusing job '../victim'" in caplog.text
