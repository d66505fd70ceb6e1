"""Writing files that other processes read while we write: all or nothing, never half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to a unique temporary file beside ``path``, fsync it, then rename it into place.

    Readers see the old file or the new one; concurrent writers each rename a whole file; a crash
    leaves at most a stray temporary file, never a truncated ``path``.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
