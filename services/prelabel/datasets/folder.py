"""Image folders with one subfolder per class, the layout ``prelabel train`` and ``finetune`` read."""

from __future__ import annotations

from pathlib import Path

from prelabel.errors import InvalidArgument
from prelabel.preprocessing import IMAGE_SUFFIXES


def labelled_files(root: Path) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image under ``root``: ``root/cat/1.jpg`` is labelled ``cat``."""
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a folder; pass a folder with one subfolder of images per class")
    files = [(p, d.name) for d in sorted(root.iterdir()) if d.is_dir() for p in sorted(d.rglob("*"))
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]  # fmt: skip
    if not files:
        raise InvalidArgument(f"no images under {root}: expected one subfolder of images per class")
    return files
