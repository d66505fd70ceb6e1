"""Faults with real processes: Triton killed, SIGTERM mid-call, Triton run apart from the gateway."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image, ImageDraw

from prelabel import processes
from prelabel.datasets import shapes
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import encode, request
from tests.stack import Process, Stack, environment, health_status, wait_for_health

pytestmark = pytest.mark.stack
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def children(pid: int, name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except OSError:
            continue
        if int(fields[1]) == pid and comm == name:
            found.append(int(stat.parent.name))
    return found


def photos(count: int, size: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1)
    return [(str(i), encode(shapes.render(i % 10, size, rng), "JPEG", quality=95)) for i in range(count)]


def test_health_follows_triton_and_supervisor_restarts_it(tmp_path):
    stack = Stack.serve(tmp_path)
    try:
        wait_for_health(stack.address)
        (triton,) = children(stack.process.popen.pid, "tritonserver")
        os.kill(triton, signal.SIGKILL)
        wait_for_health(stack.address, NOT_SERVING, timeout=30)
        with grpc.insecure_channel(stack.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                rpc.PredictionServiceStub(channel).Predict(request(photos(1, 64)), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "retry" in err.value.details()
            wait_for_health(stack.address, timeout=180)
            assert children(stack.process.popen.pid, "tritonserver") not in ([], [triton])
            response = rpc.PredictionServiceStub(channel).Predict(request(photos(2, 64)), timeout=60)
            assert all(p.labels for p in response.predictions)
        log = stack.process.log()
        assert "Triton exited unexpectedly (code -9); restarting" in log
        assert (tmp_path / "logs" / "triton.log").read_text().count("prelabel: Triton started") == 2
    finally:
        exit_code = stack.stop()
    assert exit_code == 0  # after the block: a failure in it is reported first


ROUNDS = 2  # kills of Triton under load in the test below


@pytest.mark.timeout(600)
def test_triton_killed_under_load_comes_back_every_time_and_leaves_nothing_behind(tmp_path):
    """kill -9 of tritonserver while clients call Predict, twice (the second kills the Triton
    that the supervisor restarted): its python-backend stubs
    (orphaned, holding its pipes, memory and /dev/shm) must not keep the supervisor from seeing the
    exit, and the gateway must serve again within seconds of Triton being back."""
    stack = Stack.serve(tmp_path)
    stop = threading.Event()
    outcomes: list[str] = []

    def client() -> None:
        with grpc.insecure_channel(stack.address) as channel:
            predict = rpc.PredictionServiceStub(channel).Predict
            while not stop.is_set():
                try:
                    predict(request(photos(16, 384)), timeout=10)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)
                    time.sleep(0.05)

    try:
        wait_for_health(stack.address)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        for round_ in range(ROUNDS):
            time.sleep(2)  # calls in flight
            (triton,) = children(stack.process.popen.pid, "tritonserver")
            group = processes.group_members(triton)
            stubs = [pid for pid in group if pid != triton]
            regions = processes.shared_memory_of(group)
            assert stubs and regions, "the python backend runs a stub with shared memory"
            before = len(outcomes)
            killed = time.monotonic()
            os.kill(triton, signal.SIGKILL)
            wait_for_health(stack.address, NOT_SERVING, timeout=30)
            wait_for_health(stack.address, timeout=120)
            recovered = time.monotonic() - killed
            assert recovered < 60, f"round {round_}: SERVING again only after {recovered:.0f}s"
            assert processes.group_members(triton) == [], f"round {round_}: orphans of the killed Triton remain"
            assert not [r for r in regions if r.exists()], f"round {round_}: /dev/shm regions leaked"
            deadline = time.monotonic() + 30
            while "OK" not in outcomes[before:] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "OK" in outcomes[before:], f"round {round_}: no call succeeded after the restart"
        stop.set()
        for t in threads:
            t.join(30)
        assert set(outcomes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, set(outcomes)
        assert stack.process.log().count("Triton exited unexpectedly (code -9)") == ROUNDS
    finally:
        stop.set()
        exit_code = stack.stop()
    assert exit_code == 0  # after the block: a failure in it is reported first


def test_sigterm_lets_the_call_in_flight_finish(tmp_path):
    stack = Stack.serve(tmp_path)
    try:
        wait_for_health(stack.address)
        # Large flat PNGs: small files that take ~50 ms each to decode (PNG has no draft mode).
        canvas = Image.new("RGB", (1900, 1900), (30, 90, 200))
        ImageDraw.Draw(canvas).ellipse([300, 300, 1600, 1600], fill=(250, 250, 20))
        flat = encode(canvas, "PNG")
        slow = request([(str(i), flat) for i in range(200)])
        with grpc.insecure_channel(stack.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = rpc.PredictionServiceStub(channel)
            started = threading.Event()
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(lambda: (started.set(), stub.Predict(slow, timeout=120))[1])
                started.wait()
                time.sleep(0.5)
                assert not future.done(), "the call finished before SIGTERM: make it slower"
                stack.process.popen.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                with pytest.raises(grpc.RpcError) as refused:  # new calls are refused while draining
                    stub.Predict(request(photos(1, 64)), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                response = future.result()
            assert len(response.predictions) == 200 and len({p.labels[0].name for p in response.predictions}) == 1
        assert stack.process.popen.wait(60) == 0
        assert "shutting down: finishing in-flight calls" in stack.process.log()
        assert children(stack.process.popen.pid, "tritonserver") == []
    finally:
        stack.stop()


def test_gateway_with_a_separate_triton(tmp_path):
    triton = Process(["triton"], environment(tmp_path / "triton")).start()
    gateway = None
    try:
        url = triton.wait_for_line(__import__("re").compile(r"Triton at ([\d.]+:\d+)")).group(1)
        gateway = Stack.serve(
            tmp_path / "gateway",
            command="gateway",
            extra=["--triton-url", url],
            model_repository=tmp_path / "triton" / "models",
        )
        wait_for_health(gateway.address, timeout=60)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = rpc.PredictionServiceStub(channel)
            assert all(p.labels for p in stub.Predict(request(photos(3, 96)), timeout=60).predictions)
            assert triton.stop() == 0
            wait_for_health(gateway.address, NOT_SERVING, timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(request(photos(1, 64)), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Triton" in err.value.details()
    finally:
        triton.stop()
        exit_code = gateway.stop() if gateway else 0
    assert exit_code == 0  # after the block: a failure in it is reported first


def test_gateway_without_triton_url_says_what_to_do(tmp_path):
    process = Process(["gateway", "--grpc-port", "0"], environment(tmp_path)).start()
    assert process.popen.wait(60) == 1
    assert "pass --triton-url HOST:PORT" in process.log()


def test_health_check_reports_not_serving_before_triton_is_reachable(tmp_path):
    gateway = Stack.serve(tmp_path, command="gateway", extra=["--triton-url", "127.0.0.1:9"])
    try:
        time.sleep(1.5)
        assert health_status(gateway.address) == NOT_SERVING
    finally:
        exit_code = gateway.stop()
    assert exit_code == 0  # after the block: a failure in it is reported first


def test_a_second_serve_on_the_same_data_directory_refuses_and_leaves_the_first_alone(stack):
    """A `prelabel serve` left running in another terminal: the second one started its own Triton on the
    same workspace (replacing the running one's backends) and, stopping, removed the address file through
    which the first one's trainers load new versions. Now it refuses before touching anything."""
    url_file = stack.data_dir / "triton" / "url"
    before = url_file.read_text()
    second = Process(["serve", "--grpc-port", "0", "--metrics-port", "0"], environment(stack.data_dir)).start()
    assert second.popen.wait(120) == 1, second.log()
    assert "another embedded Triton" in second.log() and f"pid {stack.process.popen.pid})" in second.log()
    assert url_file.read_text() == before
    assert health_status(stack.address) == health_pb2.HealthCheckResponse.SERVING


def test_triton_and_the_trainers_beside_it_wait_passively_and_a_users_choice_wins(stack, monkeypatch):
    """Spinning OpenMP threads in Triton's stubs and a trainer on the same cores made Predict 10x slower
    while a job trained (bench/predict_while_training.py): `serve` gives both OMP_WAIT_POLICY=PASSIVE."""
    from prelabel.launcher import shares_cores
    from prelabel.settings import Settings

    serve = stack.process.popen.pid
    (triton,) = children(serve, "tritonserver")
    stubs, trainers = children(triton, "triton_python_b"), children(serve, "python3")  # comm: 15 characters
    assert stubs and trainers
    processes = [triton, *stubs, *trainers]
    for pid in processes:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_WAIT_POLICY=PASSIVE" in environ, pid
    settings = Settings()
    assert shares_cores(settings, "gateway") == {} and shares_cores(settings.replace(trainer_workers=0), "all") == {}
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert shares_cores(settings, "all") == {}
