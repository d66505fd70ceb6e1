"""Writing files that other processes read while we write: all or nothing, never half a file."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@functools.cache
def umask() -> int:
    """This process's umask, read once without changing it (``os.umask`` sets it: a race with other
    threads), not at every file written."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    return 0o022


def share(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open()`` or ``mkdir()`` would: ``tempfile`` makes files
    0600 and folders 0700, which no other user can read, and Triton, trainers and gateways may run as
    different users on one shared volume (Kubernetes)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An ``OSError`` raised inside names ``path``: a write on a full disk says only "No space left on
    device", and the operator's log line should say where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # one from the system, not a bare message
            exc.filename = str(path)
        raise


def write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to a unique temporary file beside ``path``, fsync it, then rename it into place.

    Readers see the old file or the new one; concurrent writers each rename a whole file; a crash
    leaves at most a stray temporary file, never a truncated ``path``. The file gets the permissions
    a plain ``open()`` would give it (:func:`share`).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        share(Path(tmp))
        with naming(path), os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
