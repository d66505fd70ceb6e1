"""``prelabel labelstudio``: Label Studio's ML-backend protocol over HTTP (aiohttp), in front of the gateway.

Label Studio calls ``/health`` (1 s timeout), ``/setup`` (3 s, before every prediction run),
``/predict`` (100 s), ``/webhook`` (1 s: answered at once, the work runs in the background) and
``/versions``. ``/metrics`` is for Prometheus. With basic auth configured every path but ``/health``
and ``/metrics`` requires it (Label Studio's ``auth_method: BASIC_AUTH``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prelabel import metrics
from prelabel.cli.client import Credentials
from prelabel.errors import InvalidArgument, PrelabelError, Unavailable
from prelabel.labelstudio.backend import Backend, Options
from prelabel.labelstudio.learning import Learner
from prelabel.labelstudio.remote import Prelabel
from prelabel.settings import Settings
from prelabel.spec import STRATEGIES, full_name, short_name
from prelabel.v1 import prelabel_pb2 as pb

log = logging.getLogger("prelabel.labelstudio")

PATHS = ("/health", "/setup", "/predict", "/webhook", "/versions", "/train", "/metrics")
OPEN_PATHS = ("/health", "/metrics")
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 413, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503}  # fmt: skip
BACKEND = web.AppKey("backend", Backend)
LEARNER = web.AppKey("learner", Learner)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=HTTP_STATUS.get(code, 502))


@web.middleware
async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Metrics for every call, and errors as JSON that say what to do (the one place that maps them)."""
    path = request.path if request.path in PATHS else "other"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own answers (401, 404, 405): counted, then re-raised
        metrics.LS_REQUESTS.labels(path, str(exc.status)).inc()
        raise
    except PrelabelError as exc:
        response = error_response(exc.code.name, exc.message)
    except grpc.aio.AioRpcError as exc:
        log.warning("%s: the Prelabel gateway answered %s: %s", path, exc.code().name, exc.details())
        response = error_response(exc.code().name, f"Prelabel gateway: {exc.code().name}: {exc.details()}")
    except (ValueError, TypeError, KeyError) as exc:  # a body that is not what the protocol says
        response = error_response("INVALID_ARGUMENT", f"malformed request to {path}: {exc!r}")
    metrics.LS_REQUESTS.labels(path, str(response.status)).inc()
    metrics.LS_LATENCY.labels(path).observe(time.perf_counter() - started)
    return response


def basic_auth(user: str, password: str) -> Any:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if request.path not in OPEN_PATHS and not hmac.compare_digest(given, expected):
            raise web.HTTPUnauthorized(
                text='{"error": "basic auth required: set it on the ML backend in Label Studio"}',
                content_type="application/json", headers={"WWW-Authenticate": 'Basic realm="prelabel"'},
            )  # fmt: skip
        return await handler(request)

    return check


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidArgument(f"the body of {request.path} is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"the body of {request.path} must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP", "model_class": "Prelabel"})


async def setup(request: web.Request) -> web.Response:
    body = await _json(request)
    backend = request.app[BACKEND]
    project = backend.remember(body.get("project"), str(body.get("schema", "")), str(body.get("hostname") or ""),
                               str(body.get("access_token") or ""))  # fmt: skip
    backend.authorize_webhook(project)
    return web.json_response({"model_version": await backend.model_version(project.id)})


async def predict(request: web.Request) -> web.Response:
    body = await _json(request)
    backend = request.app[BACKEND]
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise InvalidArgument("tasks must be a list of task objects")
    pid = body.get("project") or (tasks[0].get("project") if tasks else None)
    schema = body.get("label_config")
    project = backend.remember(pid, str(schema)) if schema else backend.projects.get(str(pid).split(".", 1)[0])
    if project is None:
        raise InvalidArgument("unknown project: send label_config or call /setup first")
    started = time.perf_counter()
    results = await backend.predict(project, tasks)
    log.info("project %s: %d tasks pre-labelled in %.2f s", project.id, len(tasks), time.perf_counter() - started)
    return web.json_response({"results": results})


async def webhook(request: web.Request) -> web.Response:
    request.app[LEARNER].event(await _json(request))
    return web.json_response({"status": "ok"}, status=201)


async def train(request: web.Request) -> web.Response:
    """Older Label Studio versions POST /train; newer ones send START_TRAINING to /webhook."""
    body = await _json(request)
    request.app[LEARNER].event({**body, "action": "START_TRAINING"})
    return web.json_response({"status": "ok"}, status=201)


async def versions(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    models = await backend.prelabel.models()
    return web.json_response({"versions": [f"{m.name}@{v.version}" for m in models.models for v in m.versions]})


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(metrics.LABELSTUDIO_REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def application(backend: Backend, learner: Learner, auth: tuple[str, str] | None = None) -> web.Application:
    middlewares = [observed] + ([basic_auth(*auth)] if auth else [])
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app[BACKEND] = backend
    app[LEARNER] = learner
    app.add_routes([
        web.get("/health", health), web.get("/", health), web.post("/setup", setup), web.post("/predict", predict),
        web.post("/webhook", webhook), web.post("/train", train), web.get("/versions", versions),
        web.get("/metrics", metrics_page),
    ])  # fmt: skip
    return app


async def serve(host: str, port: int, prelabel: Prelabel, options: Options, train_every: int, strategy: int,
                auth: tuple[str, str] | None, ready: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Run until SIGTERM or SIGINT."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        backend = Backend(prelabel, options, session)
        learner = Learner(backend, train_every, strategy)
        runner = web.AppRunner(application(backend, learner, auth), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await prelabel.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's strerror repeats the address
            raise Unavailable(f"cannot listen on {host}:{port} ({why}); choose another port with --port "
                              "or PRELABEL_LABELSTUDIO_PORT") from None  # fmt: skip
        bound = runner.addresses[0][1]
        print(f"Prelabel Label Studio backend listening on http://{host}:{bound}", flush=True)
        log.info("Label Studio ML backend on http://%s:%d (gateway %s); connect it in Label Studio: Settings > "
                 "Model > Connect Model, or POST /api/ml", host, bound, prelabel.target)  # fmt: skip
        if ready:
            ready(bound)
        try:
            await learner.resume()
        except grpc.aio.AioRpcError as exc:
            log.warning("could not list unfinished jobs on the gateway (%s); they are not followed", exc.code().name)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: training runs in progress go on in Prelabel; a restart follows them again")
        await runner.cleanup()
        await prelabel.close()


def run(settings: Settings, server: str, credentials: Credentials, timeout: float) -> int:
    """The ``prelabel labelstudio`` command: its options come from ``settings`` (flags or PRELABEL_LABELSTUDIO_*)."""
    settings.configure_logging()
    strategy = full_name(settings.labelstudio_strategy)
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"strategy {settings.labelstudio_strategy!r}: choose one of "
                              f"{', '.join(short_name(s) for s in STRATEGIES)}")  # fmt: skip
    auth = None
    if settings.labelstudio_basic_auth:
        user, sep, password = settings.labelstudio_basic_auth.partition(":")
        if not sep or not user:
            raise InvalidArgument("basic auth must be USER:PASSWORD (PRELABEL_LABELSTUDIO_BASIC_AUTH)")
        auth = (user, password)
    options = Options(
        model=settings.labelstudio_model,
        project_models=parse_project_models(settings.labelstudio_project_models),
        label_studio_url=settings.labelstudio_url.rstrip("/"),
        label_studio_token=settings.labelstudio_api_token,
        batch_size=max(1, min(settings.labelstudio_batch_size, settings.max_images_per_request)),
        max_image_bytes=settings.max_image_bytes,
        max_top_k=settings.max_top_k,
        basic_auth=auth,
    )

    async def main() -> None:
        prelabel = Prelabel(server, credentials, timeout)
        await serve(settings.labelstudio_host, settings.labelstudio_port, prelabel, options,
                    settings.labelstudio_train_every, pb.Strategy.Value(strategy), auth)  # fmt: skip

    try:
        asyncio.run(main())
    except PrelabelError as exc:  # as `prelabel gateway` does: what went wrong and what to do, exit status 1
        log.error("%s", exc.message)
        return 1
    return 0


def parse_project_models(text: str) -> dict[str, str]:
    """``"3=cats,7=birds"`` -> ``{"3": "cats", "7": "birds"}``."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        project, sep, model = item.partition("=")
        if not sep or not project.strip().isdigit() or not model.strip():
            raise InvalidArgument(f"project model {item!r}: use PROJECT_ID=MODEL, separated by commas")
        pairs[project.strip()] = model.strip()
    return pairs
