"""The GPU path's JPEG frame reader against Pillow, on well-formed and damaged files."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from prelabel.models import device_decode
from prelabel.models.jpeg_frame import Frame, read_frame
from prelabel.preprocessing import Preprocess, decode, orientation
from tests.conftest import encode, nvjpeg_pixels

PHOTO = Image.fromarray(load_sample_images().images[0][:150, :220])
THUMBNAIL = encode(PHOTO.resize((40, 30)), "JPEG")  # a JPEG inside the EXIF segment: its frame is not the file's


def _variants() -> dict[str, bytes]:
    return {
        "baseline": encode(PHOTO, "JPEG", quality=90),
        "progressive": encode(PHOTO, "JPEG", progressive=True),
        "optimized, 4:4:4": encode(PHOTO, "JPEG", optimize=True, subsampling=0),
        "grey": encode(PHOTO.convert("L"), "JPEG"),
        "cmyk": encode(PHOTO.convert("CMYK"), "JPEG"),
        "rgb, not ycbcr (adobe)": encode(PHOTO, "JPEG", keep_rgb=True),
        "restart markers": encode(PHOTO, "JPEG", restart_marker_rows=1),
        "comment, icc, xmp": encode(PHOTO, "JPEG", comment=b"hello", icc_profile=b"\0" * 70000, xmp=b"<x/>"),
        "exif with a thumbnail": encode(PHOTO, "JPEG", exif=b"Exif\0\0MM\0*\0\0\0\x08\0\0" + THUMBNAIL),
        "one pixel": encode(PHOTO.crop((0, 0, 1, 1)), "JPEG"),
    }


def _pillow(content: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) as Pillow reads them, or None where it cannot open the file as a JPEG."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged EXIF
            image = Image.open(io.BytesIO(content))
    except Exception:
        return None
    if image.format not in ("JPEG", "MPO"):
        return None
    return image.width, image.height, {"L": 1, "RGB": 3, "CMYK": 4}[image.mode]


@pytest.mark.parametrize("name", list(_variants()))
def test_the_frame_is_the_one_pillow_reads(name):
    content = _variants()[name]
    frame = read_frame(content)
    assert frame is not None, name
    assert (frame.width, frame.height, frame.components) == _pillow(content), name
    assert frame.precision == 8
    assert frame.marker == (0xC2 if name == "progressive" else 0xC0)


def test_damaged_headers_are_refused_or_read_as_pillow_reads_them():
    """Every cut inside the header, and 3,000 random byte changes in it: the reader never raises, and
    whatever it accepts Pillow reads with the same size (Pillow is the more lenient of the two)."""
    content = _variants()["exif with a thumbnail"]
    scan = content.index(b"\xff\xda")
    for cut in range(scan + 4):  # the scan's marker and length must be there
        assert read_frame(content[:cut]) is None, cut
    rng = np.random.default_rng(0)
    accepted = 0
    for _ in range(3000):
        damaged = bytearray(content)
        for at in rng.integers(0, scan + 4, size=rng.integers(1, 4)):
            damaged[at] = int(rng.integers(0, 256))
        frame = read_frame(bytes(damaged))
        if frame is not None and frame.components in (1, 3, 4) and frame.precision == 8:
            accepted += 1
            pillow = _pillow(bytes(damaged))
            assert pillow is None or pillow == (frame.width, frame.height, frame.components)
    assert accepted > 100  # most changes land in tables and leave the walk intact


def _with_frame(content: bytes, *, marker: int | None = None, precision: int | None = None,
                size: tuple[int, int] | None = None) -> bytes:  # fmt: skip
    """The file with its frame header changed in place."""
    data = bytearray(content)
    at = next(i for i in range(len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    if marker is not None:
        data[at + 1] = marker
    if precision is not None:
        data[at + 4] = precision
    if size is not None:
        data[at + 5 : at + 9] = size[1].to_bytes(2, "big") + size[0].to_bytes(2, "big")
    return bytes(data)


def test_only_what_nvjpeg_decodes_goes_to_it():
    """8-bit Huffman-coded grey or three-component JPEGs within both limits; every other file goes to
    the CPU path, which decodes it or says why not, as on a CPU instance."""
    variants = _variants()
    assert nvjpeg_pixels(variants["baseline"], 0) == 220 * 150
    assert nvjpeg_pixels(variants["progressive"], 220 * 150) == 220 * 150
    assert nvjpeg_pixels(variants["grey"], 0) == 220 * 150
    assert nvjpeg_pixels(variants["cmyk"], 0) is None
    baseline = variants["baseline"]
    for marker in (0xC3, 0xC9, 0xCA):  # lossless, arithmetic-coded: not nvJPEG's
        assert nvjpeg_pixels(_with_frame(baseline, marker=marker), 0) is None
    assert nvjpeg_pixels(_with_frame(baseline, precision=12), 0) is None
    assert nvjpeg_pixels(_with_frame(baseline, size=(0, 150)), 0) is None
    bomb = _with_frame(baseline, size=(65000, 65000))  # over Pillow's own limit: the CPU path reports it
    assert read_frame(bomb) == Frame(0xC0, 8, 65000, 65000, 3)
    assert nvjpeg_pixels(bomb, 0) is None
    assert nvjpeg_pixels(b"\xff\xd8\xff\xd9", 0) is None
    assert nvjpeg_pixels(encode(PHOTO, "PNG") + b"\xff\xd9", 0) is None


def _exif(orientation: int, *, little_endian: bool = False, kind: int = 3) -> bytes:
    """A camera's EXIF block: make, model, resolution, date, the orientation, a sub-IFD."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x011A], exif[0x0132] = "Canon", "EOS 5D", 72.0, "2024:05:01 10:00:00"
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x829A] = 0.004  # exposure time, in the Exif sub-IFD
    block = exif.tobytes()
    if little_endian or kind != 3:  # written by hand: one entry, the orientation
        order = "little" if little_endian else "big"
        entry = (0x0112).to_bytes(2, order) + kind.to_bytes(2, order) + (1).to_bytes(4, order)
        value = orientation.to_bytes(4 if kind == 4 else 2, order).ljust(4, b"\0")
        block = b"Exif\0\0" + (b"II*\0" if little_endian else b"MM\0*") + (8).to_bytes(4, order)
        block += (1).to_bytes(2, order) + entry + value + b"\0\0\0\0"
    return block


def _cpu_orientation(content: bytes) -> int | None:
    """The orientation the CPU path reads (Pillow), None where Pillow cannot open the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged EXIF
            return orientation(Image.open(io.BytesIO(content)))
    except Exception:
        return None


@pytest.mark.parametrize("little_endian", [False, True])
@pytest.mark.parametrize("turn", range(1, 9))
def test_the_orientation_is_the_one_the_cpu_path_reads(turn, little_endian):
    """The GPU path turns photos upright from the header it reads, as the CPU path does with Pillow."""
    content = encode(PHOTO, "JPEG", exif=_exif(turn, little_endian=little_endian))
    frame = read_frame(content)
    assert frame is not None and frame.orientation == turn == _cpu_orientation(content)


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def test_unusual_exif_goes_to_the_cpu_path():
    """Forms the strict reader does not take (the CPU path, Pillow, reads them as it always did)."""
    for kind in (4, 8):  # LONG, SSHORT: Pillow reads them, TorchCodec misreads a big-endian LONG
        content = encode(PHOTO, "JPEG", exif=_exif(6, kind=kind))
        assert read_frame(content) is None and _cpu_orientation(content) == 6
    content = encode(PHOTO, "JPEG", exif=_exif(6), xmp=b"<x:xmpmeta/>")
    assert read_frame(content) == Frame(0xC0, 8, 220, 150, 3, 6)  # XMP after EXIF, as cameras write them
    xmp_first = content[:2] + _app1(b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>") + content[2:]
    assert read_frame(xmp_first) is None and _cpu_orientation(xmp_first) == 6  # TorchCodec's CPU decoder misses it
    two = content[:2] + _app1(_exif(3)) + content[2:]
    assert read_frame(two) is None  # Pillow joins the two blocks
    assert read_frame(encode(PHOTO, "JPEG", exif=b"Exif\0\0XX*\0")) is None


def test_damaged_exif_is_refused_or_read_as_the_cpu_path_reads_it():
    """3,000 random byte changes in a camera's EXIF block: the reader never raises, and every
    orientation it reads is the CPU path's, so no photo is turned one way on a GPU and another on a CPU."""
    exif = _exif(6)
    content = encode(PHOTO, "JPEG", exif=exif)
    start = content.index(b"Exif\0\0") + 6
    rng = np.random.default_rng(0)
    accepted: list[bytes] = []
    for _ in range(3000):
        damaged = bytearray(content)
        for at in rng.integers(start, start + len(exif) - 6, size=rng.integers(1, 4)):
            damaged[at] = int(rng.integers(0, 256))
        frame = read_frame(bytes(damaged))
        cpu = _cpu_orientation(bytes(damaged))
        if frame is not None and cpu is not None:
            accepted.append(bytes(damaged))
            assert frame.orientation == cpu, bytes(damaged[start : start + len(exif)])
    assert len(accepted) > 500  # most changes land in values and leave the block well formed
    # And the decoder, which reads the EXIF by itself, turns them so too: the GPU path (here on the
    # CPU) sees each photo as the CPU path does. Another turn of it is 20-60 levels away.
    preprocess = Preprocess(resize=64, crop=56)
    turned = {read_frame(c).orientation for c in accepted}  # type: ignore[union-attr]
    assert {1, 6} <= turned, turned  # damage that spoils the orientation leaves the photo as stored
    on_device = device_decode.decode_batch(accepted, preprocess, torch.device("cpu"), [0] * len(accepted))
    for content, got in zip(accepted, on_device, strict=True):
        assert np.abs(got.numpy().astype(float) - decode(content, preprocess).astype(float)).mean() < 5
