"""The one settings object: every knob, its environment variable and its default.

Each field ``name`` is read from ``PRELABEL_<NAME>``; the CLI overrides a few with flags. Every limit
that the gateway enforces lives here so that operators can tune it without code changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prelabel.errors import InvalidArgument

MiB = 1024 * 1024


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) / "prelabel" if xdg else Path.home() / ".local" / "share" / "prelabel"


@dataclass(frozen=True)
class Settings:
    # Where everything lives
    data_dir: Path = field(default_factory=_default_data_dir)
    model_repository: Path | None = None  # default: <data_dir>/models

    # Gateway
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0 picks a free port
    metrics_port: int = 9400  # 0 picks a free port; -1 disables /metrics
    metrics_host: str = ""  # where /metrics listens; empty: where gRPC listens (grpc_host)
    grace_period_s: float = 10.0  # in-flight calls get this long to finish on SIGTERM
    gateway_workers: int = 1  # gateway processes sharing the gRPC port (SO_REUSEPORT); more on GPU machines
    ready_file: Path | None = None  # written once the gateway listens (serve waits on its workers' files)

    # Security: TLS when cert and key are set, mutual TLS with a client CA; bearer tokens from a file
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens_file: Path | None = None  # lines of "TOKEN SCOPE" (read | write); re-read when it changes

    # The prelabel CLI as a client of a gateway: a bearer token, a CA to trust (TLS), its own certificate (mTLS)
    token: str = ""
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    # Limits (RESOURCE_EXHAUSTED / INVALID_ARGUMENT with a message naming the setting)
    max_images_per_request: int = 256
    max_image_bytes: int = 20 * MiB
    max_message_bytes: int = 64 * MiB
    max_image_pixels: int = 40_000_000  # larger images are rejected per image (decompression bombs)
    max_top_k: int = 100
    default_top_k: int = 5
    stream_max_in_flight: int = 4  # PredictStream requests processed ahead of the one being sent
    default_timeout_s: float = 120.0  # Triton call timeout when the client sets no deadline

    # Triton: empty triton_url runs the embedded server
    triton_url: str = ""
    triton_host: str = "127.0.0.1"  # where the embedded Triton listens (`prelabel triton`: 0.0.0.0 to share)
    triton_grpc_port: int = 0
    triton_http_port: int = 0
    triton_metrics_port: int = 0
    triton_startup_timeout_s: float = 180.0
    triton_instance_kind: str = "KIND_AUTO"  # KIND_CPU | KIND_GPU | KIND_AUTO
    triton_instance_count: int = 0  # model instances per device; 0: 4 per GPU where there is one, else 1
    triton_max_batch_size: int = 32
    triton_max_queue_delay_us: int = 2000
    # Versions of each model that Triton keeps loaded, the newest; 0: all. Each costs its own python
    # stubs (about 420 MB of private memory each on CPU, 1.5 GB of GPU memory per instance on a GPU).
    triton_loaded_versions: int = 2

    # Models: the default model is the one an empty PredictRequest.model means
    default_model: str = "prelabel-base"
    # "builtin" (the packaged pre-trained model), "ARCH:imagenet" or "ARCH:/path/to/weights.pth"
    base_weights: str = "builtin"

    # Fine-tuning: datasets under <data_dir>/datasets, jobs in a durable queue, trainer workers
    queue_url: str = ""  # default: sqlite:///<data_dir>/queue.db; redis://HOST:PORT/DB for many machines
    trainer_workers: int = 1  # trainer processes that `prelabel serve` starts (0: none)
    job_lease_s: float = 30.0  # a worker silent this long is presumed dead; its job is claimed again
    job_max_attempts: int = 3  # claims before a job is FAILED (a crash or kill -9 counts)
    trainer_poll_s: float = 1.0  # how often an idle worker looks for a job
    trainer_device: str = "auto"  # auto (cuda if present), cpu, cuda, cuda:1...
    trainer_scratch_trial: str = "never"  # AUTO also tries from scratch: never, gpu (when training on one), always
    checkpoint_every_s: float = 10.0  # how often a training run saves its state (and when it stops)
    max_examples_per_dataset: int = 1_000_000
    max_label_chars: int = 128

    # The Label Studio ML backend (`prelabel labelstudio`), a client of the gateway like the CLI
    labelstudio_host: str = "127.0.0.1"
    labelstudio_port: int = 9090  # 0 picks a free port
    labelstudio_url: str = ""  # Label Studio's address, until /setup tells it (training from webhooks)
    labelstudio_api_token: str = ""  # its API token, likewise (/setup sends the project's own)
    labelstudio_basic_auth: str = ""  # "USER:PASSWORD" that Label Studio must send (its BASIC_AUTH)
    labelstudio_model: str = ""  # the model that pre-labels and is fine-tuned; empty: the gateway's default
    labelstudio_project_models: str = ""  # per project: "ID=MODEL,ID=MODEL"
    labelstudio_train_every: int = 20  # annotation changes that start a fine-tune; 0: only on START_TRAINING
    labelstudio_strategy: str = "auto"  # auto, feature_extraction, freeze_first_k, full_fine_tune, from_scratch
    labelstudio_batch_size: int = 32  # images per Predict call

    log_level: str = "INFO"

    @property
    def metrics_address(self) -> str:
        """Where ``/metrics`` listens: like gRPC, loopback unless configured otherwise."""
        return self.metrics_host or self.grpc_host

    @property
    def repository(self) -> Path:
        return self.model_repository or self.data_dir / "models"

    @property
    def queue(self) -> str:
        return self.queue_url or f"sqlite:///{self.data_dir / 'queue.db'}"

    @property
    def datasets(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def checkpoints(self) -> Path:
        """Training checkpoints, by job: on storage every worker shares, so another can resume."""
        return self.data_dir / "checkpoints"

    @property
    def triton_workspace(self) -> Path:
        """The embedded Triton's backends; ``url`` there names the running server while it runs."""
        return self.data_dir / "triton"

    @property
    def triton_url_file(self) -> Path:
        return self.triton_workspace / "url"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def embedded_triton(self) -> bool:
        return not self.triton_url

    @property
    def gateway_worker(self) -> bool:
        """A worker of ``serve --gateway-workers``: it shares the port, and its parent waits on ``ready_file``."""
        return self.ready_file is not None

    def configure_logging(self) -> None:
        """Every long-running command logs alike: timestamp, level, component, message, to stderr."""
        logging.basicConfig(
            level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PRELABEL_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, str(f.type), raw)
        return cls(**values).replace(**overrides)

    def environment(self) -> dict[str, str]:
        """Every setting as ``PRELABEL_*`` variables: a child process's :meth:`from_env` reads back these settings."""
        return {
            f"PRELABEL_{f.name.upper()}": "" if (value := getattr(self, f.name)) is None else str(value)
            for f in fields(self)
        }

    @staticmethod
    def env_table() -> list[tuple[str, str]]:
        """``(variable, default)`` for every setting, for docs and ``--help``."""
        defaults = Settings(data_dir=Path("~/.local/share/prelabel"))
        return [(f"PRELABEL_{f.name.upper()}", str(getattr(defaults, f.name))) for f in fields(Settings)]


def _parse(name: str, type_name: str, raw: str) -> Any:
    try:
        if "Path" in type_name:
            return Path(raw).expanduser() if raw else None
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        return raw
    except ValueError:
        raise InvalidArgument(f"PRELABEL_{name.upper()}={raw!r} is not a valid {type_name}") from None
