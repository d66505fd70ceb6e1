"""A JPEG's frame header (size, components, coding) read by walking its segments, without Pillow.

The GPU path must know, before decoding, whether nvJPEG can take a file and how many pixels it has
(the pixel limit is checked on the header). ``Image.open`` answers both but builds a whole image
object: 23 us a photo on the CPU, 1.5 ms of every batch of 64, on the path whose CPU time caps the
GPU's throughput (docs/benchmarks.md). Walking the segments to the first scan reads a few bytes each.

The walk is strict where Pillow is lenient (Pillow skips junk between segments; libjpeg refuses
markers it does not know): anything unexpected gives None, and the caller sends the file to the CPU
path, which decodes it with Pillow and gives it the error it always gave. So a file is only ever
read here when its segments are well formed, and then its frame is the one Pillow and libjpeg read.

The walk also reads the EXIF orientation (``Exif`` APP1 segment), strictly too, so that the GPU
path turns photos upright exactly as the CPU path does.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from prelabel.preprocessing import EXIF_ORIENTATION, ORIENTATIONS

# Segments that may come before the first scan, each with a 2-byte length: DHT, DAC, DQT, DRI, COM, APP0-15.
_SEGMENTS = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
# Start-of-frame markers: the frame header's coding process (C4, C8 and CC are not frames).
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS = 0xDA
# TIFF field types 1-12 (BYTE, ASCII, SHORT, LONG, RATIONAL, their signed forms, UNDEFINED, FLOAT,
# DOUBLE): bytes per value.
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_SHORT = 3  # an orientation's type (TorchCodec reads a LONG's first two bytes as one)


class Frame(NamedTuple):
    marker: int  # 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive (Huffman); others rare
    precision: int  # bits per sample
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK
    orientation: int = 1  # EXIF orientation, 1 to 8 (preprocessing.ORIENTATIONS)


def read_frame(content: bytes) -> Frame | None:
    """The frame header of a well-formed JPEG (one frame, then a scan), or None for anything else."""
    if content[:2] != b"\xff\xd8":
        return None
    pos, end, frame, orientation, app1 = 2, len(content), None, 0, False
    while pos + 4 <= end:
        if content[pos] != 0xFF:
            return None
        marker = content[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = content[pos + 2] << 8 | content[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return None
        if marker == _SOS:
            return frame._replace(orientation=orientation or 1) if frame else None
        if marker == 0xE1:  # APP1: EXIF, XMP...
            if content[pos + 4 : pos + 10] == b"Exif\0\0":
                if app1:  # EXIF after another APP1 (decoders differ) or a second one (Pillow joins them)
                    return None
                turn = _orientation(content[pos + 10 : pos + 2 + length])
                if turn is None:
                    return None
                orientation = turn
            app1 = True
        if marker in _FRAMES:
            if frame is not None or length < 8:
                return None
            p = pos + 4
            frame = Frame(marker, content[p], content[p + 3] << 8 | content[p + 4],
                          content[p + 1] << 8 | content[p + 2], content[p + 5])  # fmt: skip
        elif marker not in _SEGMENTS:
            return None
        pos += 2 + length
    return None


def _orientation(block: bytes) -> int | None:
    """The orientation tag in IFD0 of an EXIF block (a TIFF header and its IFDs), 1 where it has none,
    None where the entries up to it are not well formed (a standard type, data inside the block) or it
    is not one SHORT. Pillow and the GPU decoders read such a block alike (the entries after the tag
    do not matter to either); anything else goes to the CPU path, so the two paths never turn a photo
    differently."""
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(block[:4])
    if order is None:
        return None
    try:
        ifd = struct.unpack_from(order + "I", block, 4)[0]
        for n in range(struct.unpack_from(order + "H", block, ifd)[0]):
            tag, kind, number, field = struct.unpack_from(order + "HHI4s", block, ifd + 2 + 12 * n)
            size = number * _TYPE_SIZES.get(kind, 0)
            if not size or tag == 0xFFFF:  # (TorchCodec stops reading at tag 0xFFFF)
                return None
            if size > 4 and struct.unpack_from(order + "I", field)[0] + size > len(block):  # (Pillow stops)
                return None
            if tag == EXIF_ORIENTATION:
                if number != 1 or kind != _SHORT:
                    return None
                value: int = struct.unpack_from(order + "H", field)[0]
                return value if value in ORIENTATIONS else 1
    except struct.error:  # entries beyond the block
        return None
    return 1
