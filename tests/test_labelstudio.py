"""The Label Studio ML backend against a real Label Studio and a real Prelabel stack.

The round trip a team runs: import images, connect the backend through Label Studio's API, get
pre-labels, annotate, train, and get better pre-labels from the new version; then the adapter is
restarted and finds everything again in Prelabel. One browser test opens a task in headless
Chromium and submits the pre-label.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from prelabel.datasets import formulas, shapes
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests import labelstudio
from tests.conftest import encode, formula_images
from tests.labelstudio import EMAIL, PASSWORD, LabelStudio
from tests.stack import PRELABEL, Process, environment, free_port

pytestmark = pytest.mark.stack
DEFAULT_MODEL = "prelabel-base"

KNOWN = [formulas.CLASSES[108], formulas.CLASSES[40]]  # classes the base model knows
NOVEL = ["pentagon", "crescent"]  # shapes it never saw: only fine-tuning teaches them
CHOICES = KNOWN + NOVEL
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <Choices name="choice" toName="image">
    {"".join(f'<Choice value="{c}"/>' for c in CHOICES)}
  </Choices>
</View>"""
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 6, 10  # 40 held-out images: one image is 2.5 points, not 8
AUTH = ("studio", "s3cret-pass")
LISTENING = re.compile(r"listening on http://[\d.]+:(\d+)")


def images() -> list[tuple[str, bytes, str, bool]]:
    """``(file name, bytes, true class, for training)``: PNG and JPEG, 16 per class."""
    out = []
    per_class = TRAIN_PER_CLASS + HELD_OUT_PER_CLASS
    for c, name in enumerate(CHOICES):
        if name in KNOWN:
            pictures = formula_images(per_class, 64, seed=40 + c, classes=(formulas.CLASSES.index(name),))[0]
        else:
            rng = np.random.default_rng(70 + c)
            pictures = [shapes.render(shapes.NOVEL_CLASSES.index(name), 64, rng, shapes.NOVEL_CLASSES)
                        for _ in range(per_class)]  # fmt: skip
        for i, picture in enumerate(pictures):
            fmt = ("PNG", "JPEG")[i % 2]
            out.append((f"{name}-{i}.{fmt.lower()}", encode(picture, fmt, quality=92), name, i < TRAIN_PER_CLASS))
    return out


@pytest.fixture(scope="module")
def studio() -> Iterator[LabelStudio]:
    s = labelstudio.started()  # launched when the session began (conftest.py)
    try:
        yield s
    finally:
        s.stop()


class Adapter:
    def __init__(self, stack: Any, data_dir: Path, port: int) -> None:
        self.args = ["labelstudio", "--port", str(port), "--server", stack.address, "--strategy", "feature_extraction",
                     "--train-every", "0", "--basic-auth", ":".join(AUTH)]  # fmt: skip
        self.env = environment(data_dir)
        self.url = f"http://127.0.0.1:{port}"
        self.process = self.start()

    def start(self) -> Process:
        process = Process(self.args, self.env).start()
        process.wait_for_line(LISTENING, timeout=60)
        return process

    def restart(self) -> None:
        self.process.stop()
        self.process = self.start()

    def log(self) -> str:
        return "".join(self.process.stderr)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def adapter(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Adapter]:
    a = Adapter(stack, tmp_path_factory.mktemp("adapter"), free_port())
    try:
        yield a
    finally:
        a.process.stop()


def choice_of(prediction: dict[str, Any]) -> str | None:
    result = prediction.get("result") or []
    return result[0]["value"]["choices"][0] if result else None


def wait_for_version(channel: grpc.Channel, model: str, version: str, timeout: float = 300) -> pb.Model:
    stub = rpc.ModelServiceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = stub.GetModel(pb.GetModelRequest(name=model), timeout=5)
            if found.default_version == version:
                return found
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        time.sleep(1)
    raise TimeoutError(f"{model} version {version} did not become ready within {timeout} s")


def test_round_trip_predict_annotate_train_better_predictions(studio, adapter, stack, channel):
    files = images()
    project = studio.call("POST", "/api/projects", {"title": "Prelabel round trip", "label_config": CONFIG})["id"]
    broken = ("broken.png", b"\x89PNG\r\n\x1a\n this is not an image")
    ids = studio.upload(project, [(n, b) for n, b, _, _ in files] + [broken])
    truth = {task: label for task, (_, _, label, _) in zip(ids, files, strict=False)}
    train = [task for task, f in zip(ids, files, strict=False) if f[3]]
    held_out = [task for task, f in zip(ids, files, strict=False) if not f[3]]
    broken_task = ids[-1]

    # Connect the backend as a team would, with basic auth both ways.
    backend = connect(studio, adapter, project)
    assert adapter.get("/versions")[0] == 401 and adapter.get("/health")[0] == 200  # basic auth where it matters

    base = rpc.ModelServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    default = next(m for m in base.models if m.name == base.default_model)
    base_version = f"{default.name}@{default.default_version}"

    # 1. Pre-labels from the base model: only the project's choices, scores, the version; the broken image none.
    studio.retrieve_predictions(project)
    before = {t: studio.task(t)["predictions"] for t in ids}
    for task in ids[:-1]:
        assert len(before[task]) == 1, (task, before[task], adapter.log())
        prediction = before[task][0]
        assert prediction["model_version"] == base_version
        if truth[task] in KNOWN:  # the base model knows these classes: its best project choice, with a score
            assert choice_of(prediction) == truth[task] and 0 < prediction["score"] <= 1, adapter.log()
            assert prediction["result"][0]["from_name"] == "choice" and prediction["result"][0]["to_name"] == "image"
        else:  # a project choice or nothing, never one of the base's 256 other labels
            assert choice_of(prediction) in (*KNOWN, None)
    assert not any(p.get("result") for p in before[broken_task])
    assert f"task {broken_task}: the image could not be used" in adapter.log()
    accuracy_before = np.mean([choice_of(before[t][0]) == truth[t] for t in held_out])

    # 2. Annotations: one relabelled (the latest wins), one deleted (it leaves the training set).
    for task in train:
        studio.call("POST", f"/api/tasks/{task}/annotations", {"result": [result(truth[task])]})
    first = train[0]
    wrong = next(c for c in CHOICES if c != truth[first])
    annotation = studio.call("GET", f"/api/tasks/{first}/annotations")[0]
    studio.call("PATCH", f"/api/annotations/{annotation['id']}", {"result": [result(wrong)]})
    studio.call("PATCH", f"/api/annotations/{annotation['id']}", {"result": [result(truth[first])]})
    deleted = studio.call("POST", f"/api/tasks/{held_out[0]}/annotations", {"result": [result(wrong)]})
    studio.call("DELETE", f"/api/annotations/{deleted['id']}")

    # 3. Train from Label Studio, as its "Start training" does.
    studio.call("POST", f"/api/ml/{backend['id']}/train", {})
    model = f"labelstudio-{project}"
    trained = wait_for_version(channel, model, "1")
    assert trained.versions[0].ready and sorted(trained.versions[0].labels) == sorted(CHOICES)
    dataset = rpc.DatasetServiceStub(channel).GetDataset(pb.GetDatasetRequest(name=model), timeout=10)
    assert dict(dataset.class_counts) == {c: TRAIN_PER_CLASS for c in CHOICES}

    # 4. Label Studio asks again (a new model version) and gets better pre-labels on the held-out tasks.
    deadline = time.monotonic() + 30
    while json.loads(adapter_call(adapter, "/setup", {"project": f"{project}.1", "schema": CONFIG}))[
            "model_version"] != f"{model}@1" and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.5)
    studio.retrieve_predictions(project)
    after = {t: [p for p in studio.task(t)["predictions"] if p["model_version"] == f"{model}@1"] for t in held_out}
    assert all(len(after[t]) == 1 for t in held_out), (after, adapter.log())
    accuracy_after = np.mean([choice_of(after[t][0]) == truth[t] for t in held_out])
    assert accuracy_before <= 0.5 + 1e-9  # the base cannot know the new shapes
    assert accuracy_after >= 0.9 and accuracy_after > accuracy_before, (accuracy_before, accuracy_after)

    status, page = adapter.get("/metrics")
    assert status == 200 and 'prelabel_labelstudio_tasks_total{outcome="failed"} 2.0' in page, page
    assert 'prelabel_labelstudio_training_runs_total{outcome="succeeded"} 1.0' in page, adapter.log()
    assert "prelabel_triton_up" not in page and "prelabel_trainer_busy" not in page  # no idle copies of others'

    # 5. A repeated trigger and a restarted adapter add no job: the work is found again in Prelabel.
    adapter.restart()
    assert json.loads(adapter_call(adapter, "/setup", {"project": f"{project}.2", "schema": CONFIG,
                                                 "hostname": studio.url, "access_token": studio.token}))[
        "model_version"] == f"{model}@1"  # fmt: skip
    adapter_call(adapter, "/webhook", {"action": "START_TRAINING", "project": {"id": project}})
    deadline = time.monotonic() + 60
    while "fine-tune job" not in adapter.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    jobs = rpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest(page_size=1000), timeout=10).jobs
    assert [j.state for j in jobs if j.output_model == model] == [pb.SUCCEEDED], adapter.log()


def result(choice: str) -> dict[str, Any]:
    return {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}


def adapter_call(adapter: Adapter, path: str, body: dict[str, Any]) -> str:
    basic = "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()
    request = urllib.request.Request(adapter.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": basic, "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def connect(studio: LabelStudio, adapter: Adapter, project: int) -> dict[str, Any]:
    """Connect the backend to a project with basic auth: one call (the adapter fixes the webhook's header)."""
    backend = studio.call("POST", "/api/ml", {
        "url": adapter.url, "project": project, "title": "Prelabel", "auth_method": "BASIC_AUTH",
        "basic_auth_user": AUTH[0], "basic_auth_pass": AUTH[1]})  # fmt: skip
    basic = "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hooks = [h for h in studio.call("GET", f"/api/webhooks?project={project}") if h["url"].startswith(adapter.url)]
        if hooks and all((h.get("headers") or {}).get("Authorization") == basic for h in hooks):
            return dict(backend)
        time.sleep(0.5)
    raise AssertionError(f"the adapter did not give the webhook its header: {hooks}\n{adapter.log()}")


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


def test_a_person_sees_the_pre_label_in_the_browser_and_submits_it(studio, adapter, tmp_path):
    from playwright.sync_api import sync_playwright

    project = studio.call("POST", "/api/projects", {"title": "Prelabel in the browser", "label_config": CONFIG})["id"]
    picture = formula_images(1, 64, seed=5, classes=(formulas.CLASSES.index(KNOWN[0]),))[0][0]
    (task,) = studio.upload(project, [("known.jpeg", encode(picture, "JPEG", quality=92))])
    connect(studio, adapter, project)
    studio.retrieve_predictions(project)
    (prediction,) = studio.task(task)["predictions"]
    assert choice_of(prediction) == KNOWN[0]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{studio.url}/user/login/")
            page.fill("input[name=email]", EMAIL)
            page.fill("input[name=password]", PASSWORD)
            page.keyboard.press("Enter")
            page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
            page.goto(f"{studio.url}/projects/{project}/data?task={task}")
            choice = page.locator("label", has_text=KNOWN[0]).locator("input[type=checkbox]")
            choice.wait_for(timeout=60_000)
            assert choice.is_checked()  # the pre-label, ticked
            for other in CHOICES[1:]:
                assert not page.locator("label", has_text=other).locator("input[type=checkbox]").is_checked()
            page.get_by_text(prediction["model_version"]).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "task.png"))
            page.get_by_role("button", name="Submit").click()
            deadline = time.monotonic() + 30
            while not studio.call("GET", f"/api/tasks/{task}/annotations") and time.monotonic() < deadline:
                time.sleep(0.3)
        finally:
            browser.close()
    (annotation,) = studio.call("GET", f"/api/tasks/{task}/annotations")
    assert choice_of(annotation) == KNOWN[0]


@pytest.mark.parametrize("presign", [True, False])
def test_a_project_on_cloud_storage_is_pre_labelled(studio, adapter, presign):
    """Most teams keep their images in a bucket: Label Studio's S3 storage (here on moto's S3 server)
    makes tasks of ``s3://`` URIs. Label Studio resolves them for the backend: it redirects to a
    presigned URL (fetched without Label Studio's token) or, with presigning off, passes the bytes on."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint, keys = f"http://127.0.0.1:{port}", {"aws_access_key_id": "prelabel", "aws_secret_access_key": "x"}
        bucket = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        bucket.create_bucket(Bucket="photos")
        pictures = formula_images(3, 64, seed=9, classes=(formulas.CLASSES.index(KNOWN[0]),))[0]
        for i, picture in enumerate(pictures):
            bucket.put_object(Bucket="photos", Key=f"incoming/{i}.jpg", Body=encode(picture, "JPEG", quality=92))
        project = studio.call("POST", "/api/projects", {"title": f"On S3 ({presign=})", "label_config": CONFIG})["id"]
        storage = studio.call("POST", "/api/storages/s3", {
            "project": project, "title": "photos", "bucket": "photos", "prefix": "incoming/", "use_blob_urls": True,
            "presign": presign, "s3_endpoint": endpoint, "region_name": "us-east-1", **keys})  # fmt: skip
        studio.call("POST", f"/api/storages/s3/{storage['id']}/sync", {})
        tasks = studio.tasks(project)
        assert len(tasks) == 3, tasks
        connect(studio, adapter, project)
        studio.retrieve_predictions(project)
        for task in tasks:
            (prediction,) = studio.task(task["id"])["predictions"]
            assert choice_of(prediction) == KNOWN[0] and 0 < prediction["score"] <= 1, adapter.log()
    finally:
        server.stop()


def test_offline_pre_labels_import_into_label_studio(studio, stack, tmp_path):
    """``prelabel predict --format labelstudio`` writes tasks with predictions that Label Studio imports as they are."""
    folder = tmp_path / "photos"
    folder.mkdir()
    pictures = formula_images(3, 64, seed=8, classes=(formulas.CLASSES.index(KNOWN[1]),))[0]
    for i, picture in enumerate(pictures):
        (folder / f"known-{i}.png").write_bytes(encode(picture, "PNG"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "tasks.json"
    run = subprocess.run([PRELABEL, "predict", str(folder), "--server", stack.address, "--format", "labelstudio",
                          "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 3, run.stderr  # broken.png could not be used
    tasks = json.loads(out.read_text())
    assert len(tasks) == 4 and sum("predictions" in t for t in tasks) == 3
    project = studio.call("POST", "/api/projects", {"title": "Offline", "label_config": CONFIG})["id"]
    studio.call("POST", f"/api/projects/{project}/import", tasks)
    stored = {t["data"]["image"].rsplit("/", 1)[-1]: t for t in studio.tasks(project)}
    assert len(stored) == 4 and stored["broken.png"]["predictions"] == []
    for i in range(3):
        (prediction,) = stored[f"known-{i}.png"]["predictions"]
        assert choice_of(prediction) == KNOWN[1] and 0 < prediction["score"] <= 1
        assert prediction["model_version"].startswith(f"{DEFAULT_MODEL}@")
