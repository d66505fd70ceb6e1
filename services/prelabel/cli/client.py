"""Client commands: ``prelabel predict`` (streams folders through PredictStream) and ``prelabel models``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from prelabel.errors import InvalidArgument, Unavailable
from prelabel.preprocessing import IMAGE_SUFFIXES
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc

MAX_MESSAGE = 256 * 1024 * 1024


def image_files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidArgument(f"{path} does not exist")
    return found


@contextlib.contextmanager
def channel(server: str, timeout: float) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        server,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)],
    ) as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=min(timeout, 30))
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no Prelabel gateway answers at {server}; start one with `prelabel serve`") from None
        yield ch


def _fail(exc: grpc.RpcError) -> int:
    print(f"prelabel: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


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
    batch: list[Path] = []
    size = 0
    for path in files:
        n = path.stat().st_size
        if batch and (len(batch) == count or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        yield batch


def predict(server: str, args: argparse.Namespace) -> int:
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
    failed = 0
    try:
        with (
            channel(server, args.timeout) as ch,
            tqdm(total=len(files), unit="img", disable=args.no_progress, file=sys.stderr) as bar,
        ):
            stub = rpc.PredictionServiceStub(ch)
            for batch, response in zip(batches, stub.PredictStream(requests(), timeout=None), strict=False):
                for path, p in zip(batch, response.predictions, strict=True):
                    failed += p.HasField("error")
                    out.write(json.dumps(prediction_json(path, response, p)) + "\n")
                bar.update(len(batch))
    except grpc.RpcError as exc:
        return _fail(exc)
    finally:
        if args.out:
            out.close()
    print(
        f"pre-labeled {len(files) - failed} of {len(files)} images"
        + (f"; {failed} could not be used" if failed else "")
        + (f"; wrote {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


def models(server: str, timeout: float) -> int:
    try:
        with channel(server, timeout) as ch:
            response = rpc.ModelServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"{'MODEL':<24} {'VERSION':>7} {'READY':<5} {'ARCH':<20} {'CLASSES':>7}  BASE")
    for model in response.models:
        for v in model.versions:
            name = model.name + (" (default)" if model.name == response.default_model else "")
            ready = "yes" if v.ready else "no"
            print(f"{name:<24} {v.version:>7} {ready:<5} {v.architecture:<20} {len(v.labels):>7}  {v.base_model}")
    return 0


def _code_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
