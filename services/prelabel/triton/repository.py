"""The Triton model repository: one folder per model, one numbered folder per version.

Every version folder holds the same tiny ``model.py`` that imports Prelabel's one generic python
backend model, plus ``weights.pt``, ``card.json`` (labels, preprocessing, provenance, metrics,
calibration) and optionally ``reference.npz`` (embedding statistics of the training data).
Versions are written to a staging folder and renamed into place, so Triton never sees half a version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prelabel.errors import NotFound
from prelabel.files import naming, share, write_atomically
from prelabel.models.card import VersionCard
from prelabel.names import validate_name
from prelabel.settings import Settings

log = logging.getLogger("prelabel.repository")

MODEL_PY = '''"""Written by Prelabel: every version is served by the same generic python backend model."""

from prelabel.triton.backend.model import TritonPythonModel  # noqa: F401
'''

CONFIG_TEMPLATE = """# Written by Prelabel (prelabel.triton.repository); edits are overwritten when versions are added.
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
# A request of n images has batch size n. IMAGES: the encoded files end to end, zero-padded (fewer
# than n bytes) into n equal rows that do not follow the files; SIZES: each file's length. So the
# batcher counts images. ERROR_MESSAGE: each image's message in UTF-8, zero-padded ("" where none).
input [
  {{ name: "IMAGES", data_type: TYPE_UINT8, dims: [ -1 ], allow_ragged_batch: true }},
  {{ name: "SIZES", data_type: TYPE_INT64, dims: [ 1 ] }}
]
output [
  {{ name: "PROBABILITIES", data_type: TYPE_FP32, dims: [ -1 ] }},
  {{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ -1 ] }},
  {{ name: "ERROR_CODE", data_type: TYPE_INT32, dims: [ 1 ] }},
  {{ name: "ERROR_MESSAGE", data_type: TYPE_UINT8, dims: [ -1 ] }}
]
version_policy: {version_policy}
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{ count: {instance_count}, kind: {instance_kind} }}
]
"""


LAST_ISSUED = ".last-version"  # in each model's folder: the highest version number ever issued there


@dataclass(frozen=True)
class RepositoryConfig:
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"
    loaded_versions: int = 2  # the newest versions Triton keeps loaded; 0: all

    @property
    def version_policy(self) -> str:
        return f"{{ latest {{ num_versions: {self.loaded_versions} }} }}" if self.loaded_versions else "{ all { } }"

    def loaded(self, versions: list[int]) -> list[int]:
        """Which of a model's versions (ascending) the policy has Triton load."""
        return versions[-self.loaded_versions :] if self.loaded_versions else versions


class ModelRepository:
    def __init__(self, root: Path, config: RepositoryConfig | None = None) -> None:
        self.root = root
        self.config = config or RepositoryConfig()

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "config.pbtxt").is_file())

    def versions(self, name: str) -> list[int]:
        folder = self.root / validate_name(name)
        if not folder.is_dir():
            return []
        return sorted(n for n in self._numbered(folder) if (folder / str(n) / "card.json").is_file())

    @staticmethod
    def _numbered(folder: Path) -> set[int]:
        """Every entry with a version-like name, Prelabel's or not (ASCII digits only: '²'.isdigit())."""
        if not folder.is_dir():
            return set()
        return {int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit() and len(p.name) < 19}

    @staticmethod
    def _last_issued(model_dir: Path) -> int:
        try:
            return int((model_dir / LAST_ISSUED).read_text())
        except (OSError, ValueError):
            return 0

    def card(self, name: str, version: int) -> VersionCard:
        path = self.root / validate_name(name) / str(version) / "card.json"
        if not path.is_file():
            raise NotFound(f"model {name!r} has no version {version}")
        return VersionCard.from_json(path.read_text())

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / validate_name(name) / str(version)

    def add_version(self, name: str, card: VersionCard, write_files: Callable[[Path], None]) -> int:
        """Publish a new version: ``write_files(folder)`` adds weights (and any reference statistics).

        The folder is filled in a staging area beside the repository, then renamed into place as the
        next free number; a rename that loses a race to another writer retries with the next number.
        Numbers are never reused: a version moved out (a rollback) keeps its number, which Label Studio
        and clients hold on to (a prediction of ``pets@3`` must mean one model).
        """
        validate_name(name)
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        self._write_config(name)
        staging_root = self.root.parent / f".{self.root.name}.staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
        try:
            share(staging)  # Triton may run as another user than the one publishing
            with naming(staging):
                (staging / "model.py").write_text(MODEL_PY)
                write_files(staging)
                (staging / "card.json").write_text(card.to_json())
            while True:
                taken = self._numbered(model_dir)
                if strays := sorted(taken - set(self.versions(name))):
                    log.warning(
                        "model %s: version folder(s) %s hold no card.json: not Prelabel versions (Triton will fail to "
                        "load them); publishing past them. Remove them from %s", name, strays, model_dir,
                    )  # fmt: skip
                version = max(*taken, self._last_issued(model_dir), 0) + 1
                write_atomically(model_dir / LAST_ISSUED, str(version).encode())  # before: one change for a poll
                try:
                    os.rename(staging, model_dir / str(version))
                    return version
                except OSError:
                    if not (model_dir / str(version)).exists():
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_configs(self) -> None:
        """Every model's ``config.pbtxt`` as this release and these settings write it, at every start: outputs
        change between releases, and instance count, kind and batching must follow PRELABEL_TRITON_*."""
        for name in self.models():
            try:
                written = self._write_config(name)
            except PermissionError as exc:  # a model folder another user owns: serve it as it is
                log.error("model %s: cannot rewrite config.pbtxt (%s); it keeps its old settings. Run every "
                          "process that writes the repository as one user (docs/operations.md)", name, exc)  # fmt: skip
                continue
            if written:
                c = self.config
                loaded = f"the newest {c.loaded_versions}" if c.loaded_versions else "every"
                log.info("model %s: config.pbtxt rewritten: %d x %s, max batch %d, queue delay %d us, %s version(s) "
                         "loaded", name, c.instance_count, c.instance_kind, c.max_batch_size, c.max_queue_delay_us,
                         loaded)  # fmt: skip

    def _write_config(self, name: str) -> bool:
        """Write ``name``'s config if it differs; True if it did."""
        c = self.config
        text = CONFIG_TEMPLATE.format(
            name=name,
            max_batch_size=c.max_batch_size,
            max_queue_delay_us=c.max_queue_delay_us,
            instance_count=c.instance_count,
            instance_kind=c.instance_kind,
            version_policy=c.version_policy,
        )
        path = self.root / name / "config.pbtxt"
        if path.is_file() and path.read_text() == text:
            return False
        write_atomically(path, text.encode())  # writers may race: each renames a whole file
        return True


GPU_INSTANCES = 4  # per GPU: ResNet-50 photos/s on an H200 with 1, 2, 4 instances: 2,434, 4,190, 5,433


def default_instance_count(kind: str, gpus: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """Several instances per GPU where this machine has one: each spends most of a batch on the CPU
    (launching decode, resize and network kernels), so others keep the card busy meanwhile; one on
    the CPU, where torch already spreads each batch over every core."""
    has_gpu = gpus.is_dir() and any(gpus.iterdir())
    return GPU_INSTANCES if has_gpu and kind != "KIND_CPU" else 1


def repository_for(settings: Settings) -> ModelRepository:
    """The model repository that ``settings`` name, writing configs with its Triton options."""
    kind = settings.triton_instance_kind
    return ModelRepository(
        settings.repository,
        RepositoryConfig(
            max_batch_size=settings.triton_max_batch_size,
            max_queue_delay_us=settings.triton_max_queue_delay_us,
            instance_count=settings.triton_instance_count or default_instance_count(kind),
            instance_kind=kind,
            loaded_versions=settings.triton_loaded_versions,
        ),
    )
