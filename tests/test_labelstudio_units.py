"""The Label Studio adapter's pieces, one at a time (the round trip is in test_labelstudio.py)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from prelabel.errors import InvalidArgument
from prelabel.labelstudio import config, images
from prelabel.labelstudio.backend import Backend, Options, project_id
from prelabel.labelstudio.learning import Learner, latest_choice, request_id
from prelabel.labelstudio.server import application, parse_project_models

CLASSIFICATION = """<View><Image name="img" value="$photo"/>
  <Choices name="kind" toName="img"><Choice value="Cat"/><Choice value="dog"/></Choices></View>"""


def test_image_classification_configs_are_read():
    c = config.parse(CLASSIFICATION)
    assert (c.from_name, c.to_name, c.data_key, c.choices) == ("kind", "img", "photo", ("Cat", "dog"))
    assert c.choice_for("Cat") == "Cat" and c.choice_for("cat") == "Cat" and c.choice_for("Dog ") == "dog"
    assert c.choice_for("horse") is None  # a label the project does not have is never sent


@pytest.mark.parametrize(("xml", "says"), [
    ('<View><Image name="i" value="$i"/><RectangleLabels name="b" toName="i"><Label value="a"/></RectangleLabels>'
     "</View>", "RectangleLabels"),
    ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices>'
     "</View>", "Choices, Text"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple"><Choice value="a"/>'
     '<Choice value="b"/></Choices></View>', "several choices"),
    ("<View><Image", "not valid XML"),
])  # fmt: skip
def test_other_projects_get_an_error_that_names_what_is_supported(xml, says):
    with pytest.raises(InvalidArgument) as info:
        config.parse(xml)
    assert says in info.value.message and "image classification" in info.value.message


def test_project_ids_come_in_two_spellings():
    assert project_id("7.1700000000") == "7" and project_id({"id": 7, "title": "x"}) == "7"
    with pytest.raises(InvalidArgument):
        project_id("../etc")


def annotation(choice: str, updated: str, ident: int, cancelled: bool = False) -> dict:
    return {
        "id": ident,
        "updated_at": updated,
        "was_cancelled": cancelled,
        "result": [{"from_name": "kind", "to_name": "img", "type": "choices", "value": {"choices": [choice]}}],
    }


def test_the_latest_annotation_that_is_not_cancelled_is_the_label():
    c = config.parse(CLASSIFICATION)
    task = {"annotations": [annotation("Cat", "2026-11-01T10:00:00Z", 1), annotation("dog", "2026-11-02T10:00:00Z", 2),
                            annotation("Cat", "2026-11-03T10:00:00Z", 3, cancelled=True)]}  # fmt: skip
    assert latest_choice(task, c) == "dog"
    assert latest_choice({"annotations": []}, c) is None
    assert latest_choice({"annotations": [annotation("horse", "2026-11-01T10:00:00Z", 1)]}, c) is None


def test_the_request_id_depends_on_exactly_what_is_trained():
    examples = [("1", b"a", "Cat"), ("2", b"b", "dog")]
    same = request_id("3", "base", 2, list(reversed(examples)))  # order and task ids do not matter
    assert request_id("3", "base", 2, examples) == same and len(same) <= 200
    assert request_id("3", "base", 2, [("1", b"a", "dog"), ("2", b"b", "dog")]) != same  # a relabel
    assert request_id("3", "base", 2, examples[:1]) != same  # a deleted annotation
    assert request_id("3", "other", 2, examples) != same and request_id("4", "base", 2, examples) != same


async def test_data_uris_and_limits():
    png = b"\x89PNG fake"
    async with aiohttp.ClientSession() as session:
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        assert await images.fetch(session, uri, "http://ls", "", 1000) == png
        with pytest.raises(images.FetchError, match="over 4 bytes"):
            await images.fetch(session, uri, "http://ls", "", 4)
        with pytest.raises(images.FetchError, match="not valid base64"):
            await images.fetch(session, "data:image/png;base64,@@@", "http://ls", "", 1000)
        with pytest.raises(images.FetchError, match="not an http"):
            await images.fetch(session, "file:///etc/passwd", "http://ls", "", 1000)


async def test_the_token_goes_only_to_label_studio(aiohttp_free_port):
    seen: list[str] = []

    async def image(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(body=b"x" * 10)

    async with serving({"/data/upload/1/a.png": image}, aiohttp_free_port) as (session, here):
        assert await images.fetch(session, "/data/upload/1/a.png", here, "T", 100) == b"x" * 10
        elsewhere = f"http://localhost:{aiohttp_free_port}/data/upload/1/a.png"  # another host name
        assert await images.fetch(session, elsewhere, here, "T", 100) == b"x" * 10
        with pytest.raises(images.FetchError, match="over 5 bytes"):
            await images.fetch(session, "/data/upload/1/a.png", here, "T", 5)
        with pytest.raises(images.FetchError, match="HTTP 404"):
            await images.fetch(session, "/data/upload/1/missing.png", here, "T", 100)
    assert seen == ["Token T", "", "Token T"]


async def test_cloud_storage_images_are_resolved_by_label_studio_and_the_token_stays_there(aiohttp_free_port):
    """A task from an S3, GCS or Azure storage names its image ``s3://bucket/key``: Label Studio's
    ``/tasks/ID/presign/`` (with the token) redirects to a presigned URL, fetched without the token."""
    seen: dict[str, str] = {}

    async def presign(request: web.Request) -> web.Response:
        seen["presign"] = request.headers.get("Authorization", "")
        uri = base64.urlsafe_b64decode(request.query["fileuri"]).decode()
        if uri.endswith("gone.png"):
            return web.Response(status=404)
        key = uri.removeprefix("s3://")
        raise web.HTTPSeeOther(f"http://localhost:{aiohttp_free_port}/{key}?X-Amz-Signature=abc")  # another origin

    async def bucket(request: web.Request) -> web.Response:
        seen["bucket"] = request.headers.get("Authorization", "")
        if request.match_info["key"] == "expired.png":
            return web.Response(status=403)
        return web.Response(body=f"{request.match_info['key']} {request.query['X-Amz-Signature']}".encode())

    routes = {"/tasks/{task}/presign/": presign, "/bucket/{key}": bucket}
    async with serving(routes, aiohttp_free_port) as (session, here):
        assert await images.fetch(session, "s3://bucket/a.png", here, "T", 100, 7) == b"a.png abc"
        assert seen == {"presign": "Token T", "bucket": ""}
        with pytest.raises(images.FetchError, match=r"could not resolve s3://bucket/gone.png \(HTTP 404\)"):
            await images.fetch(session, "s3://bucket/gone.png", here, "T", 100, 7)
        with pytest.raises(images.FetchError, match="answered HTTP 403"):  # the bucket's refusal, not the token's
            await images.fetch(session, "s3://bucket/expired.png", here, "T", 100, 7)


@contextlib.asynccontextmanager
async def serving(routes: dict[str, Any], port: int) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """An HTTP server on loopback ``port`` answering GET ``routes``, and a client session: (session, its URL)."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture()
def aiohttp_free_port() -> int:
    from tests.stack import free_port

    return free_port()


async def test_bad_requests_are_400_with_a_message_and_auth_is_checked(aiohttp_free_port):
    async with aiohttp.ClientSession() as session:
        backend = Backend(prelabel=None, options=Options(), session=session)  # type: ignore[arg-type]
        app = application(backend, Learner(backend, 0, 1), auth=("u", "p"))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", aiohttp_free_port).start()
        url = f"http://127.0.0.1:{aiohttp_free_port}"
        good = {"Authorization": aiohttp.encode_basic_auth("u", "p")}
        try:
            async with session.get(f"{url}/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "UP"
            async with session.post(f"{url}/predict", json={"tasks": []}) as r:
                assert r.status == 401
            wrong = {"Authorization": aiohttp.encode_basic_auth("u", "wrong")}
            async with session.post(f"{url}/predict", headers=wrong, json={}) as r:
                assert r.status == 401
            async with session.post(f"{url}/setup", headers=good, data=b"{not json") as r:
                assert r.status == 400 and "not JSON" in (await r.json())["error"]
            async with session.post(f"{url}/setup", headers=good, json={"project": "1.2", "schema": "<View/>"}) as r:
                assert r.status == 400 and "image classification" in (await r.json())["error"]
            async with session.post(f"{url}/predict", headers=good, json={"tasks": "no"}) as r:
                assert r.status == 400 and "list of task objects" in (await r.json())["error"]
            async with session.post(f"{url}/webhook", headers=good, json={"action": "PROJECT_UPDATED"}) as r:
                assert r.status == 201  # other events are acknowledged and ignored
        finally:
            await runner.cleanup()


def test_project_models_option():
    assert parse_project_models("3=cats, 7=birds") == {"3": "cats", "7": "birds"}
    assert parse_project_models("") == {}
    with pytest.raises(InvalidArgument, match="PROJECT_ID=MODEL"):
        parse_project_models("cats")


class FakePrelabel:
    """Only for the Learner's bookkeeping; the real gateway is in test_labelstudio.py."""

    def __init__(self, states: list[int]) -> None:
        self.states = states
        self.refreshed = 0

    async def watch(self, job_id: str):  # type: ignore[no-untyped-def]
        from prelabel.v1 import prelabel_pb2 as pb

        for k, state in enumerate(self.states):
            yield pb.Job(id=job_id, state=state, progress=k / len(self.states), output_model="labelstudio-5",
                         error="trainer ran out of memory" if state == pb.FAILED else "")  # fmt: skip

    async def models(self, fresh: bool = False):  # type: ignore[no-untyped-def]
        self.refreshed += fresh


async def test_a_failed_job_is_reported_and_nothing_is_published(caplog):
    from prelabel import metrics
    from prelabel.v1 import prelabel_pb2 as pb

    fake = FakePrelabel([pb.QUEUED, pb.RUNNING, pb.FAILED])
    learner = Learner(Backend(fake, Options(), session=None), 0, 1)  # type: ignore[arg-type]

    def failures() -> float:
        return metrics.REGISTRY.get_sample_value("prelabel_labelstudio_training_runs_total", {"outcome": "failed"}) or 0

    before = failures()
    job = await learner.follow("5", "j1")
    assert job.state == pb.FAILED and fake.refreshed == 0  # the served version is not touched
    assert failures() == before + 1
    assert "ended FAILED: trainer ran out of memory; the current model keeps serving" in caplog.text


async def test_a_trigger_during_a_run_runs_it_once_more():
    import asyncio

    runs: list[str] = []
    gate = asyncio.Event()

    class Counting(Learner):
        async def train(self, pid: str):  # type: ignore[no-untyped-def]
            runs.append(pid)
            await gate.wait()

    learner = Counting(Backend(None, Options(), session=None), 2, 1)  # type: ignore[arg-type]
    learner.event({"action": "ANNOTATION_CREATED", "project": {"id": 5}})
    assert runs == []  # one change of the two that start a run
    learner.event({"action": "ANNOTATION_UPDATED", "project": {"id": 5}})
    await asyncio.sleep(0)
    learner.event({"action": "START_TRAINING", "project": {"id": 5}})
    learner.event({"action": "START_TRAINING", "project": {"id": 5}})  # coalesced with the one before
    assert runs == ["5"]
    gate.set()
    await learner.running["5"]
    assert runs == ["5", "5"]
