"""Compressed frame headers, read before any decoder runs.

``mris.dicom`` compares what a compressed frame says about itself with the DICOM header and the
decode limits before it hands the frame to a decoder: decoders trust their codestream, and a
codestream that lies makes them allocate without bound (a JPEG-LS SOF55 declaring 0 lines grew
a server by 90 MB/s until the OOM killer came). This module only parses; every problem is an
``UnreadableDicom`` naming the marker, never a value that could identify a patient.

What is read, per family:

- JPEG (baseline, extended, lossless; ITU T.81) and JPEG-LS (T.87): the markers up to the first
  SOS. SOFn / SOF55 give precision, lines (Y), samples per line (X) and components; a JPEG-LS
  LSE of ID 4 (T.87 C.2.4.1.4) overrides Y and X with wider fields. Y = 0 means the height comes
  later in a DNL marker, which we refuse outright, as we refuse any DNL marker (0xFFDC cannot
  occur inside entropy-coded data: JPEG stuffs 0xFF with 0x00, JPEG-LS with a byte below 0x80).
- JPEG 2000 and HTJ2K (ISO 15444-1 A.5.1, raw codestream or JP2 box): the SIZ segment: image and
  tile geometry, components, their bit depth and subsampling.
- RLE (PS3.5 G.3): the 64-byte header: the segment count and offsets.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from mris.errors import UnreadableDicom

# Start-of-frame markers of T.81 (all processes) and SOF55 of JPEG-LS.
JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_SOS, _EOI, _DNL, _LSE = 0xDA, 0xD9, 0xDC, 0xF8
MAX_J2K_TILES = 65535  # Isot is 16 bits (A.4.2)


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed frame declares: ``rows`` x ``columns`` pixels, ``components`` samples
    per pixel, ``precision`` bits per sample (the most, over components), ``tiles`` (JPEG 2000;
    at most ``MAX_J2K_TILES``, checked by the caller after the size limits)."""

    kind: str
    rows: int
    columns: int
    components: int
    precision: int
    tiles: int = 1


def _u16(data: bytes, pos: int) -> int:
    return struct.unpack_from(">H", data, pos)[0]


def jpeg_frame_header(codestream: bytes) -> FrameHeader:
    """The frame header of a JPEG or JPEG-LS codestream (see the module docstring)."""
    if codestream[:2] != b"\xff\xd8":
        raise UnreadableDicom("the compressed frame does not start with a JPEG SOI marker")
    end = len(codestream)
    pos = 2
    sof: tuple[int, int, int, int, int] | None = None  # marker, precision, rows, columns, comps
    oversize: tuple[int, int] | None = None
    while True:
        if pos + 2 > end:
            raise UnreadableDicom("the JPEG codestream ends before its first scan")
        if codestream[pos] != 0xFF:
            raise UnreadableDicom("the JPEG codestream is corrupt (a marker was expected)")
        marker = codestream[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == _EOI:
            raise UnreadableDicom("the JPEG codestream ends before its first scan")
        if pos + 4 > end:
            raise UnreadableDicom("the JPEG codestream is cut inside a marker segment")
        length = _u16(codestream, pos + 2)
        if length < 2 or pos + 2 + length > end:
            raise UnreadableDicom(f"the JPEG marker 0xFF{marker:02X} has an impossible length")
        body = pos + 4
        if marker in JPEG_SOF:
            if sof is not None:
                raise UnreadableDicom("the JPEG codestream has more than one frame header (SOF)")
            if length < 8:
                raise UnreadableDicom("the JPEG frame header (SOF) is too short")
            precision = codestream[body]
            rows, columns = struct.unpack_from(">HH", codestream, body + 1)
            components = codestream[body + 5]
            if length != 8 + 3 * components:
                raise UnreadableDicom(
                    "the JPEG frame header (SOF) length does not match its components"
                )
            sof = (marker, precision, rows, columns, components)
        elif marker == _LSE and length >= 3 and codestream[body] == 4:
            # JPEG-LS oversize image dimension: Wxy bytes each for Y and X.
            width = codestream[body + 1] if length >= 4 else 0
            if not 2 <= width <= 4 or length != 4 + 2 * width:
                raise UnreadableDicom("the JPEG-LS LSE dimension segment is malformed")
            rows = int.from_bytes(codestream[body + 2 : body + 2 + width], "big")
            columns = int.from_bytes(codestream[body + 2 + width : body + 2 + 2 * width], "big")
            oversize = (rows, columns)
        elif marker == _SOS:
            break
        pos += 2 + length
    if sof is None:
        raise UnreadableDicom("the JPEG codestream has no frame header (SOF) before its first scan")
    marker, precision, rows, columns, components = sof
    if oversize is not None:
        if marker != 0xF7:
            raise UnreadableDicom("a JPEG-LS dimension segment (LSE) in a non-JPEG-LS codestream")
        rows, columns = oversize
    kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
    if rows == 0:
        raise UnreadableDicom(
            f"the {kind} frame header declares 0 lines (the height would follow in a DNL "
            "marker); such codestreams are not accepted"
        )
    if codestream.find(b"\xff\xdc", pos) >= 0:
        raise UnreadableDicom(
            f"the {kind} codestream holds a DNL marker; such codestreams are not accepted"
        )
    return FrameHeader(kind, rows, columns, components, precision)


def j2k_frame_header(codestream: bytes, kind: str = "JPEG 2000") -> FrameHeader:
    """The SIZ segment of a JPEG 2000 / HTJ2K codestream (raw, or inside a JP2 file)."""
    start = codestream.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0:
        raise UnreadableDicom(f"the compressed frame has no {kind} SOC/SIZ marker")
    siz = start + 4  # Lsiz
    if siz + 38 > len(codestream):
        raise UnreadableDicom(f"the {kind} codestream is cut inside its SIZ marker")
    length = _u16(codestream, siz)
    (xsiz, ysiz, x_off, y_off, x_tile, y_tile, x_tile_off, y_tile_off) = struct.unpack_from(
        ">IIIIIIII", codestream, siz + 4
    )
    components = _u16(codestream, siz + 36)
    if components == 0 or length != 38 + 3 * components or siz + length > len(codestream):
        raise UnreadableDicom(f"the {kind} SIZ marker is malformed ({components} components)")
    if xsiz <= x_off or ysiz <= y_off:
        raise UnreadableDicom(f"the {kind} SIZ marker declares an empty image (0 rows or columns)")
    if (
        x_tile == 0
        or y_tile == 0
        or x_tile_off > x_off
        or y_tile_off > y_off
        or x_tile_off + x_tile <= x_off
        or y_tile_off + y_tile <= y_off
    ):
        raise UnreadableDicom(f"the {kind} SIZ marker declares an impossible tiling")
    tiles = -(-(xsiz - x_tile_off) // x_tile) * -(-(ysiz - y_tile_off) // y_tile)
    precision = 0
    for index in range(components):
        depth_byte, x_sub, y_sub = codestream[siz + 38 + 3 * index : siz + 41 + 3 * index]
        depth = (depth_byte & 0x7F) + 1
        if depth > 38 or x_sub == 0 or y_sub == 0:
            raise UnreadableDicom(f"the {kind} SIZ marker declares an impossible component")
        if (x_sub, y_sub) != (1, 1):
            raise UnreadableDicom(
                f"the {kind} codestream subsamples a component (not a grayscale radiograph)"
            )
        precision = max(precision, depth)
    return FrameHeader(kind, ysiz - y_off, xsiz - x_off, components, precision, tiles)


def rle_segment_count(frame: bytes, expected_segments: int) -> int:
    """Check an RLE frame's 64-byte header: ``expected_segments`` segments whose offsets
    start at 64, increase and lie inside the frame. Returns the segment count."""
    if len(frame) < 64:
        raise UnreadableDicom("the RLE frame is shorter than its 64-byte header")
    segments, *offsets = struct.unpack_from("<16I", frame)
    if segments != expected_segments:
        raise UnreadableDicom(
            f"the RLE frame has {segments} segments; {expected_segments} expected"
        )
    used = offsets[:segments]
    if used[0] != 64 or any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= len(frame):
        raise UnreadableDicom("the RLE frame's segment offsets are impossible")
    return segments
