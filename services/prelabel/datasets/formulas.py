"""Prelabel Formulas: many classes of formula-driven images, for pre-training without downloads.

Formula-driven pre-training (FractalDB, Kataoka et al., ACCV 2020; "Learning to See by Looking at
Noise", Baradad et al., NeurIPS 2021) teaches features that transfer to real photos from images
that no camera took. Prelabel's base model learns to tell apart 256 classes of four families, each
image drawn with random colours, position, scale and a random background so that only the formula
identifies the class:

- **fractals** (128 classes): each class is one iterated function system of 2-4 random affine maps
  (FractalDB's recipe, with its filling-ratio check), rendered by the chaos game: shape, curvature
  and self-similarity;
- **noise** (64): Gaussian noise with a power spectrum 1/f^a, oriented and anisotropic by class
  (exponent x orientation x elongation): the statistics of natural textures;
- **gratings** (32): sums of oriented sinusoids at class frequencies and angles, with phase jitter:
  periodic texture and orientation;
- **dead leaves** (32): occluding discs or squares whose sizes follow a class power law, over the
  image (the classic model of natural image statistics): edges, occlusion, scale.

Everything is vectorised numpy; a seed fixes every image, so the dataset is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FRACTALS, NOISE, GRATINGS, LEAVES = 128, 64, 32, 32
NUM_CLASSES = FRACTALS + NOISE + GRATINGS + LEAVES
SYSTEM_SEED = 20261125  # fixes the fractal systems, hence the classes


def class_name(c: int) -> str:
    if c < FRACTALS:
        return f"fractal-{c:03d}"
    c -= FRACTALS
    if c < NOISE:
        return f"noise-{c:02d}"
    c -= NOISE
    return f"grating-{c:02d}" if c < GRATINGS else f"leaves-{c - GRATINGS:02d}"


CLASSES: tuple[str, ...] = tuple(class_name(c) for c in range(NUM_CLASSES))


def _fractal_systems(count: int, seed: int = SYSTEM_SEED) -> list[npt.NDArray[np.float64]]:
    """FractalDB's search: random 2-4 map systems kept when their attractor fills enough of the plane."""
    rng = np.random.default_rng(seed)
    systems: list[npt.NDArray[np.float64]] = []
    while len(systems) < count:
        n = int(rng.integers(2, 5))
        maps = rng.uniform(-1.0, 1.0, size=(n, 6))
        points = _chaos(maps, rng, chains=64, steps=64)
        lo, hi = points.min(0), points.max(0)
        if not np.all(np.isfinite(points)) or np.any(hi - lo < 1e-3) or np.any(np.abs(points) > 1e3):
            continue
        grid = np.floor((points - lo) / (hi - lo + 1e-9) * 32).astype(int)
        if len({(a, b) for a, b in grid}) / 1024 > 0.15:  # degenerate attractors are lines or points
            systems.append(maps)
    return systems


def _probabilities(maps: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2]) + 1e-3
    return np.asarray(det / det.sum())


def _chaos(maps: npt.NDArray[np.float64], rng: np.random.Generator, chains: int, steps: int) -> npt.NDArray[np.float64]:
    """Points of the attractor: many chaos-game chains in parallel, their first steps discarded."""
    p = _probabilities(maps)
    xy = rng.uniform(-1, 1, size=(chains, 2))
    out = []
    for step in range(steps):
        m = maps[rng.choice(len(maps), size=chains, p=p)]
        xy = np.stack([m[:, 0] * xy[:, 0] + m[:, 1] * xy[:, 1] + m[:, 4],
                       m[:, 2] * xy[:, 0] + m[:, 3] * xy[:, 1] + m[:, 5]], axis=1)  # fmt: skip
        if step >= 8:
            out.append(xy)
    return np.concatenate(out)


_SYSTEMS: list[npt.NDArray[np.float64]] = []


def _background(rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    """A random smooth colour gradient with a little noise: no class information in the background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    return np.asarray(a * (1 - t) + b * t + rng.normal(0, 6, (size, size, 3)), dtype=np.float32)


def _fractal(c: int, rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    if not _SYSTEMS:
        _SYSTEMS.extend(_fractal_systems(FRACTALS))
    maps = _SYSTEMS[c].copy()
    maps[:, :4] *= rng.uniform(0.9, 1.1, size=(len(maps), 4))  # FractalDB's per-instance jitter
    points = _chaos(maps, rng, chains=256, steps=72)
    lo, hi = np.percentile(points, 1, axis=0), np.percentile(points, 99, axis=0)
    scale = rng.uniform(0.55, 0.95) * size / max(float(np.max(hi - lo)), 1e-6)
    centre = rng.uniform(0.35, 0.65, 2) * size
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    xy = ((points - (lo + hi) / 2) @ rot.T) * scale + centre
    ij = np.floor(xy).astype(int)
    keep = np.all((ij >= 0) & (ij < size), axis=1)
    density = np.zeros((size, size), np.float32)
    np.add.at(density, (ij[keep, 1], ij[keep, 0]), 1.0)
    alpha = np.clip(density / max(float(np.percentile(density[density > 0], 60)) if keep.any() else 1.0, 1.0), 0, 1)
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    image = _background(rng, size)
    blended: npt.NDArray[np.float32] = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return blended


def _noise(c: int, rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    exponent = (1.0, 1.6, 2.2, 2.8)[c % 4]
    orientation = (c // 4) % 4 * math.pi / 4
    elongation = (1.0, 2.0, 4.0, 8.0)[c // 16]
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    angle = orientation + rng.normal(0, 0.08)
    u = fx * math.cos(angle) + fy * math.sin(angle)
    v = -fx * math.sin(angle) + fy * math.cos(angle)
    radius = np.sqrt((u * elongation) ** 2 + v**2)
    radius[0, 0] = 1.0
    amplitude = radius ** (-exponent / 2)
    amplitude[0, 0] = 0.0
    channels = []
    mix = rng.normal(0, 1, (3, 3))  # colours: a random mix of three noise fields
    fields = [np.real(np.fft.ifft2(amplitude * np.exp(2j * math.pi * rng.uniform(size=(size, size)))))
              for _ in range(3)]  # fmt: skip
    fields = [(f - f.mean()) / (f.std() + 1e-9) for f in fields]
    for k in range(3):
        channels.append(sum(mix[k, j] * fields[j] for j in range(3)))
    image = np.stack(channels, axis=-1)
    image = image / (np.abs(image).max() + 1e-9)
    return np.asarray(image * rng.uniform(60, 127) + rng.uniform(64, 192, 3), dtype=np.float32)


def _grating(c: int, rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    frequency = (2.0, 4.0, 7.0, 11.0)[c % 4]
    angle = (c // 4) % 4 * math.pi / 4 + rng.normal(0, 0.05)
    crossed = c // 16 == 1  # a second grating at right angles
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    wave = np.sin(2 * math.pi * frequency * (math.cos(angle) * xx + math.sin(angle) * yy) + rng.uniform(0, 2 * math.pi))
    if crossed:
        f2 = frequency * rng.uniform(0.8, 1.25)
        wave = wave + np.sin(2 * math.pi * f2 * (-math.sin(angle) * xx + math.cos(angle) * yy) + rng.uniform(0, 7))
    wave = wave / np.abs(wave).max()
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = ((wave + 1) / 2)[..., None]
    return np.asarray(a * (1 - t) + b * t + rng.normal(0, 8, (size, size, 3)), dtype=np.float32)


def _leaves(c: int, rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    squares = c % 2 == 1
    alpha = (1.5, 2.0, 2.5, 3.0)[(c // 2) % 4]  # size ~ r^-alpha: small alpha, large leaves
    grey = c // 8 % 2 == 1
    smallest = (0.02, 0.05)[c // 16]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), np.float32)
    covered = np.zeros((size, size), bool)
    for _ in range(200):  # front to back: each leaf fills what is not covered yet
        u = rng.uniform()
        r = smallest * (1 - u) ** (-1 / (alpha - 1))
        r = min(r, 0.5)
        cx, cy = rng.uniform(-0.1, 1.1, 2)
        distance = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) if squares else np.hypot(xx - cx, yy - cy)
        mask = distance < r
        mask &= ~covered
        colour = np.full(3, rng.uniform(0, 255)) if grey else rng.uniform(0, 255, 3)
        image[mask] = colour
        covered |= mask
        if covered.all():
            break
    image[~covered] = rng.uniform(0, 255, 3)
    return np.asarray(image + rng.normal(0, 4, image.shape), dtype=np.float32)


def render(c: int, size: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """One image of class ``c``, ``[size, size, 3]`` uint8."""
    if c < FRACTALS:
        image = _fractal(c, rng, size)
    elif c < FRACTALS + NOISE:
        image = _noise(c - FRACTALS, rng, size)
    elif c < FRACTALS + NOISE + GRATINGS:
        image = _grating(c - FRACTALS - NOISE, rng, size)
    else:
        image = _leaves(c - FRACTALS - NOISE - GRATINGS, rng, size)
    if rng.uniform() < 0.5:
        image = image[:, ::-1]
    return np.clip(image, 0, 255).astype(np.uint8)


def sample(count: int, size: int, seed: int, classes: Sequence[int] = range(NUM_CLASSES)
           ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:  # fmt: skip
    """``count`` images of ``classes``, balanced, in a seeded order: ``([N, size, size, 3], [N])``."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.asarray(classes)[np.arange(count) % len(classes)])
    images = np.stack([render(int(c), size, rng) for c in labels])
    return images, labels.astype(np.int64)
