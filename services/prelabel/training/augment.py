"""Image augmentation on whole batches of tensors: random resized crops and horizontal flips.

One affine warp per image (``affine_grid`` + ``grid_sample``), so a batch is augmented in two tensor
operations on whichever device holds it, with no per-image Python loop. Colours are left alone: in
many labelling tasks colour *is* the signal (ripe or not, which photo a crop comes from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    min_scale: float = 0.35  # the smallest crop, as a share of the image's area
    max_ratio: float = 4 / 3  # aspect ratios between 1/max_ratio and max_ratio
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x``: normalised float ``[N, C, H, W]``; returns a batch of the same shape."""
        n = len(x)
        area = torch.empty(n).uniform_(self.min_scale, 1.0, generator=generator)
        log_ratio = torch.empty(n).uniform_(-math.log(self.max_ratio), math.log(self.max_ratio), generator=generator)
        ratio = log_ratio.exp()
        w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        if x.device.type == "cuda":  # from pinned memory: the copy does not wait for the GPU's queued work
            theta = theta.pin_memory()
        theta = theta.to(x.device, x.dtype, non_blocking=True)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
