#!/usr/bin/env python3
"""Where and how to decode: cost per image of each decoding path, and bytes on the wire per option.

    .venv/bin/python bench/preprocessing.py [--repeat 20]

Decoding is the dominant preprocessing cost. This measures, side by side in one run, a full decode
then resize against the JPEG draft decode that Prelabel uses (libjpeg scales by 1/2, 1/4 or 1/8
while decoding), and what each placement sends from gateway to Triton: the encoded file, uint8
pixels at the model's input size (decode in the gateway), or float32 (normalise in the gateway).
Then what turning photos upright by their EXIF orientation costs: the same JPEG without EXIF, with a
camera's EXIF block (orientation 1) and turned (orientation 6), in alternating rounds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prelabel.datasets import shapes
from prelabel.preprocessing import Preprocess, decode, resize_crop


def full_decode(blob: bytes, p: Preprocess) -> np.ndarray:  # type: ignore[type-arg]
    return resize_crop(Image.open(io.BytesIO(blob)).convert("RGB"), p)


def timed(fn, blob: bytes, p: Preprocess, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn(blob, p)
    started = time.perf_counter()
    for _ in range(repeat):
        fn(blob, p)
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'image':<18} {'file KB':>8} | {'full ms':>8} {'draft ms':>9} {'speed-up':>8} | "
          f"{'uint8 KB':>8} {'fp32 KB':>8}  (model input)")  # fmt: skip
    for fmt, size, crop in (("JPEG", 640, 224), ("JPEG", 1920, 224), ("JPEG", 4000, 224), ("PNG", 1920, 224),
                            ("JPEG", 1920, 64)):  # fmt: skip
        p = Preprocess(resize=crop if crop == 64 else 256, crop=crop)
        image = shapes.render(0, size, rng)
        out = io.BytesIO()
        image.save(out, fmt, quality=90)
        blob = out.getvalue()
        full = timed(full_decode, blob, p, args.repeat)
        draft = timed(decode, blob, p, args.repeat)
        print(
            f"{fmt + ' ' + str(size) + 'px ->' + str(crop):<18} {len(blob) / 1024:>8.0f} | {full:>8.1f} {draft:>9.1f} "
            f"{full / draft:>7.1f}x | {crop * crop * 3 / 1024:>8.0f} {crop * crop * 3 * 4 / 1024:>8.0f}"
        )

    orientation_cost(rng, args.repeat)


def camera_exif(orientation: int) -> bytes:
    """What a camera writes in IFD0 (make, model, resolution, date, orientation) and its Exif sub-IFD."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x011A], exif[0x011B] = "Canon", "EOS 5D Mark IV", 72.0, 72.0
    exif[0x0112], exif[0x0132] = orientation, "2024:05:01 10:00:00"
    exif.get_ifd(0x8769).update({0x829A: 0.004, 0x9003: "2024:05:01 10:00:00", 0xA002: 6000})
    return exif.tobytes()


def orientation_cost(rng: np.random.Generator, repeat: int, rounds: int = 7) -> None:
    image, p = shapes.render(0, 1920, rng), Preprocess(resize=256, crop=224)
    files = {}
    exifs = {"no EXIF": b"", "EXIF, orientation 1": camera_exif(1), "EXIF, orientation 6": camera_exif(6)}
    for name, exif in exifs.items():
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90, exif=exif)
        files[name] = out.getvalue()
    times: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(rounds):
        for name, blob in files.items():
            times[name].append(timed(decode, blob, p, repeat))
    base = statistics.median(times["no EXIF"])
    print(f"\nJPEG 1920px -> 224, median of {rounds} alternating rounds of {repeat}:")
    for name, values in times.items():
        print(f"  {name:<22} {statistics.median(values):6.2f} ms  ({statistics.median(values) / base:.3f}x)")


if __name__ == "__main__":
    main()
