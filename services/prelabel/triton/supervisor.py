"""Runs the ``tritonserver`` binary shipped in the nvidia-pytriton wheel, and keeps it running.

Prepared as PyTriton does (``pytriton/triton.py``): the backends are copied into a workspace under
the data directory with the python-backend stub built for the running Python, and the binary is
started with explicit model control, every model in the repository loaded, the project's packages
visible to the stub, and ``PR_SET_PDEATHSIG`` so that it dies with its parent. If it exits while
wanted, or stops answering health checks for ``hung_after_s``, what is left of its process group
(the python-backend stubs, which outlive a killed server and hold its pipes, memory and
``/dev/shm`` regions) is killed and cleaned up (``prelabel/processes.py``) and it is restarted with
exponential back-off. Its log goes to ``<data_dir>/logs/triton.log`` and its error lines are
repeated in ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prelabel import metrics
from prelabel.errors import FailedPrecondition, Unavailable
from prelabel.processes import Backoff, die_with_parent, kill_group, wait_exit
from prelabel.triton.client import TritonClient

log = logging.getLogger("prelabel.triton")

# Error lines that a CPU-only machine always prints and that mean nothing for Prelabel.
HARMLESS = ("CudaDriverHelper has not been initialized", "NVML", "DCGM", "GPU metrics")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TritonPaths:
    """Where the wheel keeps the server, and which stub matches this Python."""

    root: Path

    @classmethod
    def from_wheel(cls) -> TritonPaths:
        # Found, not imported: importing pytriton pulls its client (gevent, zmq...) into the launcher.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable(
                "the embedded Triton comes with nvidia-pytriton, which is not installed: "
                "pip install 'prelabel[embedded]' (scripts/setup.sh does), or set PRELABEL_TRITON_URL to a Triton"
            )
        return cls(Path(next(iter(spec.submodule_search_locations))) / "tritonserver")

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        return (
            self.root
            / "python_backend_stubs"
            / f"{sys.version_info.major}.{sys.version_info.minor}"
            / ("triton_python_backend_stub")
        )


@dataclass(frozen=True)
class Ports:
    grpc: int
    http: int
    metrics: int


class TritonSupervisor:
    def __init__(
        self,
        repository: Path,
        workspace: Path,
        url_file: Path,
        log_path: Path,
        host: str = "127.0.0.1",
        ports: Ports | None = None,
        startup_timeout_s: float = 180.0,
        paths: TritonPaths | None = None,
        hung_after_s: float = 30.0,
        env_defaults: dict[str, str] | None = None,
    ) -> None:
        self.repository = repository
        self.workspace = workspace
        self.url_file = url_file  # where a running supervisor leaves its gRPC address, for trainers to find
        self.log_path = log_path
        self.host = host
        self.ports = ports or Ports(free_port(host), free_port(host), free_port(host))
        self.startup_timeout_s = startup_timeout_s
        self.hung_after_s = hung_after_s
        self.env_defaults = env_defaults or {}  # variables Triton gets unless our environment sets them
        self.paths = paths or TritonPaths.from_wheel()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._log_pump: asyncio.Task[None] | None = None
        self._recent_errors: deque[str] = deque(maxlen=20)
        self._lock: int | None = None

    @property
    def url(self) -> str:
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.url.split(':')[0]}:{self.ports.metrics}/metrics"

    def lock(self) -> None:
        """Own the workspace, until :meth:`stop`. A second embedded Triton on one data directory (a
        ``prelabel serve`` left running in another terminal) replaced the running one's backends while
        it used them, and removed the address file its trainers load new versions through."""
        if self._lock is not None:
            return
        self.workspace.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workspace / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FailedPrecondition(
                f"another embedded Triton (a `prelabel serve` or `prelabel triton`, pid {holder}) already runs on "
                f"the data directory {self.workspace.parent}; stop it first, or give this one a data directory of "
                "its own (--data-dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # the lock goes with the file descriptor
            self._lock = None

    async def start(self) -> None:
        """Start the server and wait until it is ready, or raise Unavailable with its last errors."""
        self.lock()
        self._prepare_backends()
        await self._spawn()
        await self._wait_ready()
        self.url_file.write_text(self.url)
        self._watcher = asyncio.create_task(self._watch(), name="triton-supervisor")

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, wait up to ``grace_s`` for in-flight work, then SIGKILL; nothing of it is left behind."""
        self._stopping = True
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self.url_file.unlink(missing_ok=True)
        process = self.process
        if process is not None:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                if await wait_exit(process, grace_s) is None:
                    log.warning("Triton did not stop within %.0fs of SIGTERM; killing it", grace_s)
            await self._clean_up(process)
            log.info("Triton stopped")
        self.unlock()

    def command(self) -> list[str]:
        cuda = shutil.which("nvidia-smi") is not None
        return [
            str(self.paths.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.workspace / 'backends'}",
            f"--cache-directory={self.paths.root / 'caches'}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--strict-readiness=false",  # one bad model must not make the server unready
            "--exit-on-error=false",
            # Prelabel writes every config in full; auto-completion would start one more python stub per
            # model load (importing torch) only to ask it for a config: half of each load (8 -> 4 s).
            "--disable-auto-complete-config",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            f"--allow-gpu-metrics={str(cuda).lower()}",
            "--exit-timeout-secs=10",
        ]

    def environment(self) -> dict[str, str]:
        """The parent's environment, with this interpreter first on PATH.

        The stub ignores PYTHONPATH but initialises the Python it finds on PATH, virtual environment
        and ``.pth`` files included: so it imports Prelabel, torch and friends exactly as installed here.
        """
        env = {**self.env_defaults, **os.environ}
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.paths.libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def _prepare_backends(self) -> None:
        if not self.paths.binary.is_file():
            raise Unavailable(f"the Triton binary is missing at {self.paths.binary}: reinstall nvidia-pytriton")
        if not self.paths.stub.is_file():
            raise Unavailable(
                f"nvidia-pytriton has no python-backend stub for Python {sys.version_info.major}."
                f"{sys.version_info.minor}; run Prelabel with Python 3.8-3.13"
            )
        backends = self.workspace / "backends"
        shutil.rmtree(backends, ignore_errors=True)
        shutil.copytree(self.paths.root / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.paths.stub, backends / "python" / "triton_python_backend_stub")
        self.repository.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    async def _spawn(self) -> None:
        log.info("starting Triton (gRPC %s, metrics %s), log at %s", self.url, self.metrics_url, self.log_path)
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            env=self.environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop Triton in order
        )
        self._log_pump = asyncio.create_task(self._pump_log(self.process), name="triton-log")

    async def _pump_log(self, process: asyncio.subprocess.Process) -> None:
        """Copy the server's output to its log file; repeat error lines (``E1125 ...``) in ours."""
        assert process.stdout is not None
        with self.log_path.open("ab") as sink:
            sink.write(f"--- prelabel: Triton started, pid {process.pid} ---\n".encode())
            async for line in process.stdout:
                sink.write(line)
                sink.flush()
                text = line.decode(errors="replace").rstrip()
                if text[:1] == "E" and text[1:5].isdigit() and not any(h in text for h in HARMLESS):
                    self._recent_errors.append(text)
                    log.error("Triton: %s", text)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = TritonClient(self.url)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.returncode is not None:
                    code = None if self.process is None else self.process.returncode
                    if self.process is not None:
                        await self._clean_up(self.process)
                    raise Unavailable(
                        f"Triton exited with code {code} while starting; last errors: "
                        f"{' | '.join(self._recent_errors) or 'none'}; see {self.log_path}"
                    )
                if await client.server_live():
                    log.info("Triton is ready at %s", self.url)
                    return
                await asyncio.sleep(0.25)
            raise Unavailable(f"Triton was not ready after {self.startup_timeout_s:.0f}s; see {self.log_path}")
        finally:
            await client.close()

    async def _watch(self) -> None:
        backoff = Backoff()
        while not self._stopping:
            assert self.process is not None
            started = time.monotonic()
            code = await self._until_exit(self.process)
            if self._stopping:
                return
            await self._clean_up(self.process)
            delay = backoff.after_run(time.monotonic() - started)
            self.restarts += 1
            metrics.TRITON_RESTARTS.inc()
            log.error(
                "Triton exited unexpectedly (code %s); restarting in %.0fs (restart %d). Last errors: %s",
                code,
                delay,
                self.restarts,
                " | ".join(self._recent_errors) or "none",
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn()
                await self._wait_ready()
            except Unavailable as exc:
                log.error("Triton restart failed: %s", exc)

    async def _until_exit(self, process: asyncio.subprocess.Process, every_s: float = 1.0) -> int | None:
        """Its exit code, seen within ``every_s``; a server that stops answering for ``hung_after_s`` is killed."""
        client = TritonClient(self.url)
        silent_since: float | None = None
        try:
            while (code := await wait_exit(process, every_s)) is None:
                if await client.server_live(timeout_s=every_s):
                    silent_since = None
                    continue
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since >= self.hung_after_s:
                    log.error("Triton has not answered a health check for %.0fs; killing it", self.hung_after_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
            return code
        finally:
            await client.close()

    async def _clean_up(self, process: asyncio.subprocess.Process) -> None:
        """Kill what is left of its process group (stubs), remove their shared memory, finish its log."""
        await kill_group(process.pid, "Triton")
        if self._log_pump is not None:
            try:
                await asyncio.wait_for(self._log_pump, 5.0)  # its pipe closes with the last writer
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._log_pump.cancel()
