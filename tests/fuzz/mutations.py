"""Seeded mutations of real DICOM files, for the DICOM-level fuzzer (``tests/test_fuzz_dicom.py``
runs a bounded number in the test suite, ``tests/fuzz/dicom_fuzz.py`` runs a long campaign).

Seeds are real files: every transfer syntax the synthetic cohort writes (explicit VR LE, RLE,
JPEG 2000 lossless; MONOCHROME1 and 2; written by the cohort's own writer), and every other
syntax the reader takes (implicit VR, big endian, deflated, JPEG baseline / extended / lossless,
JPEG-LS lossless, JPEG 2000 lossy, a PixelSpacing-only file, a bare dataset without file meta).
Each carries planted patient identifiers (``PLANTED``) that no answer may echo.

A case is ``(name, bytes)``; ``name`` says the seed and the mutation, so a failure can be
reproduced from the seed number alone. Mutations: byte flips (anywhere, or in the header),
truncation, element lengths, VRs, tag values (Rows/Columns/Bits*/PixelRepresentation, spacing,
photometric, rescale, frames, transfer syntax), compressed frame headers (JPEG SOF / DNL /
JPEG-LS LSE, JPEG 2000 SIZ, RLE header) and encapsulation offsets (item lengths, offset table).
"""

from __future__ import annotations

import io
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import bare_dataset, knee_phantom, make_dicom_bytes, rewrap_encapsulated  # noqa: E402

PLANTED = ("Secret^Patient", "PID-SECRET-123", "19500101", "S0001")
# The phantom's knee centres (column, row) in a 128 x 96 image; scaled for other sizes.
PHANTOM_SHAPE = (96, 128)
KEYPOINTS = {"right": [38.4, 48.0], "left": [89.6, 48.0]}

_VRS = [
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OW",
    b"PN",
    b"SH",
    b"SL",
    b"SQ",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"UN",
    b"US",
    b"UT",
    b"ZZ",
    b"\x00\x00",
]
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OW",
    b"SQ",
    b"UN",
    b"UT",
    b"UC",
    b"UR",
    b"OV",
    b"SV",
    b"UV",
}
# Tags whose bytes the element mutators look for (group, element), little endian.
_TAGS = {
    "Rows": (0x0028, 0x0010),
    "Columns": (0x0028, 0x0011),
    "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101),
    "HighBit": (0x0028, 0x0102),
    "PixelRepresentation": (0x0028, 0x0103),
    "SamplesPerPixel": (0x0028, 0x0002),
    "PhotometricInterpretation": (0x0028, 0x0004),
    "ImagerPixelSpacing": (0x0018, 0x1164),
    "PixelSpacing": (0x0028, 0x0030),
    "RescaleSlope": (0x0028, 0x1053),
    "TransferSyntaxUID": (0x0002, 0x0010),
    "PatientName": (0x0010, 0x0010),
    "PixelData": (0x7FE0, 0x0010),
    "GroupLength": (0x0002, 0x0000),
}
_TAG_VALUES = {
    "Rows": [0, 1, 2, 15, 95, 97, 4096, 8193, 65535],
    "Columns": [0, 1, 127, 129, 8193, 65535],
    "BitsAllocated": [0, 1, 7, 12, 24, 32, 64, 255],
    "BitsStored": [0, 1, 8, 13, 16, 17, 32],
    "HighBit": [0, 7, 15, 16, 31],
    "PixelRepresentation": [1, 2, 65535],
    "SamplesPerPixel": [0, 3, 4],
    "PhotometricInterpretation": [
        "RGB",
        "PALETTE COLOR",
        "YBR_FULL",
        "MONOCHROME3",
        "",
        "MONOCHROME1",
    ],
    "ImagerPixelSpacing": [
        "0",
        "-0.2\\0.2",
        "nan\\nan",
        "inf",
        "0.2\\0.1",
        "1e308\\1e308",
        "abc",
        "0.2\\0.2\\0.2",
        "3",
    ],
    "PixelSpacing": ["0", "0.1\\0.2", "1e-9", "NaN"],
    "RescaleSlope": ["0", "nan", "inf", "-1", "1e38", "abc"],
    "RescaleIntercept": ["nan", "-1e30", "1e308"],
    "NumberOfFrames": ["0", "2", "-1", "65", "99999999"],
    "TransferSyntaxUID": [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.1.99",
        "1.2.3.4",
        "",
    ],
}


# ----------------------------------------------------------------------------- seeds


def seed_files() -> dict[str, bytes]:
    """Name -> bytes of every seed file (deterministic)."""
    from pydicom import uid
    from pydicom.data import get_testdata_file

    from mris.cohort import dicom_writer

    image = knee_phantom(*PHANTOM_SHAPE, seed=5)
    seeds: dict[str, bytes] = {}
    # The cohort's own writer, every syntax and photometric it uses.
    for scanner_index, scanner in enumerate(dicom_writer.SCANNERS):
        for ts, _ in dicom_writer.TRANSFER_SYNTAX_SHARES:
            choices = dicom_writer.DicomChoices(
                scanner=scanner_index, transfer_syntax=str(ts), spacing_tags="both"
            )
            ds = dicom_writer.build_dataset(
                image,
                0.15,
                choices,
                seed=1,
                subject_id="S0001",
                sex="F",
                age=60.0,
                month=12,
                magnification=1.1,
            )
            ds.PatientName = "Secret^Patient"
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "seed.dcm"
                dicom_writer.write_dicom(path, ds, str(ts))
                seeds[f"cohort-{scanner[2]}-{uid.UID(ts).keyword}"] = path.read_bytes()
    for ts in (
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.JPEGLosslessSV1,
        uid.JPEG2000,
    ):
        seeds[uid.UID(ts).keyword] = make_dicom_bytes(image, ts, bits_stored=12)
    seeds["JPEGBaseline8Bit"] = make_dicom_bytes(
        (image >> 4).astype(np.uint8), uid.JPEGBaseline8Bit
    )
    seeds["PixelSpacingOnly"] = make_dicom_bytes(
        image, imager_spacing=None, pixel_spacing=(0.2, 0.2), bits_stored=12
    )
    seeds["JPEGLSLossless"] = rewrap_encapsulated(
        get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    )
    seeds["JPEGExtended12Bit"] = rewrap_encapsulated(get_testdata_file("JPGExtended.dcm"))
    seeds["bare-ExplicitVRLittleEndian"] = bare_dataset(make_dicom_bytes(image, bits_stored=12))
    return seeds


# ----------------------------------------------------------------------------- helpers


def _find_tag(data: bytes, tag: tuple[int, int], rng: np.random.Generator) -> int | None:
    needle = struct.pack("<HH", *tag)
    spots = []
    start = 0
    while len(spots) < 8:
        at = data.find(needle, start)
        if at < 0:
            break
        spots.append(at)
        start = at + 1
    return int(rng.choice(spots)) if spots else None


def _pixel_data_offset(data: bytes) -> int:
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data)


def _frame_bounds(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the first fragment of encapsulated pixel data, found by its items."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    if (
        at < 0
        or data[at + 4 : at + 6] not in (b"OB", b"OW")
        or data[at + 8 : at + 12] != b"\xff\xff\xff\xff"
    ):
        return None
    pos = at + 12
    # Basic offset table item, then the first fragment item.
    if data[pos : pos + 4] != b"\xfe\xff\x00\xe0":
        return None
    (bot,) = struct.unpack_from("<I", data, pos + 4)
    pos += 8 + bot
    if data[pos : pos + 4] != b"\xfe\xff\x00\xe0":
        return None
    (length,) = struct.unpack_from("<I", data, pos + 4)
    return pos + 8, min(pos + 8 + length, len(data))


def _rewrite(data: bytes, edit: Callable[[object], None]) -> bytes | None:
    """Parse, edit the dataset, write it back (None when the seed cannot be parsed)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        edit(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
        return out.getvalue()
    except Exception:  # noqa: BLE001 - a mutated seed pydicom cannot rewrite: mutate otherwise
        return None


# ----------------------------------------------------------------------------- mutators


def flip_bytes(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    out = bytearray(data)
    header_only = rng.random() < 0.6
    end = min(_pixel_data_offset(data) + 16, len(out)) if header_only else len(out)
    count = int(rng.integers(1, 9))
    for _ in range(count):
        at = int(rng.integers(0, end))
        out[at] = (
            int(rng.integers(0, 256))
            if rng.random() < 0.5
            else out[at] ^ (1 << int(rng.integers(0, 8)))
        )
    return f"flip{count}{'h' if header_only else ''}", bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    at = int(rng.integers(0, len(data)))
    return f"truncate{at}", data[:at]


def element_length(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    name = str(rng.choice(list(_TAGS)))
    at = _find_tag(data, _TAGS[name], rng)
    if at is None:
        return flip_bytes(data, rng)
    out = bytearray(data)
    vr = bytes(out[at + 4 : at + 6])
    value = int(
        rng.choice(
            [0, 1, 2, 3, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(data), int(rng.integers(0, 1 << 16))]
        )
    )
    if vr in _LONG_VRS:
        struct.pack_into("<I", out, at + 8, value & 0xFFFFFFFF)
    elif vr.isalpha():
        struct.pack_into("<H", out, at + 6, value & 0xFFFF)
    else:  # implicit VR: 4-byte length
        struct.pack_into("<I", out, at + 4, value & 0xFFFFFFFF)
    return f"length-{name}-{value}", bytes(out)


def swap_vr(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    name = str(rng.choice(list(_TAGS)))
    at = _find_tag(data, _TAGS[name], rng)
    if at is None or not bytes(data[at + 4 : at + 6]).isalpha():
        return flip_bytes(data, rng)
    vr = _VRS[int(rng.integers(0, len(_VRS)))]
    out = bytearray(data)
    out[at + 4 : at + 6] = vr
    return f"vr-{name}-{vr.decode('latin-1')}", bytes(out)


def tag_value(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    name = str(rng.choice(list(_TAG_VALUES)))
    value = _TAG_VALUES[name][int(rng.integers(0, len(_TAG_VALUES[name])))]

    def edit(ds) -> None:
        if name == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, name, value)

    out = _rewrite(data, edit)
    if out is None:
        return flip_bytes(data, rng)
    return f"tag-{name}={value!r}", out


def _jpeg_mutation(frame: bytearray, rng: np.random.Generator) -> str:
    sof = next(
        (
            i
            for i in range(2, min(len(frame) - 9, 4096))
            if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC1, 0xC3, 0xF7)
        ),
        None,
    )
    choice = int(rng.integers(0, 6))
    if sof is None or choice == 5:
        sos = frame.find(b"\xff\xda")
        at = sos if sos > 0 else len(frame) // 2
        frame[at:at] = b"\xff\xdc\x00\x04\x10\x00"  # a DNL marker
        return "jpeg-dnl"
    if choice == 0:
        frame[sof + 5 : sof + 7] = b"\x00\x00"
        return "jpeg-sof-rows0"
    if choice == 1:
        frame[sof + 7 : sof + 9] = struct.pack(">H", int(rng.choice([0, 1, 65535])))
        return "jpeg-sof-cols"
    if choice == 2:
        frame[sof + 5 : sof + 7] = struct.pack(">H", int(rng.integers(1, 65536)))
        return "jpeg-sof-rows"
    if choice == 3:
        frame[sof + 4] = int(rng.choice([0, 1, 17, 255]))
        return "jpeg-sof-precision"
    frame[sof + 9] = int(rng.choice([0, 3, 255]))
    return "jpeg-sof-components"


def _j2k_mutation(frame: bytearray, rng: np.random.Generator) -> str:
    siz = frame.find(b"\xff\x51")
    if siz < 0:
        return "j2k-none"
    field = int(rng.integers(0, 8))  # Xsiz .. YTOsiz
    value = int(rng.choice([0, 1, 2, 95, 96, 97, 8193, 0x7FFFFFFF, 0xFFFFFFFF]))
    if rng.random() < 0.25:
        struct.pack_into(">H", frame, siz + 38, int(rng.choice([0, 3, 16384])))  # Csiz
        return "j2k-siz-components"
    if rng.random() < 0.2:
        frame[siz + 40] = int(rng.choice([0x00, 0x0F, 0x1F, 0x7F, 0xFF]))  # Ssiz
        return "j2k-siz-depth"
    struct.pack_into(">I", frame, siz + 6 + 4 * field, value)
    return f"j2k-siz-{field}={value}"


def _rle_mutation(frame: bytearray, rng: np.random.Generator) -> str:
    slot = int(rng.integers(0, 16))
    value = int(rng.choice([0, 1, 15, 16, 63, 64, 65, len(frame), 0xFFFFFFFF]))
    struct.pack_into("<I", frame, 4 * slot, value)
    return f"rle-header-{slot}={value}"


def codestream(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    bounds = _frame_bounds(data)
    if bounds is None:
        return tag_value(data, rng)
    start, end = bounds
    frame = bytearray(data[start:end])
    if rng.random() < 0.25:  # the item structure itself
        out = bytearray(data)
        at = start - 4 if rng.random() < 0.5 else start - 8 - 4 - 4
        if at > 0:
            struct.pack_into(
                "<I", out, at, int(rng.choice([0, 1, 3, 0xFFFFFFFF, len(data), end - start + 2]))
            )
        return "encapsulation-item-length", bytes(out)
    if frame[:2] == b"\xff\xd8":
        what = _jpeg_mutation(frame, rng)
    elif b"\xff\x4f\xff\x51" in frame[:4096]:
        what = _j2k_mutation(frame, rng)
    elif len(frame) >= 64:
        what = _rle_mutation(frame, rng)
    else:
        return flip_bytes(data, rng)
    if rng.random() < 0.3:  # and some noise in the frame's first bytes
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, min(len(frame), 128)))
            frame[at] = int(rng.integers(0, 256))
        what += "+noise"
    return what, _replace_first_fragment(data, start, end, bytes(frame))


def _replace_first_fragment(data: bytes, start: int, end: int, frame: bytes) -> bytes:
    if len(frame) % 2:
        frame += b"\x00"
    out = bytearray(data[: start - 4]) + struct.pack("<I", len(frame)) + frame + data[end:]
    return bytes(out)


MUTATORS: tuple[Callable[[bytes, np.random.Generator], tuple[str, bytes]], ...] = (
    flip_bytes,
    flip_bytes,
    truncate,
    element_length,
    swap_vr,
    tag_value,
    tag_value,
    codestream,
    codestream,
)


def cases(
    seed: int, count: int, seeds: dict[str, bytes] | None = None
) -> Iterator[tuple[str, bytes]]:
    """``count`` mutated cases, deterministic for ``seed``; one or two mutations each."""
    seeds = seeds or seed_files()
    names = sorted(seeds)
    rng = np.random.default_rng(seed)
    for number in range(count):
        base = names[int(rng.integers(0, len(names)))]
        data = seeds[base]
        steps = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            mutator = MUTATORS[int(rng.integers(0, len(MUTATORS)))]
            what, data = mutator(data, rng)
            steps.append(what)
        yield f"{seed}-{number}-{base}-{'+'.join(steps)}", data


# ----------------------------------------------------------------------------- known hostile files


def _set_frame_lines(data: bytes, marker: bytes, lines: int) -> bytes:
    bounds = _frame_bounds(data)
    assert bounds is not None, "an encapsulated seed was expected"
    start, end = bounds
    frame = bytearray(data[start:end])
    at = frame.find(marker)
    frame[at + 5 : at + 7] = struct.pack(">H", lines)
    return _replace_first_fragment(data, start, end, bytes(frame))


def hostile_files() -> dict[str, bytes]:
    """The uploads that took the service down or answered 500 before (issue 12), as bytes."""
    from pydicom.data import get_testdata_file

    jpeg_ls = rewrap_encapsulated(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    extended = rewrap_encapsulated(get_testdata_file("JPGExtended.dcm"))
    image = knee_phantom(*PHANTOM_SHAPE, seed=5)
    float_pixels = make_dicom_bytes(image.astype(np.float32).view(np.uint32), bits_stored=32)
    return {
        "jpeg-ls-sof55-zero-lines": _set_frame_lines(jpeg_ls, b"\xff\xf7", 0),
        "jpeg-extended-sof1-zero-lines": _set_frame_lines(extended, b"\xff\xc1", 0),
        "dx-32-bit-float-values": float_pixels,
    }
