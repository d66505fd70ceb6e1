"""Image folders with one subfolder per class, the layout ``prelabel train`` and ``finetune`` read."""

from __future__ import annotations

from pathlib import Path

from prelabel.errors import InvalidArgument
from prelabel.preprocessing import IMAGE_SUFFIXES

# Folders that tools leave beside the images: macOS's zip resource forks (``__MACOSX/``, full of
# ``._photo.jpg`` files that are not images), and hidden ones (``.ipynb_checkpoints``, ``.git``...).
SKIPPED = ("__MACOSX",)


def images_under(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth), sorted; hidden files and folders (``.name``, such
    as macOS's ``._photo.jpg`` and Jupyter's ``.ipynb_checkpoints``) and ``__MACOSX`` are not images."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not _skipped(p.relative_to(folder)))  # fmt: skip


def _skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part in SKIPPED for part in relative.parts)


def labelled_files(root: Path) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image under ``root``: ``root/cat/1.jpg`` is labelled ``cat``."""
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a folder; pass a folder with one subfolder of images per class")
    files = [(p, d.name) for d in sorted(root.iterdir()) if d.is_dir() and not _skipped(Path(d.name))
             for p in images_under(d)]  # fmt: skip
    if not files:
        raise InvalidArgument(f"no images under {root}: expected one subfolder of images per class")
    return files
