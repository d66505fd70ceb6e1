"""Header inspection and decoding: what the gateway and the Triton model rely on."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from prelabel.preprocessing import ImageError, Preprocess, TooManyPixels, decode
from tests.conftest import encode

PRE = Preprocess(resize=64, crop=56)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "AVIF", "BMP", "GIF", "TIFF"])
def test_decode_resizes_short_side_and_centre_crops(fmt):
    image = Image.new("RGB", (400, 200), (200, 10, 10))
    image.paste((10, 200, 10), (0, 0, 100, 200))  # a green left quarter, cropped away by the centre crop
    pixels = decode(encode(image, fmt), PRE)
    assert pixels.shape == (56, 56, 3) and pixels.dtype == np.uint8
    assert pixels[:, :, 0].mean() > 150 and pixels[:, :, 1].mean() < 60


def test_jpeg_draft_decode_matches_full_decode():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (1600, 1200, 3), dtype=np.uint8)).resize((1200, 1600))
    blob = encode(photo.resize((120, 160)).resize((1200, 1600)), "JPEG", quality=95)
    fast = decode(blob, PRE).astype(float)
    full = np.asarray(
        Image.open(__import__("io").BytesIO(blob)).convert("RGB").resize((64, 85), Image.Resampling.BILINEAR)
    )
    full = full[(85 - 56) // 2 : (85 - 56) // 2 + 56, 4:60].astype(float)
    assert np.abs(fast - full).mean() < 12  # same picture, small resampling differences


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    # A 20,000 x 20,000 PNG header: decoding would need 1.2 GB; the limit is checked before that.
    blob = encode(Image.new("RGB", (321, 123)), "PNG")
    ihdr = b"IHDR" + (20_000).to_bytes(4, "big") * 2 + blob[24:29]
    bomb = blob[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + blob[33:]
    with pytest.raises(TooManyPixels, match="limit of 40000000 pixels") as err:
        decode(bomb, PRE, max_pixels=40_000_000)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert Image.MAX_IMAGE_PIXELS, "Pillow's own bomb limit is left in force for everyone else in the process"
    with pytest.raises(TooManyPixels, match="decompression-bomb"):
        decode(bomb, PRE)  # no limit of ours: Pillow's still holds


@pytest.mark.parametrize("size", [(1, 100_000), (1_000_000, 1), (3, 400_000)])
def test_extreme_aspect_ratios_cost_what_a_small_image_does(size):
    """Issue 11: a 277-byte 1 x 100,000 PNG took 4.2 s and 2 GB (scaled to a 64 x 6.4 M strip first)."""
    import resource
    import time

    blob = encode(Image.new("RGB", size, (0, 90, 200)), "PNG")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.process_time()
    pixels = decode(blob, PRE, max_pixels=40_000_000)
    assert pixels.shape == (56, 56, 3) and abs(int(pixels[..., 2].mean()) - 200) <= 2
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100 and time.process_time() - started < 1.0, (grown_mb, time.process_time() - started)


def test_running_out_of_memory_is_a_per_image_error(monkeypatch):
    import prelabel.preprocessing as preprocessing

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(preprocessing, "resize_crop", exhausted)
    with pytest.raises(TooManyPixels, match="more memory") as err:
        decode(encode(Image.new("RGB", (80, 80)), "PNG"), PRE)
    assert err.value.code == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "not a JPEG, PNG, WebP"), (b"hello", "not a JPEG, PNG, WebP"), (b"\xff\xd8\xff\xe0garbage", "corrupt")],
)
def test_undecodable_input(content, words):
    with pytest.raises(ImageError, match=words) as err:
        decode(content, PRE)
    assert err.value.code == "INVALID_ARGUMENT"


def test_decode_rejects_truncated_and_too_large_images():
    blob = encode(Image.new("RGB", (300, 300), "blue"), "JPEG")
    with pytest.raises(ImageError, match="could not be decoded"):
        decode(blob[: len(blob) // 2], PRE)
    with pytest.raises(ImageError, match="over the limit"):
        decode(encode(Image.new("RGB", (3000, 3000)), "PNG"), PRE, max_pixels=1_000_000)


@pytest.mark.parametrize("size", [(160, 107), (640, 427), (107, 160), (333, 999)])
def test_a_crop_as_large_as_the_short_side_never_falls_outside_the_image(size):
    """crop == resize (the built-in base): 64 / (64 / 107) is 107.00000000000001, once a negative box
    offset and an INVALID_ARGUMENT for a good photo (one of scikit-learn's, 640 x 427, through draft mode)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        pixels = decode(encode(image, fmt), Preprocess(resize=64, crop=64))
        assert pixels.shape == (64, 64, 3)


# How each EXIF orientation was stored, given the upright picture: the inverse of the turn a viewer makes.
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}  # fmt: skip


def oriented(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    """``upright`` stored as a camera stores it: pixels as the sensor saw them, the turn in EXIF."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(STORED[orientation]) if orientation in STORED else upright
    return encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "AVIF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_photos_are_used_upright_as_viewers_show_them(orientation, fmt):
    """A phone stores a portrait photo's pixels on their side with EXIF orientation 6; Label Studio and
    every viewer show it upright, so the model must see it upright too, for training and prediction."""
    from PIL import ImageOps
    from sklearn.datasets import load_sample_images

    upright = Image.fromarray(load_sample_images().images[1][100:250, 200:420])  # 220 x 150, no symmetry
    content = oriented(upright, orientation, fmt)
    with Image.open(__import__("io").BytesIO(content)) as image:  # the test's files, checked against Pillow's viewer
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(image).convert("RGB")).shape, (150, 220, 3))
    got = decode(content, PRE).astype(float)
    # The model sees the upright picture (small resampling and JPEG differences), not any other turn of it.
    turns = {o: upright.transpose(STORED[o]) if o in STORED else upright for o in range(1, 9)}
    distances = {o: np.abs(got - decode(oriented(turn, 1, fmt), PRE)).mean() for o, turn in turns.items()}
    assert min(distances, key=distances.__getitem__) == 1 and distances[1] < 4, distances


@pytest.mark.parametrize("exif", [b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x09\0\0\0",  # 9: no such turn
                                  b"Exif\0\0II*\0\xff\xff\0\0", b"Exif\0\0XX", b"not exif at all"])  # fmt: skip
def test_unreadable_or_unknown_orientations_leave_the_pixels_as_stored(exif):
    image = Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3))
    assert np.array_equal(decode(encode(image, "JPEG", exif=exif, quality=95), PRE),
                          decode(encode(image, "JPEG", quality=95), PRE))  # fmt: skip


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_transparent_pixels_are_white_whatever_colour_they_hold(fmt):
    """A cut-out product photo: a black object on a transparent background. Dropping the alpha channel
    would show the background's hidden colour (black here: the object vanishes); a page shows white."""
    hidden = np.zeros((80, 120, 4), dtype=np.uint8)  # transparent black, as many editors store it
    hidden[20:60, 40:80] = (10, 10, 10, 255)  # the opaque object, in the centre
    image = Image.fromarray(hidden, "RGBA")
    if fmt == "GIF":  # a palette with one transparent entry
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        image.info["transparency"] = image.getpixel((0, 0))
    options = {"lossless": True} if fmt == "WEBP" else {}
    pixels = decode(encode(image, fmt, **options), PRE).astype(int)
    assert pixels[:8].min() >= 250 and pixels[-8:].min() >= 250  # the background: white
    assert pixels[20:36, 20:36].max() <= 30  # the object: still dark
    if fmt != "GIF":
        other = hidden.copy()
        other[hidden[..., 3] == 0] = (255, 0, 0, 0)  # the same picture, another hidden colour
        again = decode(encode(Image.fromarray(other, "RGBA"), fmt, **options), PRE).astype(int)
        assert np.abs(again - pixels).max() <= 2


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_images_are_seen_as_browsers_show_them(fmt):
    """Microscopy, medical and depth images are often 16-bit grey; Pillow's own conversion to RGB
    clips them at 255 (all white). They are seen by their high byte, as a browser shows a 16-bit PNG."""
    rng = np.random.default_rng(0)
    deep = (rng.integers(0, 256, (10, 15)).repeat(8, 0).repeat(8, 1) * 257).astype(np.uint16)  # 80 x 120
    pixels = decode(encode(Image.fromarray(deep), fmt), PRE)
    assert Image.open(__import__("io").BytesIO(encode(Image.fromarray(deep), fmt))).mode.startswith("I")
    expected = decode(encode(Image.fromarray((deep >> 8).astype(np.uint8)), "PNG"), PRE)
    assert np.array_equal(pixels, expected) and pixels.std() > 30
