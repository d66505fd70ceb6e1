"""Image decoding and preprocessing, shared by the Triton model and training (torch-free).

Each image is opened exactly once on the hot path, in the Triton model (:func:`decode`): the pixel
limit is checked on the header before any pixel is decoded (decompression bombs), and JPEG draft
mode decodes large photos at a reduced scale, several times faster than a full decode then resize.
The gateway does not parse images at all (docs/benchmarks.md has the measurements).

Only the central square that the model sees is resized (``Image.resize`` with a ``box``), so an
image of extreme aspect ratio (1 x 1,000,000 pixels) costs what a small one does, instead of
first being scaled to a strip of millions of pixels. Pillow's own decompression-bomb limit stays
in force (twice ``Image.MAX_IMAGE_PIXELS``, about 179 M pixels) beneath ours.

Photos are used upright, as every viewer shows them (Label Studio included): a camera stores its
pixels as the sensor saw them and records the turn in its EXIF ``Orientation`` tag. The turn is
applied to the small central square after the resize (:func:`resize_crop`), which is the same square
as turning the whole photo first, since the central square of a turned image is the turned central square.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for a set of weights: resize the short side, centre-crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bilinear")),
        )


# EXIF orientation (tag 0x0112) -> the turn that shows the stored pixels as a viewer does, as in
# Pillow's ``ImageOps.exif_transpose``. 1 (or any other value) is upright; 6 is a phone held upright.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
EXIF_ORIENTATION = 0x0112

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"})


class ImageError(ValueError):
    """An image that cannot be used; the message says why, ``code`` is the gRPC status name and
    ``status`` its number, which travels from the Triton model to the gateway (``ERROR_CODE``)."""

    code = "INVALID_ARGUMENT"
    status = 3


class TooManyPixels(ImageError):
    code = "RESOURCE_EXHAUSTED"
    status = 8


def decode(content: bytes, preprocess: Preprocess, max_pixels: int = 0) -> npt.NDArray[Any]:
    """Decode, resize the short side, centre-crop: ``uint8 [crop, crop, 3]`` RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(content))
            if max_pixels and image.width * image.height > max_pixels:
                raise TooManyPixels(
                    f"{image.width}x{image.height} pixels is over the limit of {max_pixels} "
                    "(PRELABEL_MAX_IMAGE_PIXELS); downscale the image"
                )
            scale = preprocess.resize / min(image.width, image.height)
            # JPEG: decode directly at the smallest scale that is still >= the target size.
            image.draft("RGB", (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
            pixels = eight_bit(image)
            pixels = pixels.convert("RGBA" if pixels.has_transparency_data else "RGB")
            return resize_crop(pixels, preprocess, orientation(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the image could not be decoded: not a JPEG, PNG, WebP or other known format") from None
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked on the header in Image.open
        ours = f"over the limit of {max_pixels} pixels (PRELABEL_MAX_IMAGE_PIXELS) and " if max_pixels else ""
        raise TooManyPixels(
            f"the image is {ours}over Pillow's decompression-bomb limit ({exc}); downscale it"
        ) from None
    except MemoryError:
        raise TooManyPixels("the image needs more memory to decode than is available; downscale it") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"the image could not be decoded (corrupt or truncated?): {exc}") from None


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey images (PNG, TIFF: microscopy, medical, depth) by their high byte, as browsers show
    a 16-bit PNG; Pillow converts them to RGB by clipping at 255, which makes most of them white."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    return Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8), "L")


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1 to 8), 1 where it has none or its EXIF cannot be read.

    From the EXIF block only, as browsers read it: not from XMP, which Pillow's ``getexif`` also
    consults but no browser does, so Label Studio would show such a photo as stored."""
    try:
        if isinstance(block := image.info.get("exif"), bytes):  # JPEG, PNG, WebP
            exif = Image.Exif()
            exif.load(block)
        elif image.format == "TIFF":  # its own tags
            exif = image.getexif()
        else:
            return 1
        value = exif.get(EXIF_ORIENTATION, 1)
    except Exception:  # damaged EXIF: Pillow raises a variety of errors; the pixels are still good
        return 1
    return value if isinstance(value, int) and value in ORIENTATIONS else 1


def decode_or_error(content: bytes, preprocess: Preprocess, max_pixels: int = 0) -> npt.NDArray[Any] | ImageError:
    """:func:`decode`, returning an unusable image's error instead of raising it: in a batch, each
    image keeps its own error and the others go on."""
    try:
        return decode(content, preprocess, max_pixels)
    except ImageError as exc:
        return exc


def crop_box(height: int, width: int, preprocess: Preprocess) -> tuple[float, float, float]:
    """``(top, left, side)`` of the central square the model sees, in the image's own pixels (the CPU
    and the GPU path crop the same square)."""
    # At most the short side: ``crop / (resize / short)`` can come out a hair over it
    # (64 / (64 / 107) = 107.00000000000001), and Pillow refuses a negative offset.
    side = min(preprocess.crop * min(width, height) / preprocess.resize, width, height)
    return (height - side) / 2, (width - side) / 2, side


def resize_crop(image: Image.Image, preprocess: Preprocess, orientation: int = 1) -> npt.NDArray[Any]:
    """Resize the short side of an RGB or RGBA image to ``resize`` and take the central ``crop``
    square, resizing only that square, turned upright by its EXIF ``orientation`` (Pillow turns the
    small square in 30 us). Transparent pixels are shown on white, as a page shows them: dropping the
    alpha channel would show whatever colour they happen to hold (often black, so that a dark object
    on a transparent background vanishes)."""
    top, left, side = crop_box(image.height, image.width, preprocess)
    resample = _RESAMPLE.get(preprocess.interpolation, Image.Resampling.BILINEAR)
    image = image.resize((preprocess.crop, preprocess.crop), resample, box=(left, top, left + side, top + side),
                         reducing_gap=3.0)  # fmt: skip
    if orientation in ORIENTATIONS:
        image = image.transpose(ORIENTATIONS[orientation])
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return np.asarray(image, dtype=np.uint8)
