"""JPEG decoding, resizing and cropping on the GPU (nvJPEG through TorchCodec's ``decode_jpeg``).

On a GPU the CPU's decoding is the wall: an H100 decodes about 17,000 photos/s with nvJPEG, eight
CPU cores about 1,200 with Pillow (``../shared/GPU.md``). So a GPU instance decodes JPEGs in batches
on its own card and resizes and crops them there, all sizes together (:mod:`prelabel.models.resample`).
Everything else is as on the CPU path: an image goes to nvJPEG only when its frame header
(:mod:`prelabel.models.jpeg_frame`, nothing more is read) shows a JPEG nvJPEG decodes within the
pixel limit; any other image, and any JPEG that nvJPEG refuses, is decoded by
:func:`prelabel.preprocessing.decode`, which checks the limit on the header first and gives each
unusable image its own error, exactly as on a CPU instance. Photos come out upright by their EXIF
orientation, as on the CPU path (the header reader sends any EXIF it cannot read for certain there).

GPU memory is bounded: one pass decodes at most ``PIXELS_PER_PASS`` pixels (3 bytes each, uint8
RGB), and :mod:`prelabel.models.resample` resizes them on float16 canvases of at most as many
pixels (6 bytes each, plus a narrower intermediate): about 1 GiB at most with the default, whatever
the batch or the photos' sizes.

The same code runs on the CPU (``device="cpu"``, libjpeg-turbo), which is how CI tests it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from prelabel.batching import bounded
from prelabel.models import jpeg_frame, resample
from prelabel.preprocessing import ImageError, Preprocess, decode_or_error

log = logging.getLogger(__name__)

PIXELS_PER_PASS = 64 * 2**20  # decoded pixels held at once: 192 MiB of uint8 RGB
NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # Huffman-coded baseline, extended and progressive JPEGs

Decoded = torch.Tensor | ImageError  # uint8 [crop, crop, 3] on the device, or why the image is unusable


def decode_batch(
    images: Sequence[bytes], preprocess: Preprocess, device: torch.device, max_pixels: Sequence[int],
    pixels_per_pass: int = PIXELS_PER_PASS,
) -> list[Decoded]:  # fmt: skip
    """Every image decoded, resized and centre-cropped as :func:`decode` does, on ``device``."""
    out: dict[int, Decoded] = {}
    jpegs: list[tuple[int, jpeg_frame.Frame]] = []  # (index, frame) of the images nvJPEG decodes
    for i, content in enumerate(images):
        frame = _nvjpeg_frame(content, max_pixels[i])
        if frame is None:
            out[i] = _on_cpu(content, preprocess, max_pixels[i], device)
        else:
            jpegs.append((i, frame))
    for batch in bounded(jpegs, lambda jpeg: jpeg[1].width * jpeg[1].height, pixels_per_pass):  # a large one alone
        done = []
        decoded = decode_jpegs([images[i] for i, _ in batch], device, [frame.orientation for _, frame in batch])
        for (i, _), f in zip(batch, decoded, strict=True):
            if f is None:  # refused by nvJPEG (progressive, CMYK, corrupt...): the CPU path decides
                out[i] = _on_cpu(images[i], preprocess, max_pixels[i], device)
            else:
                done.append((i, f))
        squares = resample.resize_crop([f for _, f in done], preprocess, pixels_per_pass)
        for (i, _), pixels in zip(done, squares, strict=True):
            out[i] = pixels
    return [out[i] for i in range(len(images))]


def _nvjpeg_frame(content: bytes, max_pixels: int) -> jpeg_frame.Frame | None:
    """The frame header of a JPEG that nvJPEG decodes (8-bit, Huffman-coded, grey or three
    components) within the limits; None sends it to the CPU path.

    A JPEG that does not end with its end-of-image marker goes to the CPU too: nvJPEG decodes a
    truncated file without complaint (grey where the data stops), the CPU path rejects it. So does
    one over Pillow's decompression-bomb limit, which the CPU path reports."""
    if not content[-4096:].rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    frame = jpeg_frame.read_frame(content)
    if frame is None or frame.marker not in NVJPEG_FRAMES or frame.precision != 8 or frame.components not in (1, 3):
        return None
    pixels = frame.width * frame.height
    bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if not pixels or (max_pixels and pixels > max_pixels) or (bomb and pixels > bomb):
        return None
    return frame


def _on_cpu(content: bytes, preprocess: Preprocess, max_pixels: int, device: torch.device) -> Decoded:
    pixels = decode_or_error(content, preprocess, max_pixels)
    return pixels if isinstance(pixels, ImageError) else torch.tensor(pixels, device=device)


@functools.cache
def jpeg_decoder() -> tuple[str, Callable[..., Any]]:
    """TorchCodec's ``decode_jpeg`` (>= 0.16), which supersedes torchvision's (deprecated since 0.29);
    torchvision's where TorchCodec cannot load: an environment pinned to an older torch, such as the
    lent GPU machine's 2.11 or an NGC image, has no TorchCodec with image decoders. Same call, same
    pixels (tests/test_models.py). Looked up on first use: CPU instances never load it."""
    try:
        decoders = importlib.import_module("torchcodec.decoders")  # (its stubs do not export decode_jpeg)
        return "torchcodec", decoders.decode_jpeg
    except Exception as exc:  # absent, too old, or built for another torch (a failed library load)
        from torchvision.io import decode_jpeg as torchvision_decode_jpeg

        log.info("TorchCodec's JPEG decoder is unavailable (%s); the GPU path decodes with torchvision's", exc)
        return "torchvision", torchvision_decode_jpeg


def decode_jpegs(contents: list[bytes], device: torch.device, orientations: list[int]) -> list[torch.Tensor | None]:
    """uint8 ``[3, H, W]`` per JPEG, upright (EXIF ``orientations``, from :func:`jpeg_frame.read_frame`),
    in one batched call; on failure image by image, None where refused.

    TorchCodec turns each image by its EXIF itself (its reading equals the header reader's on every
    file that reader accepts: tests/test_jpeg_frame.py); torchvision's decoder does not on a GPU, so
    its images are turned here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: only read, so no copy is made
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoder, where it is the one
        data = [torch.frombuffer(c, dtype=torch.uint8) for c in contents]
        name, decode = jpeg_decoder()
        out: list[torch.Tensor | None]
        try:
            out = list(decode(data, mode="RGB", device=device))
        except RuntimeError:
            out = []
            for d in data:
                try:
                    out.append(decode(d, mode="RGB", device=device))
                except RuntimeError:
                    out.append(None)
    if name == "torchcodec":
        return out
    return [None if f is None else _upright(f, o) for f, o in zip(out, orientations, strict=True)]


def _upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A ``[3, H, W]`` image stored with EXIF ``orientation``, turned as a viewer shows it."""
    swap, flips = _TURNS.get(orientation, (False, ()))
    image = image.transpose(1, 2) if swap else image
    return (image.flip(flips) if flips else image).contiguous()


# preprocessing.ORIENTATIONS (Pillow's turns) on a [3, H, W] tensor: swap H and W or not, then flip these axes.
_TURNS: dict[int, tuple[bool, tuple[int, ...]]] = {
    2: (False, (2,)), 3: (False, (1, 2)), 4: (False, (1,)), 5: (True, ()), 6: (True, (2,)), 7: (True, (1, 2)),
    8: (True, (1,)),
}  # fmt: skip
