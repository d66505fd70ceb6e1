"""Tasks of real photos, from the photos that ship inside installed packages (no download).

A task asks which region of a photo a random crop comes from: each photo is cut into a grid of
cells, each cell is a class, and every image is a crop from inside its cell, its place random
and its side 35-70 % of the cell's (a patch of texture more than a view of the layout), resized
to 96 px. In the grey variant every crop is converted to grey and histogram-equalised, so only
texture and structure tell the classes apart, not colour or brightness.

The photos: scikit-learn's ``load_sample_images()`` (china.jpg, flower.jpg) and matplotlib's
``mpl-data/sample_data`` (grace_hopper.jpg). scikit-image's sample images are deliberately not
used: they are reserved for independent evaluation of the project.

| task                 | photo(s)               | classes | use in bench/label_efficiency.py |
|----------------------|------------------------|---------|----------------------------------|
| ``china-grey``       | china                  | 8       | tuning                           |
| ``flower-china``     | flower, china (colour) | 8       | tuning                           |
| ``flower-colour``    | flower (colour)        | 8       | tuning                           |
| ``hopper-grey``      | grace_hopper           | 8       | held out: only reported          |
| ``hopper-colour``    | grace_hopper           | 8       | held out: only reported          |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

CROP = 96


def photo(name: str) -> Image.Image:
    """One of the bundled photos, by file name; a clear error when the package that ships it is missing."""
    if name in ("china.jpg", "flower.jpg"):
        try:
            from sklearn.datasets import load_sample_image  # optional: bench and tests
        except ImportError as exc:
            raise RuntimeError(f"{name} ships with scikit-learn: pip install scikit-learn") from exc
        return Image.fromarray(load_sample_image(name))
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(f"{name} ships with matplotlib: pip install matplotlib") from exc
    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB")


@dataclass(frozen=True)
class Task:
    name: str
    photos: tuple[str, ...]
    rows: int
    cols: int
    grey: bool
    held_out: bool

    @property
    def classes(self) -> list[str]:
        return [f"{Path(p).stem}-r{r}c{c}" for p in self.photos for r in range(self.rows) for c in range(self.cols)]

    def sample(self, per_class: int, seed: int) -> tuple[list[Image.Image], list[str]]:
        """``per_class`` random crops of every cell, ``CROP`` px square: (images, labels)."""
        rng = np.random.default_rng(seed)
        images, labels = [], []
        names = iter(self.classes)
        for p in self.photos:
            full = photo(p)
            cell_w, cell_h = full.width // self.cols, full.height // self.rows
            for r in range(self.rows):
                for c in range(self.cols):
                    label = next(names)
                    for _ in range(per_class):
                        size = int(min(cell_w, cell_h) * rng.uniform(0.35, 0.7))
                        x = c * cell_w + int(rng.integers(0, cell_w - size + 1))
                        y = r * cell_h + int(rng.integers(0, cell_h - size + 1))
                        crop = full.crop((x, y, x + size, y + size)).resize((CROP, CROP), Image.Resampling.BILINEAR)
                        if self.grey:
                            crop = ImageOps.equalize(ImageOps.grayscale(crop)).convert("RGB")
                        images.append(crop)
                        labels.append(label)
        return images, labels


TASKS = {
    t.name: t
    for t in (
        Task("china-grey", ("china.jpg",), 2, 4, grey=True, held_out=False),
        Task("flower-china", ("flower.jpg", "china.jpg"), 2, 2, grey=False, held_out=False),
        Task("flower-colour", ("flower.jpg",), 2, 4, grey=False, held_out=False),
        Task("hopper-grey", ("grace_hopper.jpg",), 2, 4, grey=True, held_out=True),
        Task("hopper-colour", ("grace_hopper.jpg",), 2, 4, grey=False, held_out=True),
    )
}
