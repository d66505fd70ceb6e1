"""Client commands: ``prelabel predict`` (streams folders through PredictStream) and ``prelabel models``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from prelabel.batching import bounded
from prelabel.datasets.folder import images_under
from prelabel.errors import InvalidArgument, Unavailable
from prelabel.labelstudio import export
from prelabel.preprocessing import IMAGE_SUFFIXES
from prelabel.settings import Settings
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc

MAX_MESSAGE = 256 * 1024 * 1024

# Calls that are safe to send again are retried on UNAVAILABLE, within the call's own deadline: a gateway
# worker that dies resets the connections queued on it, and a gateway being rolled out or a Triton restart
# answers UNAVAILABLE for a moment. CreateFineTuneJob is safe because our clients always set request_id;
# UploadExamples (append) is not, so it is left out. grpc's service config, as in its retry example.
RETRIED_ON_UNAVAILABLE = [
    {"service": "prelabel.v1.PredictionService"},
    {"service": "prelabel.v1.ModelService"},
    {"service": "prelabel.v1.JobService"},
    {"service": "prelabel.v1.DatasetService", "method": "GetDataset"},
    {"service": "prelabel.v1.DatasetService", "method": "ListDatasets"},
    {"service": "grpc.health.v1.Health"},
]
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def channel_options() -> list[tuple[str, Any]]:
    """The options every Prelabel client channel uses (sync or aio): message limits and the retry policy."""
    service_config = {"methodConfig": [{"name": RETRIED_ON_UNAVAILABLE, "retryPolicy": RETRY_POLICY}]}
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config)),
    ]


def image_files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(images_under(path))
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidArgument(f"{path} does not exist")
    return found


@dataclass(frozen=True)
class Credentials:
    """How a client proves itself: a bearer token, TLS (a CA to trust), mutual TLS (its own certificate)."""

    token: str = ""
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        return cls(settings.token, settings.ca_cert, settings.client_cert, settings.client_key)

    @property
    def tls(self) -> bool:
        return bool(self.ca_cert or self.client_cert)

    def ssl(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
            private_key=self.client_key.read_bytes() if self.client_key else None,
            certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
        )


_INTERCEPTORS: tuple[Any, ...] = (
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
)


class _BearerToken(*_INTERCEPTORS):  # type: ignore[misc]
    """Adds ``authorization: Bearer TOKEN`` to every call (works on plaintext channels too, unlike call credentials)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or []), self.header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    intercept_stream_stream = intercept_stream_unary


@contextlib.contextmanager
def channel(server: str, timeout: float, credentials: Credentials | None = None) -> Iterator[grpc.Channel]:
    creds = credentials or Credentials()
    options = channel_options()
    if creds.tls:
        raw = grpc.secure_channel(server, creds.ssl(), options=options)
    else:
        raw = grpc.insecure_channel(server, options=options)
    with raw:
        try:
            grpc.channel_ready_future(raw).result(timeout=min(timeout, 30))
        except grpc.FutureTimeoutError:
            raise Unavailable(
                f"no Prelabel gateway answers at {server}"
                + (" over TLS (check --ca-cert and --client-cert)" if creds.tls else "")
                + "; start one with `prelabel serve`"
            ) from None
        yield grpc.intercept_channel(raw, _BearerToken(creds.token)) if creds.token else raw


def prediction_json(path: Path, response: pb.PredictResponse, p: pb.Prediction) -> dict[str, Any]:
    line: dict[str, Any] = {"path": str(path), "model": response.model, "version": response.version}
    if p.HasField("error"):
        line["error"] = {"code": _code_name(p.error.code), "message": p.error.message}
        return line
    line["labels"] = [{"name": label.name, "score": round(label.score, 6)} for label in p.labels]
    line["uncertainty"] = {
        "entropy": round(p.uncertainty.entropy, 6),
        "margin": round(p.uncertainty.margin, 6),
        "least_confidence": round(p.uncertainty.least_confidence, 6),
    }
    line["auto_accept"] = p.auto_accept
    if p.embedding:
        line["embedding"] = [round(v, 6) for v in p.embedding]
    return line


def batched(files: list[Path], count: int, max_bytes: int) -> Iterator[list[Path]]:
    """Batches of at most ``count`` files and ``max_bytes`` (a larger file travels alone)."""
    return bounded(files, lambda path: path.stat().st_size, max_bytes, count)


# predict's exit status when some images could not be used: every line is written, so a script can
# tell "all pre-labeled" (0) from "look at the errors" (3) from "nothing happened" (1, 2).
SOME_UNUSABLE = 3


def predict(server: str, creds: Credentials, args: argparse.Namespace) -> int:
    files = image_files(args.paths)
    if not files:
        raise InvalidArgument(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, args.paths))}"
        )
    batches = list(batched(files, args.batch_size, args.max_request_bytes))

    def requests() -> Iterator[pb.PredictRequest]:
        for batch in batches:  # read lazily: a folder of any size streams in constant memory
            yield pb.PredictRequest(
                model=args.model,
                version=args.version,
                top_k=args.top_k,
                include_embedding=args.embedding,
                images=[pb.Image(id=str(i), content=path.read_bytes()) for i, path in enumerate(batch)],
            )

    out: TextIO = args.out.open("w") if args.out else sys.stdout
    names = export.Names(args.ls_from_name, args.ls_to_name, args.ls_data_key, args.ls_url_prefix)
    studio = args.format == "labelstudio"
    failed = written = 0
    try:
        with (
            channel(server, args.timeout, creds) as ch,
            tqdm(total=len(files), unit="img", disable=args.no_progress, file=sys.stderr) as bar,
        ):
            stub = rpc.PredictionServiceStub(ch)
            try:
                for batch, response in zip(batches, stub.PredictStream(requests(), timeout=None), strict=False):
                    for path, p in zip(batch, response.predictions, strict=True):
                        failed += p.HasField("error")
                        if studio:  # one JSON list, written as it streams
                            task = export.task(path, response, p, names)
                            out.write(("[\n" if not written else ",\n") + json.dumps(task))
                        else:
                            out.write(json.dumps(prediction_json(path, response, p)) + "\n")
                        written += 1
                    bar.update(len(batch))
            except grpc.RpcError:
                bar.leave = False  # the error alone says what happened, not a 0% bar above it
                raise
        if studio:
            out.write("\n]\n" if written else "[]\n")
    finally:
        if args.out:
            out.close()
    print(
        f"pre-labeled {len(files) - failed} of {len(files)} images"
        + (f"; {failed} could not be used" if failed else "")
        + (f"; wrote {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return SOME_UNUSABLE if failed else 0


def models(server: str, creds: Credentials, args: argparse.Namespace) -> int:
    with channel(server, args.timeout, creds) as ch:
        response = rpc.ModelServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=args.timeout)
    print(f"{'MODEL':<24} {'VERSION':>7} {'READY':<5} {'ARCH':<20} {'CLASSES':>7}  BASE")
    for model in response.models:
        for v in model.versions:
            name = model.name + (" (default)" if model.name == response.default_model else "")
            ready = "yes" if v.ready else "no"
            print(f"{name:<24} {v.version:>7} {ready:<5} {v.architecture:<20} {len(v.labels):>7}  {v.base_model}")
    if any(not v.ready for m in response.models for v in m.versions):
        print("READY no: still loading, or older than the newest versions Triton keeps loaded "
              "(PRELABEL_TRITON_LOADED_VERSIONS on the server)", file=sys.stderr)  # fmt: skip
    return 0


def _code_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def health(server: str, creds: Credentials, settings: Settings, args: argparse.Namespace) -> int:
    """0 when the gateway's grpc.health.v1 says SERVING (or, with --metrics, when /metrics answers)."""
    if args.metrics:
        host = settings.metrics_address
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response:
                return 0 if response.status == 200 else 1
        except OSError as exc:
            print(f"prelabel: {url} does not answer ({exc})", file=sys.stderr)
            return 1
    with channel(server, args.timeout, creds) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout).status
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(name)
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
