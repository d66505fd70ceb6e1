"""A JPEG's frame header (size, components, coding) read by walking its segments, without Pillow.

The GPU path must know, before decoding, whether nvJPEG can take a file and how many pixels it has
(the pixel limit is checked on the header). ``Image.open`` answers both but builds a whole image
object: 23 us a photo on the CPU, 1.5 ms of every batch of 64, on the path whose CPU time caps the
GPU's throughput (docs/benchmarks.md). Walking the segments to the first scan reads a few bytes each.

The walk is strict where Pillow is lenient (Pillow skips junk between segments; libjpeg refuses
markers it does not know): anything unexpected gives None, and the caller sends the file to the CPU
path, which decodes it with Pillow and gives it the error it always gave. So a file is only ever
read here when its segments are well formed, and then its frame is the one Pillow and libjpeg read.
"""

from __future__ import annotations

from typing import NamedTuple

# Segments that may come before the first scan, each with a 2-byte length: DHT, DAC, DQT, DRI, COM, APP0-15.
_SEGMENTS = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
# Start-of-frame markers: the frame header's coding process (C4, C8 and CC are not frames).
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS = 0xDA


class Frame(NamedTuple):
    marker: int  # 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive (Huffman); others rare
    precision: int  # bits per sample
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK


def read_frame(content: bytes) -> Frame | None:
    """The frame header of a well-formed JPEG (one frame, then a scan), or None for anything else."""
    if content[:2] != b"\xff\xd8":
        return None
    pos, end, frame = 2, len(content), None
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
            return frame
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
