"""Starts real Prelabel processes (the installed ``prelabel`` CLI) on free ports, for tests and benches."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PRELABEL = str(Path(sys.executable).parent / "prelabel")
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
METRICS = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
TRITON = re.compile(r"Triton at ([\d.]+:\d+)(?: \(metrics (\S+)\))?")


@dataclass
class Process:
    """One ``prelabel`` command, its output collected in the background."""

    args: list[str]
    env: dict[str, str]
    python: str | None = None  # run the CLI with this interpreter (``python -m prelabel.cli.main``)
    popen: subprocess.Popen[str] = field(init=False)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def start(self) -> Process:
        program = [self.python, "-m", "prelabel.cli.main"] if self.python else [PRELABEL]
        self.popen = subprocess.Popen(
            [*program, *self.args], env=self.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for stream, sink in ((self.popen.stdout, self.stdout), (self.popen.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()
        return self

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 240) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stdout):
                if m := pattern.search(line):
                    return m
            if self.popen.poll() is not None:
                raise RuntimeError(f"prelabel {' '.join(self.args)} exited {self.popen.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise TimeoutError(f"no line matching {pattern.pattern!r}:\n{self.log()}")

    def log(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr[-60:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def environment(data_dir: Path, **settings: object) -> dict[str, str]:
    env = dict(os.environ)
    env.update({f"PRELABEL_{k.upper()}": str(v) for k, v in settings.items()})
    env["PRELABEL_DATA_DIR"] = str(data_dir)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return int(
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )
        except grpc.RpcError:
            return -1


def wait_for_health(address: str, status: int = health_pb2.HealthCheckResponse.SERVING, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(address) == status:
            return
        time.sleep(0.2)
    raise TimeoutError(f"health of {address} did not become {status} within {timeout}s")


@dataclass
class Stack:
    """``prelabel serve`` (or ``gateway``) running, with its addresses."""

    process: Process
    data_dir: Path
    address: str
    metrics_url: str | None
    triton_url: str
    triton_metrics_url: str | None = None

    @classmethod
    def serve(cls, data_dir: Path, command: str = "serve", extra: list[str] | None = None, python: str | None = None,
              **settings: object) -> Stack:  # fmt: skip
        process = Process(
            [command, "--grpc-port", "0", "--metrics-port", "0", *(extra or [])],
            environment(data_dir, **settings),
            python,
        ).start()
        port = process.wait_for_line(LISTENING).group(1)
        metrics = METRICS.search("".join(process.stdout))
        triton = TRITON.search("".join(process.stdout))
        stack = cls(
            process,
            data_dir,
            f"127.0.0.1:{port}",
            f"http://127.0.0.1:{metrics.group(1)}/metrics" if metrics else None,
            triton.group(1) if triton else "",
            triton.group(2) if triton else None,
        )
        return stack

    def stop(self) -> int:
        return self.process.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A real ``redis-server`` of the test's own (AOF, fsync always), restartable on the same port and files."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        server = shutil.which("redis-server")
        assert server, "redis-server is missing: scripts/setup.sh --test installs it"
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.folder),
                *("--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
