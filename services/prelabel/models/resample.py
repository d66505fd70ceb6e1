"""Pillow's resize-with-a-box for a whole batch of differently sized images: two matrix products.

The GPU path decodes photos of many sizes at once, and resizing them one by one costs kernel
launches, not arithmetic (an H200 profile: 6 ms of CPU for 64 photos, more than decoding them).
Resampling is linear, so each image's resize is ``A @ X @ B.T`` with ``A`` (``crop x rows``) and
``B`` (``crop x columns``) holding the filter's weights: the images are copied into one zero-padded
canvas (one copy each), the weights of all of them are computed at once on the device, and two
batched matrix products resize the batch, whatever the mix of sizes.

The weights are Pillow's (``ImagingResample``: the box's fractional position, a filter stretched by
the downscaling factor, windows clipped at the image's edges and renormalised; columns first, rounded
to 8 bits in between), so the GPU path crops the square the CPU path
(:func:`prelabel.preprocessing.resize_crop`) crops and resizes it as Pillow would, within a level
(Pillow's weights are fixed-point). The CPU path's draft-mode JPEG decoding still differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from prelabel.preprocessing import Preprocess, crop_box


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp_(min=0)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:  # Pillow's bicubic (a = -0.5)
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


# name -> (support at scale 1, filter); None: nearest neighbour. Unknown names resample bilinearly,
# as the CPU path does.
FILTERS: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None] = {
    "bilinear": (1.0, _triangle),
    "bicubic": (2.0, _cubic),
    "nearest": None,
}


def resize_crop(images: Sequence[torch.Tensor], preprocess: Preprocess, canvas_pixels: int = 64 * 2**20,
                dtype: torch.dtype | None = None) -> list[torch.Tensor]:  # fmt: skip
    """uint8 ``[3, H, W]`` images (one device) to uint8 ``[crop, crop, 3]``: each one's central square,
    resized as Pillow resizes it.

    The products run in ``dtype``: by default float16 on a GPU (tensor cores; pixel values and the
    8-bit intermediate are exact in it, the weights within 0.05 %) and float32 elsewhere.
    ``canvas_pixels`` bounds one canvas (three channels of ``dtype``: 6 or 12 bytes a pixel); images
    are sorted by size so that little of it is padding, and an image larger than the bound goes alone."""
    if not images:
        return []
    if dtype is None:
        dtype = torch.float16 if images[0].device.type == "cuda" else torch.float32
    filter_ = FILTERS.get(preprocess.interpolation, FILTERS["bilinear"])
    boxes = np.array([crop_box(im.shape[1], im.shape[2], preprocess) for im in images])  # [N, 3]
    sizes = np.array([im.shape[1:] for im in images])  # [N, 2]: height, width
    axes = [_windows(sizes[:, k], boxes[:, k], boxes[:, 2], preprocess.crop, filter_) for k in (0, 1)]
    extent = np.stack([axes[0][1][:, -1] - axes[0][0][:, 0], axes[1][1][:, -1] - axes[1][0][:, 0]], 1)
    order = sorted(range(len(images)), key=lambda n: (int(extent[n, 0]), int(extent[n, 1])))
    out: list[torch.Tensor] = [images[0]] * len(images)

    def canvas_size(chunk: list[int]) -> int:
        return len(chunk) * int(extent[chunk, 0].max()) * int(extent[chunk, 1].max())

    for chunk in _split(order, canvas_size, canvas_pixels):
        for n, pixels in zip(chunk, _resize(images, chunk, axes, extent, filter_, dtype), strict=True):
            out[n] = pixels
    return out


def _split(order: list[int], canvas_size: Callable[[list[int]], int], limit: int) -> list[list[int]]:
    """Consecutive chunks of ``order`` whose padded canvas stays within ``limit`` (a lone image may exceed it)."""
    chunks: list[list[int]] = [[]]
    for n in order:
        if chunks[-1] and canvas_size([*chunks[-1], n]) > limit:
            chunks.append([])
        chunks[-1].append(n)
    return chunks


Window = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


def _windows(length: npt.NDArray[np.int64], start: npt.NDArray[np.float64], side: npt.NDArray[np.float64],
             out: int, filter_: tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None) -> Window:  # fmt: skip
    """One axis of every image, as Pillow's ``precompute_coeffs``: for each output pixel the input
    window ``[first, end)``, its centre, and the filter's scale (``[N, out]`` each, ``[N]`` for the scale)."""
    scale = side / out
    center = start[:, None] + (np.arange(out) + 0.5) * scale[:, None]
    if filter_ is None:  # nearest: the pixel under the centre
        first = np.minimum(center.astype(np.int64), length[:, None] - 1)
        return first, first + 1, center, np.ones_like(scale)
    filterscale = np.maximum(scale, 1.0)
    support = filter_[0] * filterscale[:, None]
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    end = np.minimum(np.trunc(center + support + 0.5), length[:, None]).astype(np.int64)
    return first, end, center, 1.0 / filterscale


def _weights(axes: list[Window], chunk: list[int], size: int, device: torch.device,
             filter_: tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None) -> torch.Tensor:  # fmt: skip
    """``[2, n, out, size]`` float32 weights of both axes over each image's canvas positions (its
    window's first pixel at 0), computed together: a dozen operations for any batch."""
    host = []
    for first, end, center, inverse in axes:
        first, end, center, inverse = first[chunk], end[chunk], center[chunk], inverse[chunk]
        origin = first[:, :1]
        host.append([first - origin, end - origin, center - origin, np.broadcast_to(inverse[:, None], first.shape)])
    on_device = torch.from_numpy(np.array(host)).to(device=device, dtype=torch.float32)[..., None]  # one copy
    lo, hi, c, inv = on_device[:, 0], on_device[:, 1], on_device[:, 2], on_device[:, 3]
    j = torch.arange(size, device=device, dtype=torch.float32)
    inside = (j >= lo) & (j < hi)
    if filter_ is None:
        return inside.float()
    w = filter_[1]((j - c + 0.5) * inv) * inside
    return w / w.sum(-1, keepdim=True).clamp_(min=math.ulp(1.0))


def _resize(images: Sequence[torch.Tensor], chunk: list[int], axes: list[Window], extent: npt.NDArray[np.int64],
            filter_: tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None,
            dtype: torch.dtype) -> list[torch.Tensor]:  # fmt: skip
    device, n = images[chunk[0]].device, len(chunk)
    rows, cols = extent[chunk, 0].tolist(), extent[chunk, 1].tolist()
    height, width = max(rows), max(cols)
    canvas = torch.zeros((n, 3, height, width), device=device, dtype=dtype)
    for k, m in enumerate(chunk):  # the one operation per image
        top, left = int(axes[0][0][m, 0]), int(axes[1][0][m, 0])
        canvas[k, :, : rows[k], : cols[k]] = images[m][:, top : top + rows[k], left : left + cols[k]]
    weights = _weights(axes, chunk, max(height, width), device, filter_).to(dtype)
    a, b = weights[0, :, :, :height], weights[1, :, :, :width]  # [n, crop, rows], [n, crop, cols]
    crop = a.shape[1]
    # Columns first, rounded to 8 bits in between, as Pillow does (bicubic overshoots: clamped there too).
    x = (canvas.view(n, 3 * height, width) @ b.transpose(1, 2)).round_().clamp_(0, 255)  # [n, 3 rows, crop]
    x = x.view(n, 3, height, crop).transpose(1, 2).reshape(n, height, 3 * crop)
    y = (a @ x).round_().clamp_(0, 255).view(n, crop, 3, crop).transpose(2, 3)  # [n, crop, crop, 3]
    return list(y.to(torch.uint8, memory_format=torch.contiguous_format))
