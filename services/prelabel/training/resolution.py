"""From scratch's input size: the images' own resolution, within what the base and the compute allow.

The transfer strategies must see images as their base was trained to (its preprocessing). From
scratch has no pre-trained input size, and resolution is its largest lever: the textbook ResNet-18
loses 2.5-5.5 points at the built-in base's 64 px against the photos' native 96 px, and Prelabel's
recipe gains about 2 at 96 px (bench/scratch_gap.py, tuning tasks; docs/benchmarks.md). So it
trains at the images' median shorter side, never below the base's crop (small images are enlarged
as they are for the base) and at most ``MAX_SIZE``: compute grows with the square of the side
(96 px costs 2.3x of 64 px).
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from prelabel.preprocessing import Preprocess

MAX_SIZE = 96


def scratch_preprocess(base: Preprocess, short_sides: list[int]) -> Preprocess:
    """From scratch's preprocessing: ``base``'s, at the images' own size within ``[base.crop, MAX_SIZE]``.

    The whole central square is used (resize = crop), as the textbook recipe uses whole images.
    """
    native = int(statistics.median(short_sides)) if short_sides else base.crop
    size = max(base.crop, min(native, MAX_SIZE))
    return base if size == base.crop else replace(base, resize=size, crop=size)
