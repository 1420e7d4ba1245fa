"""mris.codestream and its use in mris.dicom: every compressed frame header is checked against the
DICOM header before a decoder runs (issue 12: the 0-line JPEG-LS upload)."""

from __future__ import annotations

import io
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import first_frame, knee_phantom, make_dicom_bytes, replace_frame, rewrap_encapsulated
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from mris import codestream
from mris.dicom import DecodeLimits, read_radiograph
from mris.errors import ImageTooLarge, UnreadableDicom

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from mutations import hostile_files  # noqa: E402

SMALL = DecodeLimits(min_side_px=8)


def _refused(data: bytes, error=UnreadableDicom, limits: DecodeLimits = SMALL) -> str:
    started = time.monotonic()
    with pytest.raises(error) as caught:
        read_radiograph(data, limits=limits)
    assert time.monotonic() - started < 5, "refused from the header, before any decoding"
    assert "Secret" not in caught.value.detail
    return caught.value.detail


@pytest.fixture(scope="module")
def jpeg_ls() -> bytes:
    return rewrap_encapsulated(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))


@pytest.fixture(scope="module")
def jpeg_lossless() -> bytes:
    return make_dicom_bytes(knee_phantom(), uid.JPEGLosslessSV1, bits_stored=12)


@pytest.fixture(scope="module")
def j2k() -> bytes:
    return make_dicom_bytes(knee_phantom(), uid.JPEG2000Lossless, bits_stored=12)


def test_frame_headers_of_good_files():
    header = codestream.jpeg_frame_header(
        first_frame(rewrap_encapsulated(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")))
    )
    assert (header.kind, header.rows, header.columns, header.components, header.precision) == (
        "JPEG-LS",
        64,
        64,
        1,
        16,
    )
    j2k_header = codestream.j2k_frame_header(
        first_frame(make_dicom_bytes(knee_phantom(), uid.JPEG2000Lossless, bits_stored=12))
    )
    assert (j2k_header.rows, j2k_header.columns, j2k_header.components, j2k_header.tiles) == (
        96,
        128,
        1,
        1,
    )


@pytest.mark.parametrize("name", ["jpeg-ls-sof55-zero-lines", "jpeg-extended-sof1-zero-lines"])
def test_zero_lines_are_refused_before_decoding(name):
    assert "0 lines" in _refused(hostile_files()[name])


def test_jpeg_width_zero_components_precision_dnl(jpeg_lossless):
    frame = bytearray(first_frame(jpeg_lossless))
    sof = frame.find(b"\xff\xc3")
    cases = {
        "width 0": (sof + 7, b"\x00\x00", "header says"),
        "three components": (sof + 9, b"\x03", "length does not match"),
        "precision 17": (sof + 4, b"\x11", "17-bit samples"),
    }
    for at, value, message in cases.values():
        edited = bytearray(frame)
        edited[at : at + len(value)] = value
        assert message in _refused(replace_frame(jpeg_lossless, edited))
    with_dnl = bytearray(frame)
    with_dnl[len(with_dnl) - 2 : len(with_dnl) - 2] = b"\xff\xdc\x00\x04\x00\x60"
    assert "DNL" in _refused(replace_frame(jpeg_lossless, with_dnl))
    two_sofs = bytearray(frame)
    two_sofs[sof:sof] = frame[sof : sof + 13]
    assert "more than one frame header" in _refused(replace_frame(jpeg_lossless, two_sofs))


def test_jpeg_ls_oversize_dimension_segment(jpeg_ls):
    frame = bytearray(first_frame(jpeg_ls))
    sof = frame.find(b"\xff\xf7")
    # LSE ID 4 with 3-byte fields claiming 5000 x 5000: it overrides the SOF55's 64 x 64.
    lse = b"\xff\xf8" + struct.pack(">HBB", 10, 4, 3) + (5000).to_bytes(3, "big") * 2
    edited = bytearray(frame)
    edited[sof:sof] = lse
    assert "5000 x 5000" in _refused(replace_frame(jpeg_ls, edited))
    huge = bytearray(frame)
    huge[sof:sof] = b"\xff\xf8" + struct.pack(">HBB", 10, 4, 3) + (100_000).to_bytes(3, "big") * 2
    _refused(replace_frame(jpeg_ls, huge), ImageTooLarge)


def test_j2k_siz_checks(j2k):
    frame = bytearray(first_frame(j2k))
    siz = frame.find(b"\xff\x51")

    def edit(offset: int, fmt: str, value: int) -> str:
        edited = bytearray(frame)
        struct.pack_into(fmt, edited, siz + offset, value)
        return _refused(replace_frame(j2k, edited))

    assert "empty image" in edit(6, ">I", 0)  # Xsiz 0
    assert "empty image" in edit(18, ">I", 200)  # YOsiz beyond Ysiz
    assert "impossible tiling" in edit(22, ">I", 0)  # XTsiz 0
    one_pixel_tiles = bytearray(frame)
    struct.pack_into(">IIIIII", one_pixel_tiles, siz + 6, 1000, 1000, 0, 0, 1, 1)
    assert (
        codestream.j2k_frame_header(bytes(one_pixel_tiles)).tiles
        == 1_000_000
        > codestream.MAX_J2K_TILES
    )
    assert "malformed" in edit(38, ">H", 3)  # Csiz 3 without their bytes
    subsampled = bytearray(frame)
    subsampled[siz + 41] = 2
    assert "subsamples" in _refused(replace_frame(j2k, subsampled))


def test_rle_header_offsets(phantom):
    data = make_dicom_bytes(phantom, uid.RLELossless, bits_stored=12)
    frame = bytearray(first_frame(data))
    for slot, value in ((1, 0), (1, 10**6), (2, 60)):
        edited = bytearray(frame)
        struct.pack_into("<I", edited, 4 * slot, value)
        assert "offsets are impossible" in _refused(replace_frame(data, edited))


def test_htj2k_is_checked_like_jpeg_2000(j2k):
    ds = pydicom.dcmread(io.BytesIO(j2k))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K lossless
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    siz = frame.find(b"\xff\x51")
    struct.pack_into(">I", frame, siz + 6, 0)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert "HTJ2K" in _refused(replace_frame(out.getvalue(), frame))


def test_checks_can_be_disabled_only_explicitly(jpeg_ls):
    assert DecodeLimits().check_codestreams is True
    np.testing.assert_array_equal(
        read_radiograph(
            jpeg_ls, limits=DecodeLimits(min_side_px=8, check_codestreams=False)
        ).pixels,
        read_radiograph(jpeg_ls, limits=SMALL).pixels,
    )
