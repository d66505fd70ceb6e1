#!/usr/bin/env python3
"""Prelabel on a GPU against raw torch on the same GPU and model, one run (issue 13's targets).

    .venv/bin/python bench/gpu.py                       # ResNet-50, 224 px, batch 64, on cuda
    .venv/bin/python bench/gpu.py --quick --device cpu  # the same, small, on the CPU (tests/test_benches.py)

Measures, with the same network (random weights, 1000 classes, saved to a weights file and served as
``PRELABEL_BASE_WEIGHTS=ARCH:file``, as production serves its ImageNet bases) and the same JPEG photos
(random crops of scikit-learn's sample photos, 40-150 KB):

1. raw torch, compute only: pre-decoded pixels, fp16 autocast, channels-last (images/s; batch 1 p50);
2. the in-process pipeline: ``Runner.run`` on the encoded JPEGs (decode + forward), with nvJPEG on the
   device and with Pillow on the CPU;
3. straight to Triton (``prelabel serve``'s embedded Triton, ``KIND_GPU`` instances) and 4. through
   the gateway (``Predict``), and through ``--gateway-workers`` gateway processes on the same Triton,
   alternated so that noise hits all alike: saturation (batch ``--batch``, ``--concurrency`` clients),
   batch 1 with one client (p50), and mixed request sizes at full concurrency (p50, p99); batch 1
   also through ``bench/bare_proxy.py``, which splits the gateway's added p50 into the hop itself and
   Prelabel's own work;
5. training: a raw torch loop (AdamW, bf16 autocast, channels-last, resident pixels) against
   Prelabel's training loop (``loop.fit``, full fine-tune recipe), images/s.

It prints the ratios the targets are stated in: gateway / raw torch (>= 0.70), gateway / Triton
(>= 0.95), batch-1 p50 added by the gateway (<= 1 ms), Prelabel / raw training (>= 0.60).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.util
import io
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bare_proxy
from bench.gateway_vs_triton import cpu_seconds, load, pct
from prelabel.models import backbones, device_decode, resample
from prelabel.models.runner import Runner
from prelabel.preprocessing import Preprocess
from prelabel.training import loop
from prelabel.training.data import Examples
from prelabel.training.strategy import FULL_FINE_TUNE
from prelabel.triton.client import TritonClient
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.stack import Stack, wait_for_health


def photos(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of random crops (300-900 px) of the sample photos: distinct files, camera-like sizes."""
    rng = np.random.default_rng(seed)
    # The JPEGs inside scikit-learn, read without importing it (its SciPy may not match the numpy here).
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations, "scikit-learn (its sample photos) is missing"
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    sources = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.jpg"))]
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        w = int(rng.integers(300, src.width))
        h = int(w * rng.uniform(0.6, 0.75))
        left, top = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, max(1, src.height - h + 1)))
        crop = src.crop((left, top, left + w, min(src.height, top + h)))
        crop = crop.resize((int(crop.width * 1.4), int(crop.height * 1.4)))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, seconds: float) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """Calls of ``fn`` (returning its image count) for ``seconds``: (images/s, per-call latencies)."""
    fn()
    sync(device)
    latencies, images, stop = [], 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < stop:
        t = time.perf_counter()
        images += fn()
        sync(device)
        latencies.append(time.perf_counter() - t)
    return images / (time.perf_counter() - started), latencies


def raw_inference(model: backbones.Classifier, pixels: torch.Tensor, normalize: backbones.Normalizer,
                  device: torch.device, seconds: float) -> tuple[float, float]:  # fmt: skip
    """(images/s at the batch of ``pixels``, batch-1 p50 ms): decoded pixels already on the device."""
    on_device = pixels.to(device)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> int:
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            model(normalize(x))
        return len(x)

    rate, _ = timed(lambda: forward(on_device), device, seconds)
    _, latencies = timed(lambda: forward(on_device[:1]), device, seconds / 2)
    return rate, pct(latencies, 50)


def raw_training(arch: str, size: int, batch: int, device: torch.device, steps: int) -> float:
    """images/s of a plain AdamW loop on resident random pixels: the ceiling for Prelabel's loop."""
    model = backbones.build(arch, 10, size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels = torch.randint(0, 256, (batch * 4, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch * 4,), device=device)
    amp = loop.autocast_dtype(device)

    def step(i: int) -> None:
        index = torch.arange(i % 4 * batch, (i % 4 + 1) * batch, device=device)
        x = pixels[index].float().div_(255)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            loss = F.cross_entropy(model(x)[0], labels[index])
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()

    for i in range(3):  # warm-up (cuDNN picks its algorithms)
        step(i)
    sync(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return steps * batch / (time.perf_counter() - started)


def prelabel_training(arch: str, size: int, device: torch.device, steps: int) -> tuple[float, int]:
    """(images/s, batch) of ``loop.fit`` with the full fine-tune recipe on 2,048 decoded images."""
    n = 2048
    train = Examples(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8),
                     torch.randint(0, 10, (n,)), [str(i) for i in range(10)])  # fmt: skip
    recipe = loop.recipe(FULL_FINE_TUNE, n)
    normalize = backbones.Normalizer(backbones.architecture(arch).imagenet_preprocess(), device)

    def fit(steps: int) -> None:
        model = backbones.build(arch, 10, size)
        loop.fit(model, [], train, None, normalize, replace(recipe, steps=steps), 0, lambda *_: None, lambda: False)

    fit(3)  # warm-up
    sync(device)
    started = time.perf_counter()
    fit(steps)
    sync(device)
    return steps * recipe.batch_size / (time.perf_counter() - started), recipe.batch_size


def gpu_memory() -> str:
    """GPU memory of each process on the card (Triton's instances among them), from nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    query = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip().replace("\n", "; ")


def breakdown(runner: Runner, jpegs: list[bytes], device: torch.device, seconds: float) -> dict[str, float]:
    """Where the in-process pipeline's time goes, per batch (ms): the header check, nvJPEG decode
    alone, decode + resize/crop, the whole ``Runner.run``; on a GPU also a profile of one call, kernels by time."""
    preprocess, n = runner.card.preprocess, len(jpegs)
    decoded = [f for f in device_decode.decode_jpegs(jpegs, device, [1] * n) if f is not None]
    steps = {
        "header check": lambda: sum(device_decode._nvjpeg_frame(c, 0) is not None for c in jpegs),
        "header check with Pillow (before 2026-12-05)": lambda: sum(pillow_header(c, 0) is not None for c in jpegs),
        "decode": lambda: len(device_decode.decode_jpegs(jpegs, device, [1] * n)),
        "decode + resize/crop": lambda: len(device_decode.decode_batch(jpegs, preprocess, device, [0] * n)),
        "resize/crop alone": lambda: len(resample.resize_crop(decoded, preprocess)),
        "resize/crop alone, grouped by size (before 2026-12-05)": lambda: len(grouped_resize(decoded, preprocess)),
        "Runner.run": lambda: len(runner.run(jpegs).error_codes),
    }
    out = {label: 1000 * n / timed(fn, device, seconds / 2)[0] for label, fn in steps.items()}
    print("per batch of", n, ":", ", ".join(f"{k} {v:.2f} ms" for k, v in out.items()), flush=True)
    for label, fn in (("batched", resample.resize_crop), ("grouped by size", grouped_resize)):
        calls = launches(functools.partial(fn, decoded, preprocess))
        print(f"resize/crop {label}: {calls} operator calls that run a kernel, per batch", flush=True)
    if device.type == "cuda":
        nvimgcodec_decoding(jpegs, decoded, device, seconds / 2)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.run(jpegs)
            sync(device)
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)
    return out


def nvimgcodec_decoding(jpegs: list[bytes], reference: list[torch.Tensor], device: torch.device,
                        seconds: float) -> None:  # fmt: skip
    """nvImageCodec's batched decode beside torchvision's nvJPEG (a lever not yet in Prelabel: it can use
    the JPEG hardware decoders of an A100/H100/H200, which take Huffman decoding off the CPU that caps
    the GPU path). Each backend kind's images/s, and its pixels against torchvision's (mean difference
    in levels). Carried by ``bench/gpu_extras.sh``; absent, it says so and the bench goes on."""
    try:
        nvimgcodec: Any = importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        print(f"nvImageCodec: not installed ({exc}); run bench/gpu_extras.sh after prepare.sh", flush=True)
        return
    kinds = {"default": None, "hardware only": "HW_GPU_ONLY", "CUDA only": "GPU_ONLY", "hybrid": "HYBRID_CPU_GPU"}
    for label, kind in kinds.items():
        try:
            backends = None if kind is None else [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))]
            decoder = nvimgcodec.Decoder(device_id=device.index or 0, backends=backends)

            def decode(decoder=decoder) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
                return [torch.as_tensor(im, device=device) for im in decoder.decode(jpegs) if im is not None]

            got = decode()
            if len(got) != len(reference):
                print(f"nvImageCodec {label}: decoded {len(got)} of {len(reference)}", flush=True)
                continue
            rate = timed(lambda decode=decode: len(decode()), device, seconds)[0]
            diff = statistics.mean((g.permute(2, 0, 1).float() - r.float()).abs().mean().item()
                                   for g, r in zip(got, reference, strict=True))  # fmt: skip
            print(
                f"nvImageCodec {label}: {rate:,.0f} images/s, {1000 * len(jpegs) / rate:.2f} ms per batch, "
                f"{diff:.2f} levels from torchvision's decode",
                flush=True,
            )
        except Exception as exc:  # a backend this card or build lacks: say so, measure the rest
            print(f"nvImageCodec {label}: failed: {exc}", flush=True)


def pillow_header(content: bytes, max_pixels: int) -> int | None:
    """The GPU path's header check before 2026-12-05 (the baseline of ``jpeg_frame``): ``Image.open``."""
    if not content[-4096:].rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(content))
    except Exception:
        return None
    pixels = image.width * image.height
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or (max_pixels and pixels > max_pixels):
        return None
    return pixels


# Operators that only make views, allocate or forward to another operator: no kernel of their own.
NO_KERNEL = {"as_strided", "slice", "select", "unsqueeze", "expand", "view", "_unsafe_view", "reshape", "permute",
             "transpose", "unbind", "alias", "empty", "empty_strided", "empty_like", "resolve_conj", "lift_fresh",
             "to", "_to_copy", "resize_", "matmul", "zeros", "__and__", "rsub", "clone"}  # fmt: skip


def launches(fn: Callable[[], object]) -> int:
    """Operator calls made by ``fn`` that run a kernel (a launch each on a GPU), from torch's profiler;
    the same count on the CPU, so it can be compared where there is no GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.key[6:] not in NO_KERNEL)


def grouped_resize(images: list[torch.Tensor], preprocess: Preprocess) -> list[torch.Tensor]:
    """The GPU path's resize before 2026-12-05 (the baseline of ``resample.resize_crop``): images of one
    size resized together with ``F.interpolate``, so photos of many sizes cost operator calls each."""
    crop = preprocess.crop
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for n, image in enumerate(images):
        groups[(image.shape[1], image.shape[2])].append(n)
    mode = preprocess.interpolation if preprocess.interpolation in ("bilinear", "bicubic") else "nearest"
    batch = torch.empty((len(images), 3, crop, crop), device=images[0].device)
    for (height, width), members in groups.items():
        side = crop * min(height, width) / preprocess.resize
        s = max(1, round(side))
        top, left = round((height - side) / 2), round((width - side) / 2)
        squares = [images[n][:, top : top + s, left : left + s] for n in members]
        x = (torch.stack(squares) if len(squares) > 1 else squares[0][None]).float()
        if mode == "nearest":
            y = F.interpolate(x, size=(crop, crop), mode="nearest")
        else:
            y = F.interpolate(x, size=(crop, crop), mode=mode, antialias=True, align_corners=False)
        if len(members) == len(images):
            batch = y
        else:
            for k, n in enumerate(members):
                batch[n] = y[k]
    return list(batch.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1))


async def serving(stack: Stack, name: str, jpegs: list[bytes], args: argparse.Namespace,
                  workers: Stack | None = None) -> dict[str, float]:  # fmt: skip
    """Straight to Triton, through the gateway (and through ``workers``), alternated: saturation rates,
    batch-1 p50s, and p50/p99 of mixed request sizes (1 to ``--batch`` images) at full concurrency.
    Batch 1 also through ``bench/bare_proxy.py`` (``proxy_p50``): what one Python gRPC hop costs by itself.

    Each client has a connection of its own (several gateway processes share connections, not calls),
    and the requests are built once, so that the client process measures servers, not protobuf.
    """
    with bare_proxy.started(stack.triton_url) as (proxy_address, _):
        return await _serving(stack, name, jpegs, args, workers, TritonClient(proxy_address))


async def _serving(stack: Stack, name: str, jpegs: list[bytes], args: argparse.Namespace, workers: Stack | None,
                   proxied: TritonClient) -> dict[str, float]:  # fmt: skip
    triton = TritonClient(stack.triton_url)
    options = [("grpc.max_send_message_length", 256 * 2**20), ("grpc.use_local_subchannel_pool", 1)]
    paths: dict[str, Stack] = {"gateway": stack, **({"workers": workers} if workers else {})}
    channels = {label: [grpc.aio.insecure_channel(s.address, options=options) for _ in range(args.concurrency)]
                for label, s in paths.items()}  # fmt: skip
    stubs = {label: itertools.cycle([rpc.PredictionServiceStub(c) for c in cs]) for label, cs in channels.items()}
    requests: dict[int, pb.PredictRequest] = {}

    def predict(label: str) -> Callable[[list[bytes]], Awaitable[None]]:
        async def call(batch: list[bytes]) -> None:
            key = id(batch)
            if key not in requests:
                requests[key] = pb.PredictRequest(model=name, images=[pb.Image(content=c) for c in batch])
            await next(stubs[label]).Predict(requests[key], timeout=120)

        return call

    async def direct(batch: list[bytes]) -> None:
        await triton.infer(name, "", batch, False, 120)

    async def proxy(batch: list[bytes]) -> None:
        await proxied.infer(name, "", batch, False, 120)

    calls = {"direct": direct, **{label: predict(label) for label in paths}}
    sizes = [n for n in (1, 4, 16, 64) if n <= args.batch]
    mixed_batches = [jpegs[i : i + n] for i, n in enumerate(sizes * 8)]
    for call in (*calls.values(), proxy):
        await load(call, jpegs[: args.batch], 2, 2.0)
    proxy_latencies: list[float] = []
    gateway_cpu: list[tuple[float, float]] = []  # (CPU seconds, calls) per saturation run
    rates: dict[str, list[float]] = {label: [] for label in calls}
    latencies: dict[str, list[float]] = {label: [] for label in calls}
    mixed: dict[str, list[float]] = {label: [] for label in calls}
    for r in range(args.rounds):
        for label, call in calls.items():
            offset = (r * args.batch) % max(1, len(jpegs) - args.batch)
            batch = jpegs[offset : offset + args.batch]
            before = cpu_seconds(stack.process.popen.pid)
            rate, _ = await load(call, batch, args.concurrency, args.seconds)
            rates[label].append(rate)
            if label == "gateway":  # its own CPU (Triton is a child: not counted) at saturation
                gateway_cpu.append((cpu_seconds(stack.process.popen.pid) - before, rate * args.seconds / len(batch)))
            _, lat = await load(call, jpegs[r : r + 1], 1, args.seconds / 2)
            latencies[label].extend(lat)
            picks = iter(itertools.cycle(mixed_batches))

            async def any_size(_: list[bytes], call=call, picks=picks) -> None:  # type: ignore[no-untyped-def]
                await call(next(picks))

            _, lat = await load(any_size, batch, args.concurrency, args.seconds / 2)
            mixed[label].extend(lat)
        _, lat = await load(proxy, jpegs[r : r + 1], 1, args.seconds / 2)
        proxy_latencies.extend(lat)
    for cs in channels.values():
        for c in cs:
            await c.close()
    await triton.close()
    await proxied.close()
    result = {"proxy_p50": pct(proxy_latencies, 50)}
    cpu, served_calls = map(sum, zip(*gateway_cpu, strict=True))
    result["gateway_cpu_ms_per_call"] = cpu / served_calls * 1000
    result["gateway_cores"] = cpu / (args.seconds * len(gateway_cpu))
    for label in calls:
        result[label] = statistics.median(rates[label])
        result[f"{label}_p50"] = pct(latencies[label], 50)
        result[f"{label}_mixed_p50"], result[f"{label}_mixed_p99"] = pct(mixed[label], 50), pct(mixed[label], 99)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of Triton and the gateway")
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument(
        "--instances",
        type=int,
        nargs="+",
        default=[0],
        help="Triton instances per GPU, one server each; the table shows the first (0: the default)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=4,
        help="also measure a `prelabel gateway` with this many processes on the same Triton (1: not)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks that the script works")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.batch, args.concurrency, args.seconds, args.rounds = "resnet18", 8, 2, 1.0, 1
        args.images, args.train_steps = 16, 2
    device = torch.device(args.device)
    name = args.arch.replace("_", "-")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU)"
    print(
        f"{args.arch} on {gpu}; batch {args.batch}, {args.concurrency} clients, torch {torch.__version__}", flush=True
    )

    data_dir = Path(tempfile.mkdtemp(prefix="prelabel-gpu-bench-"))
    weights = data_dir / f"{args.arch}.pth"
    torch.save(backbones.build(args.arch, 1000).state_dict(), weights)
    jpegs = photos(args.images)
    print(f"{len(jpegs)} JPEGs, {min(map(len, jpegs)) // 1024}-{max(map(len, jpegs)) // 1024} KB", flush=True)

    kind = "KIND_GPU" if device.type == "cuda" else "KIND_CPU"

    def serve(instances: int) -> Stack:
        return Stack.serve(data_dir, default_model=name, base_weights=f"{args.arch}:{weights}",
                           triton_instance_kind=kind, triton_instance_count=instances,
                           triton_max_batch_size=args.batch, max_images_per_request=max(64, args.batch))  # fmt: skip

    stack = serve(args.instances[0])
    workers: Stack | None = None
    try:
        wait_for_health(stack.address, timeout=600)
        version = data_dir / "models" / name / "1"
        runner = Runner(version, device=str(device), max_batch=args.batch)
        decoded = torch.stack([torch.as_tensor(d) for d in runner.decode(jpegs[: args.batch], [0] * args.batch)])
        raw, raw_p50 = raw_inference(runner.model, decoded, runner.normalize, device, args.seconds)
        print(f"raw torch: {raw:,.0f} images/s, batch-1 p50 {raw_p50:.1f} ms", flush=True)
        pipeline: dict[str, float] = {}
        for label, on_device in (("nvJPEG", True), ("Pillow", False)):
            runner.decode_on_device = on_device
            pipeline[label], _ = timed(lambda: len(runner.run(jpegs[: args.batch]).error_codes), device, args.seconds)
            print(f"in process, {label}: {pipeline[label]:,.0f} images/s", flush=True)
        runner.decode_on_device = True
        breakdown(runner, jpegs[: args.batch], device, args.seconds)
        if args.gateway_workers > 1:
            flags = ["--triton-url", stack.triton_url, "--gateway-workers", str(args.gateway_workers)]
            workers = Stack.serve(data_dir / "workers", "gateway", flags, model_repository=data_dir / "models",
                                  default_model=name, max_images_per_request=max(64, args.batch))  # fmt: skip
            wait_for_health(workers.address, timeout=120)
        served = asyncio.run(serving(stack, name, jpegs, args, workers))
        print(f"served, instances {args.instances[0]}: {served}", flush=True)
        print(f"GPU memory: {gpu_memory()}", flush=True)
    finally:
        if workers is not None:
            workers.stop()
        stack.stop()
    for count in args.instances[1:]:  # the same serving measurements with other instance counts
        stack = serve(count)
        try:
            wait_for_health(stack.address, timeout=600)
            print(f"served, instances {count}: {asyncio.run(serving(stack, name, jpegs, args))}", flush=True)
            print(f"GPU memory: {gpu_memory()}", flush=True)
        finally:
            stack.stop()
    size, raw_batch = (64, 8) if args.quick else (224, 64)
    raw_train = raw_training(args.arch, size, raw_batch, device, args.train_steps)
    print(f"raw training: {raw_train:,.0f} images/s", flush=True)
    ours_train, train_batch = prelabel_training(args.arch, size, device, args.train_steps)

    rows = [
        ("raw torch, compute only (fp16, channels-last)", raw, raw_p50),
        ("in process: Runner, nvJPEG decode + forward", pipeline["nvJPEG"], None),
        ("in process: Runner, Pillow decode + forward", pipeline["Pillow"], None),
        ("straight to Triton", served["direct"], served["direct_p50"]),
        ("through the gateway", served["gateway"], served["gateway_p50"]),
    ]
    if "workers" in served:
        rows.append((f"through {args.gateway_workers} gateway processes", served["workers"], served["workers_p50"]))
    print(f"\n| path | images/s (batch {args.batch}, {args.concurrency} clients) | batch 1 p50 ms |\n|---|---|---|")
    for label, rate, p50 in rows:
        print(f"| {label} | {rate:,.0f} | {'' if p50 is None else f'{p50:.1f}'} |")
    print(f"| training {size} px: raw torch loop (AdamW, bf16, batch {raw_batch}) | {raw_train:,.0f} | |")
    print(f"| training {size} px: Prelabel `loop.fit`, full fine-tune (batch {train_batch}) | {ours_train:,.0f} | |")
    print("\n| ratio | measured | target |\n|---|---|---|")
    print(f"| gateway / raw torch | {served['gateway'] / raw:.2f} | >= 0.70 |")
    print(f"| gateway / straight to Triton | {served['gateway'] / served['direct']:.2f} | >= 0.95 |")
    print(f"| batch-1 p50 added by the gateway | {served['gateway_p50'] - served['direct_p50']:+.2f} ms | <= 1 ms |")
    print(f"| of which one bare grpc.aio hop (bench/bare_proxy.py) | "
          f"{served['proxy_p50'] - served['direct_p50']:+.2f} ms | |")  # fmt: skip
    print(f"| of which Prelabel's own work (gateway - bare hop) | "
          f"{served['gateway_p50'] - served['proxy_p50']:+.2f} ms | |")  # fmt: skip
    print(f"| gateway process at saturation: CPU per call of {args.batch} / cores busy | "
          f"{served['gateway_cpu_ms_per_call']:.1f} ms / {served['gateway_cores']:.2f} | |")  # fmt: skip
    if "workers" in served:
        w = args.gateway_workers
        print(f"| {w} gateway processes / raw torch | {served['workers'] / raw:.2f} | >= 0.70 |")
        print(f"| {w} gateway processes / straight to Triton | {served['workers'] / served['direct']:.2f} | >= 0.95 |")
    print(f"| Prelabel training / raw training | {ours_train / raw_train:.2f} | >= 0.60 |")
    print(f"| in-process nvJPEG / Pillow | {pipeline['nvJPEG'] / pipeline['Pillow']:.2f} | |")
    print(
        f"\nMixed request sizes ({', '.join(map(str, [n for n in (1, 4, 16, 64) if n <= args.batch]))} images),"
        f" {args.concurrency} clients: p50 / p99 ms"
    )
    for label in ("direct", "gateway", "workers"):
        if label in served:
            print(f"| {label} | {served[f'{label}_mixed_p50']:.1f} / {served[f'{label}_mixed_p99']:.1f} |")


if __name__ == "__main__":
    main()
