"""Datasets of labelled images, stored content-addressed under the data directory.

    <root>/.blobs/ab/<sha256>         each distinct image once, whichever datasets hold it
    <root>/<name>/examples.tsv        append-only log: one ``sha256<TAB>label`` line per example
    <root>/<name>/summary.json        counts, revision (lines in the log), created/updated times

An upload is checked completely (labels, decodable images, limits) before anything is appended, then
appended in one write under a lock, so a rejected upload leaves the dataset as it was. Sending an
image the dataset already holds relabels it (the last label wins): annotation tools re-send
corrected labels, and counting them twice would skew training. A *replacing* upload makes the dataset
exactly what it sends: images it leaves out get a removal line (the digest and an empty label), so an
annotation tool's full sync also carries deleted labels. A fine-tune job trains on a
snapshot, the first ``revision`` lines of the log, so later uploads never change a running job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from prelabel.errors import InvalidArgument, NotFound, ResourceExhausted
from prelabel.files import write_atomically
from prelabel.names import validate_name
from prelabel.preprocessing import ImageError, Preprocess, decode
from prelabel.settings import Settings

MIN_PER_CLASS = 3  # a class needs one validation and two training examples
_PROBE = Preprocess(resize=8, crop=8)  # decoding at a tiny size proves an image is readable, cheaply


@dataclass
class DatasetInfo:
    name: str
    example_count: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    revision: int = 0  # lines in the log: a job's snapshot


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_examples: int = 1_000_000
    max_label_chars: int = 128


def dataset_store(settings: Settings) -> DatasetStore:
    """The store that ``settings`` name, with its limits."""
    return DatasetStore(
        settings.datasets,
        Limits(
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.max_examples_per_dataset,
            settings.max_label_chars,
        ),
    )


class DatasetStore:
    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits()

    # -- reading ---------------------------------------------------------------------------------

    def info(self, name: str) -> DatasetInfo:
        path = self._folder(name) / "summary.json"
        if not path.is_file():
            raise NotFound(f"dataset {name!r} does not exist; upload examples to it with UploadExamples first")
        return DatasetInfo(**json.loads(path.read_text()))

    def all(self) -> list[DatasetInfo]:
        if not self.root.is_dir():
            return []
        return [self.info(p.name) for p in sorted(self.root.iterdir()) if (p / "summary.json").is_file()]

    def snapshot(self, name: str, revision: int | None = None) -> dict[str, str]:
        """``{sha256: label}`` as of ``revision`` log lines (default: now)."""
        info = self.info(name)
        return self._replay(name, info.revision if revision is None else revision)

    def read(self, digest: str) -> bytes:
        return self._blob(digest).read_bytes()

    def examples(self, name: str, revision: int | None = None) -> tuple[list[bytes], list[str]]:
        """Encoded images and their labels, for training."""
        labelled = self.snapshot(name, revision)
        return [self.read(d) for d in labelled], list(labelled.values())

    # -- writing ---------------------------------------------------------------------------------

    def upload(self, name: str, replace: bool = False) -> Upload:
        """Start an upload to ``name`` (created on commit if new); ``replace``: it becomes exactly this upload."""
        return Upload(self, validate_name(name, "dataset"), replace)

    def _commit(self, name: str, added: list[tuple[str, str]], replace: bool = False) -> DatasetInfo:
        folder = self._folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        with self._locked(folder):
            now = time.time()
            path = folder / "summary.json"
            info = DatasetInfo(**json.loads(path.read_text())) if path.is_file() else DatasetInfo(name, created_at=now)
            labelled = self._replay(name, info.revision)
            kept = dict(added)
            lines = [(digest, "") for digest in labelled if digest not in kept] if replace else []
            lines += added
            labelled = kept if replace else {**labelled, **kept}
            if len(labelled) > self.limits.max_examples:
                raise ResourceExhausted(
                    f"dataset {name!r} would hold {len(labelled)} images, over the limit of "
                    f"{self.limits.max_examples} (PRELABEL_MAX_EXAMPLES_PER_DATASET); start a new dataset"
                )
            with (folder / "examples.tsv").open("a+b") as log:
                # Lines past the summary's revision are from a commit that died before its summary was
                # written: that upload failed (its client saw an error), so they are dropped, not kept
                # to shift every later snapshot.
                log.truncate(self._log_offset(log, info.revision))
                log.write("".join(f"{digest}\t{label}\n" for digest, label in lines).encode())
                log.flush()
                os.fsync(log.fileno())
            info.revision += len(lines)
            info.example_count = len(labelled)
            info.class_counts = dict(sorted(Counter(labelled.values()).items()))
            info.updated_at = now
            write_atomically(path, json.dumps(info.__dict__).encode())
            return info

    def _store_blob(self, content: bytes) -> str:
        digest = hashlib.sha256(content).hexdigest()
        path = self._blob(digest)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, content)
        return digest

    # -- layout ----------------------------------------------------------------------------------

    def _folder(self, name: str) -> Path:
        return self.root / validate_name(name, "dataset")

    def _blob(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise InvalidArgument(f"{digest!r} is not a sha256 digest")
        return self.root / ".blobs" / digest[:2] / digest

    def _replay(self, name: str, revision: int) -> dict[str, str]:
        labelled: dict[str, str] = {}
        path = self._folder(name) / "examples.tsv"
        if revision and path.is_file():
            with path.open(encoding="utf-8") as log:
                for _, line in zip(range(revision), log, strict=False):
                    digest, label = line.rstrip("\n").split("\t", 1)
                    labelled.pop(digest, None)  # a relabelled image moves to its latest position
                    if label:  # an empty label removes the image
                        labelled[digest] = label
        return labelled

    @staticmethod
    def _log_offset(log: BinaryIO, revision: int) -> int:
        """The byte offset just past the first ``revision`` lines of the log."""
        log.seek(0)
        for _ in range(revision):
            if not log.readline():
                break
        return log.tell()

    @staticmethod
    @contextlib.contextmanager
    def _locked(folder: Path) -> Iterator[None]:
        with (folder / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


class Upload:
    """One ``UploadExamples`` stream: examples are checked and their images stored as they arrive;
    nothing is added to the dataset until :meth:`commit`."""

    def __init__(self, store: DatasetStore, name: str, replace: bool = False) -> None:
        self.store = store
        self.name = name
        self.replace = replace
        self.added: list[tuple[str, str]] = []
        self.bytes = 0

    def add(self, examples: list[tuple[str, bytes, str]]) -> None:
        """``(image id, encoded image, label)`` triples; raises naming the first bad one by index."""
        limits = self.store.limits
        for image_id, content, label in examples:
            index = len(self.added)
            where = f"example {index}" + (f" (image id {image_id!r})" if image_id else "")
            if not label or len(label) > limits.max_label_chars or not label.isprintable():
                raise InvalidArgument(
                    f"{where}: label {label[:40]!r} is not valid: use 1-{limits.max_label_chars} printable "
                    "characters (no tabs or newlines). Nothing from this upload was added"
                )
            if len(content) > limits.max_image_bytes:
                raise ResourceExhausted(
                    f"{where}: the image is {len(content)} bytes, over the limit of {limits.max_image_bytes} "
                    "(PRELABEL_MAX_IMAGE_BYTES); downscale it. Nothing from this upload was added"
                )
            try:
                decode(content, _PROBE, limits.max_image_pixels)
            except ImageError as exc:
                error = ResourceExhausted if exc.code == "RESOURCE_EXHAUSTED" else InvalidArgument
                raise error(f"{where}: {exc}. Nothing from this upload was added") from None
            self.added.append((self.store._store_blob(content), label))
            self.bytes += len(content)

    def commit(self) -> DatasetInfo:
        if not self.added:
            raise InvalidArgument(f"the upload to dataset {self.name!r} had no examples; send at least one")
        return self.store._commit(self.name, self.added, self.replace)
