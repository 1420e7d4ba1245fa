"""mris.dicom: every transfer syntax, the Modality LUT, MONOCHROME1, spacing rules, bad input."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pydicom
import pytest
from conftest import (
    bare_dataset,
    first_frame,
    knee_phantom,
    make_dicom_bytes,
    replace_frame,
    rewrap_encapsulated,
    write_dataset,
)
from pydicom import uid
from pydicom.data import get_testdata_file

from mris.dicom import DecodeLimits, Radiograph, read_radiograph
from mris.errors import (
    BadParameter,
    ImageTooLarge,
    NoUsableSpacing,
    UnreadableDicom,
    UnsupportedDicom,
)

IDENTIFIERS = ("Secret", "PID-SECRET", "19500101")

LOSSLESS = [
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEG2000Lossless,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
]


def _no_identifier(text: str) -> None:
    for secret in IDENTIFIERS:
        assert secret not in text


# ----------------------------------------------------------------------------- syntaxes


@pytest.mark.parametrize("ts", LOSSLESS, ids=lambda ts: uid.UID(ts).keyword)
def test_lossless_syntaxes_decode_to_identical_pixels(phantom, ts):
    radiograph = read_radiograph(make_dicom_bytes(phantom, ts, bits_stored=12))
    assert isinstance(radiograph, Radiograph)
    assert radiograph.pixels.dtype == np.float32
    assert radiograph.pixels.shape == phantom.shape
    np.testing.assert_array_equal(radiograph.pixels, phantom.astype(np.float32))
    assert radiograph.metadata["transfer_syntax_uid"] == ts


def test_jpeg_ls_lossless_matches_uncompressed_signed_16_bit():
    # No JPEG-LS encoder is installed: pydicom ships the same MR image in both syntaxes.
    plain = read_radiograph(rewrap_encapsulated_native("MR_small.dcm"))
    jpeg_ls = read_radiograph(
        rewrap_encapsulated(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    )
    assert jpeg_ls.metadata["transfer_syntax_uid"] == uid.JPEGLSLossless
    assert plain.pixels.min() < 0 or plain.metadata["pixel_representation"] == 1
    np.testing.assert_array_equal(jpeg_ls.pixels, plain.pixels)


def rewrap_encapsulated_native(name: str) -> bytes:
    src = pydicom.dcmread(get_testdata_file(name))
    pixels = src.pixel_array
    return make_dicom_bytes(pixels, uid.ExplicitVRLittleEndian, bits_stored=int(src.BitsStored))


@pytest.mark.parametrize(
    "name, ts",
    [
        ("JPEGLSNearLossless_16.dcm", uid.JPEGLSNearLossless),
        ("JPGExtended.dcm", uid.JPEGExtended12Bit),
    ],
)
def test_other_jpeg_syntaxes_decode(name, ts):
    data = rewrap_encapsulated(get_testdata_file(name))
    radiograph = read_radiograph(data, limits=DecodeLimits(min_side_px=8))
    src = pydicom.dcmread(get_testdata_file(name))
    assert radiograph.metadata["transfer_syntax_uid"] == ts
    assert radiograph.pixels.shape == (src.Rows, src.Columns)
    np.testing.assert_array_equal(radiograph.pixels, src.pixel_array.astype(np.float32))


def test_jpeg_baseline_8_bit_is_close(phantom):
    image = (phantom >> 4).astype(np.uint8)
    radiograph = read_radiograph(make_dicom_bytes(image, uid.JPEGBaseline8Bit, jpeg_quality=95))
    assert np.abs(radiograph.pixels - image).max() <= 10
    assert np.abs(radiograph.pixels - image).mean() < 2


def test_jpeg_2000_lossy_is_close(phantom):
    radiograph = read_radiograph(make_dicom_bytes(phantom, uid.JPEG2000, bits_stored=12))
    assert radiograph.metadata["transfer_syntax_uid"] == uid.JPEG2000
    assert np.abs(radiograph.pixels - phantom).mean() < 10


def test_path_source_and_metadata_without_identifiers(tmp_path, phantom):
    path = tmp_path / "knee.dcm"
    path.write_bytes(make_dicom_bytes(phantom, bits_stored=12))
    radiograph = read_radiograph(path)
    assert radiograph.metadata["modality"] == "DX"
    assert radiograph.metadata["bits_stored"] == 12
    assert radiograph.metadata["transfer_syntax"] == "Explicit VR Little Endian"
    text = json.dumps(radiograph.metadata)  # JSON-serialisable
    _no_identifier(text)
    assert "PatientName" not in text and "SOPInstanceUID" not in text
    assert read_radiograph(str(path)).pixels.shape == phantom.shape


# ----------------------------------------------------------------------------- LUT, photometric


def test_monochrome1_is_inverted_to_match_monochrome2(phantom):
    mono2 = read_radiograph(make_dicom_bytes(phantom, bits_stored=12))
    inverted = (4095 - phantom).astype(np.uint16)
    mono1 = read_radiograph(make_dicom_bytes(inverted, photometric="MONOCHROME1", bits_stored=12))
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)
    assert mono1.metadata["photometric"] == "MONOCHROME1"


def test_rescale_slope_and_intercept(phantom):
    radiograph = read_radiograph(make_dicom_bytes(phantom, bits_stored=12, rescale=(2.0, -100.0)))
    np.testing.assert_allclose(radiograph.pixels, phantom * 2.0 - 100.0)
    assert radiograph.metadata["modality_lut"] == "rescale"


def test_bits_above_bits_stored_are_ignored(phantom):
    dirty = phantom | np.uint16(0xF000)  # e.g. an overlay kept in the high bits
    radiograph = read_radiograph(make_dicom_bytes(dirty, bits_stored=12))
    np.testing.assert_array_equal(radiograph.pixels, phantom.astype(np.float32))


def test_eight_bit_unsigned(phantom):
    image = (phantom >> 4).astype(np.uint8)
    radiograph = read_radiograph(make_dicom_bytes(image))
    np.testing.assert_array_equal(radiograph.pixels, image.astype(np.float32))


def test_rgb_and_multiframe_are_refused(phantom):
    rgb = np.repeat(phantom[:, :, None], 3, axis=2)
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom, bits_stored=12)))
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = rgb.tobytes()
    with pytest.raises(UnsupportedDicom, match="grayscale"):
        read_radiograph(write_dataset(ds))

    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom, bits_stored=12)))
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([phantom, phantom]).tobytes()
    with pytest.raises(UnsupportedDicom, match="multi-frame"):
        read_radiograph(write_dataset(ds))


# ----------------------------------------------------------------------------- spacing


@pytest.mark.parametrize(
    "imager, pixel, expected, source",
    [
        ((0.15, 0.15), (0.2, 0.2), 0.15, "ImagerPixelSpacing"),
        (None, (0.2, 0.2), 0.2, "PixelSpacing"),
        ((0.0, 0.0), (0.2, 0.2), 0.2, "PixelSpacing"),  # unusable tag: next one
        ((0.2, 0.201), None, 0.2005, "ImagerPixelSpacing"),  # within 1 %: mean
        ("0.143", None, 0.143, "ImagerPixelSpacing"),  # one value: square
    ],
)
def test_spacing_rules(phantom, imager, pixel, expected, source):
    radiograph = read_radiograph(
        make_dicom_bytes(phantom, imager_spacing=imager, pixel_spacing=pixel)
    )
    assert radiograph.spacing_mm == pytest.approx(expected)
    assert radiograph.spacing_source == source


@pytest.mark.parametrize(
    "imager, why",
    [
        (None, "absent"),
        ((0.0, 0.0), "zero"),
        ((-0.2, -0.2), "negative"),
        ((0.2, 0.1), "not square"),
        ((0.2, 0.203), "not square"),
        ((5.0, 5.0), "plausible range"),
    ],
)
def test_unusable_spacing_is_an_error_unless_the_caller_gives_one(phantom, imager, why):
    data = make_dicom_bytes(phantom, imager_spacing=imager)
    with pytest.raises(NoUsableSpacing, match=why):
        read_radiograph(data)
    rescued = read_radiograph(data, spacing_mm=0.18)
    assert (rescued.spacing_mm, rescued.spacing_source) == (0.18, "caller")


def test_caller_spacing_overrides_the_file(phantom):
    radiograph = read_radiograph(
        make_dicom_bytes(phantom, imager_spacing=(0.15, 0.15)), spacing_mm=0.1
    )
    assert (radiograph.spacing_mm, radiograph.spacing_source) == (0.1, "caller")
    assert radiograph.metadata["file_spacing_mm"] == 0.15


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), 50.0, "abc"])
def test_bad_caller_spacing(phantom, bad):
    with pytest.raises(BadParameter):
        read_radiograph(make_dicom_bytes(phantom), spacing_mm=bad)


# ----------------------------------------------------------------------------- bad input


def _raises_fast(error, data, **kwargs):
    start = time.perf_counter()
    with pytest.raises(error) as info:
        read_radiograph(data, **kwargs)
    # a bad file must fail, not hang or decode for long; a generous bound (these machines are shared
    # and a loaded core once took 0.7 s for a 0.05 s failure), not a speed check
    assert time.perf_counter() - start < 5.0
    _no_identifier(str(info.value))
    return info.value


def test_empty_and_non_dicom():
    assert "empty" in _raises_fast(UnreadableDicom, b"").detail
    assert "not a DICOM" in _raises_fast(UnreadableDicom, b"hello world" * 50).detail
    assert "not a DICOM" in _raises_fast(UnreadableDicom, b"\x00" * 132).detail


def test_missing_path(tmp_path):
    _raises_fast(UnreadableDicom, tmp_path / "nope.dcm")


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated(phantom, keep):
    data = make_dicom_bytes(phantom, bits_stored=12)
    _raises_fast(UnreadableDicom, data[: int(len(data) * keep)])


def test_truncated_compressed(phantom):
    data = make_dicom_bytes(phantom, uid.JPEG2000Lossless, bits_stored=12)
    _raises_fast(UnreadableDicom, data[: int(len(data) * 0.8)])


def test_header_bomb_costs_nothing(phantom):
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom)))
    ds.Rows = ds.Columns = 30000
    error = _raises_fast(ImageTooLarge, write_dataset(ds))
    assert "30000 x 30000" in error.detail


def test_limits_are_configurable(phantom):
    data = make_dicom_bytes(phantom)
    _raises_fast(ImageTooLarge, data, limits=DecodeLimits(max_rows=64))
    _raises_fast(ImageTooLarge, data, limits=DecodeLimits(max_file_bytes=1000))
    _raises_fast(ImageTooLarge, data, limits=DecodeLimits(max_pixel_bytes=1000))


def test_one_by_one(phantom):
    one = np.array([[7]], dtype=np.uint16)
    assert "too small" in _raises_fast(UnsupportedDicom, make_dicom_bytes(one)).detail


@pytest.mark.parametrize("delta", [-2, 2, 1000])
def test_mismatched_pixel_length(phantom, delta):
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom)))
    raw = ds.PixelData
    ds.PixelData = raw[:delta] if delta < 0 else raw + b"\x00" * delta
    error = _raises_fast(UnreadableDicom, write_dataset(ds))
    assert "pixel data is" in error.detail


def test_no_pixel_data(phantom):
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom)))
    del ds.PixelData
    _raises_fast(UnsupportedDicom, write_dataset(ds))


def test_corrupt_rle_segment_panic_becomes_unreadable(phantom):
    data = make_dicom_bytes(phantom, uid.RLELossless, bits_stored=12)
    frame = bytearray(first_frame(data))
    (first_segment,) = struct.unpack("<I", frame[4:8])
    frame[first_segment] = 0x81  # a replicate run that overruns the segment: a Rust panic
    error = _raises_fast(UnreadableDicom, replace_frame(data, bytes(frame)))
    # pylibjpeg-rle raised pyo3's PanicException, a BaseException but not an Exception.
    assert isinstance(error.__cause__, BaseException)
    assert not isinstance(error.__cause__, Exception)


@pytest.mark.parametrize("corruption", ["garbage", "segments", "offset"])
def test_corrupt_rle_frames(phantom, corruption):
    data = make_dicom_bytes(phantom, uid.RLELossless, bits_stored=12)
    frame = bytearray(first_frame(data))
    if corruption == "garbage":
        frame[64:] = bytes([0x7F]) * (len(frame) - 64)
    elif corruption == "segments":
        frame[0:4] = struct.pack("<I", 15)
    else:
        frame[8:12] = struct.pack("<I", 10**6)
    _raises_fast(UnreadableDicom, replace_frame(data, bytes(frame)))


def test_codestream_dimensions_checked_before_decoding(phantom):
    data = make_dicom_bytes(phantom, uid.JPEG2000Lossless, bits_stored=12)
    frame = bytearray(first_frame(data))
    siz = frame.find(b"\xff\x51")
    # Xsiz / Ysiz claim 30000 x 30000: refused from the codestream header alone.
    frame[siz + 6 : siz + 14] = struct.pack(">II", 30000, 30000)
    _raises_fast(ImageTooLarge, replace_frame(data, bytes(frame)))
    # A codestream that disagrees with the header.
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = 64
    assert "header says" in _raises_fast(UnreadableDicom, write_dataset(ds)).detail
    jpeg = make_dicom_bytes(phantom, uid.JPEGLossless, bits_stored=12)
    ds = pydicom.dcmread(io.BytesIO(jpeg))
    ds.Columns = 100
    assert "header says" in _raises_fast(UnreadableDicom, write_dataset(ds)).detail


def test_deflate_bomb_is_refused(phantom):
    big = np.zeros((4096, 4096), dtype=np.uint16)  # 32 MiB that deflates to ~32 KiB
    data = make_dicom_bytes(big, uid.DeflatedExplicitVRLittleEndian)
    assert len(data) < 200_000
    limits = DecodeLimits(max_pixel_bytes=1 << 20, max_file_bytes=1 << 20)
    _raises_fast(ImageTooLarge, data, limits=limits)
    assert zlib  # deflate is what the file uses


def test_cohort_like_knee_phantom_full_path(tmp_path):
    image = knee_phantom(rows=64, cols=96, seed=3)
    radiograph = read_radiograph(make_dicom_bytes(image, uid.RLELossless, bits_stored=12))
    assert radiograph.pixels.max() <= 4095


def test_cohort_generator_files_read_back(tmp_path):
    """The synthetic cohort's own DICOM writer (when present): every syntax and photometric it
    uses reads back to the same bone-bright pixels, with no identifier in the metadata."""
    from mris.cohort import dicom_writer as writer

    image = knee_phantom(64, 96, seed=5)
    photometrics = {scanner[2]: index for index, scanner in enumerate(writer.SCANNERS)}
    for photometric, scanner in photometrics.items():
        for ts, _ in writer.TRANSFER_SYNTAX_SHARES:
            choices = writer.DicomChoices(
                scanner=scanner, transfer_syntax=str(ts), spacing_tags="imager"
            )
            ds = writer.build_dataset(
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
            path = tmp_path / f"{photometric}-{uid.UID(ts).keyword}.dcm"
            writer.write_dicom(path, ds, str(ts))
            radiograph = read_radiograph(path)
            np.testing.assert_array_equal(radiograph.pixels, image.astype(np.float32))
            assert radiograph.spacing_source == "ImagerPixelSpacing"
            text = json.dumps(radiograph.metadata)
            assert "S0001" not in text and "SYNTHETIC" not in text


# ----------------------------------------------------------------------------- issue 12


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_a_bare_dataset_without_preamble_and_file_meta_is_read(phantom, implicit):
    data = make_dicom_bytes(phantom, bits_stored=12)
    radiograph = read_radiograph(bare_dataset(data, implicit))
    np.testing.assert_array_equal(radiograph.pixels, phantom.astype(np.float32))
    expected = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
    assert radiograph.metadata["transfer_syntax_uid"] == expected


def test_a_bare_dataset_with_compressed_pixels_is_refused(phantom):
    data = make_dicom_bytes(phantom, uid.RLELossless, bits_stored=12)
    assert "codec" in _raises_fast(UnsupportedDicom, bare_dataset(data, implicit=False)).detail


def test_pixel_formats_are_those_dx_and_cr_allow(phantom):
    # 32-bit words holding float32 values: DX allows 8 or 16 bits; refused, not cropped as garbage.
    as_words = phantom.astype(np.float32).view(np.uint32)
    assert "BitsAllocated 32" in _raises_fast(UnsupportedDicom, make_dicom_bytes(as_words)).detail
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom, bits_stored=12)))
    ds.FloatPixelData = phantom.astype(np.float32).tobytes()
    ds["FloatPixelData"].VR = "OF"
    assert "float pixel data" in _raises_fast(UnsupportedDicom, write_dataset(ds)).detail
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(phantom, bits_stored=12)))
    ds.PixelRepresentation = 2
    assert "PixelRepresentation 2" in _raises_fast(UnreadableDicom, write_dataset(ds)).detail
    # Signed 16-bit pixels: a documented superset (DX requires unsigned).
    signed = (phantom.astype(np.int32) - 2048).astype(np.int16)
    np.testing.assert_array_equal(
        read_radiograph(make_dicom_bytes(signed)).pixels, signed.astype(np.float32)
    )


def test_corrupt_tags_read_after_decoding_are_typed_errors(phantom):
    """Spacing and technical tags are read inside the one decoder-failure boundary: corrupt bytes
    there give a typed error (they gave a 500 on PixelSpacing-only and JPEG baseline files)."""
    rng = np.random.default_rng(12)
    seeds = [
        make_dicom_bytes(phantom, imager_spacing=None, pixel_spacing=(0.2, 0.2), bits_stored=12),
        make_dicom_bytes((phantom >> 4).astype(np.uint8), uid.JPEGBaseline8Bit),
    ]
    typed = (UnreadableDicom, UnsupportedDicom, NoUsableSpacing, ImageTooLarge)
    for data in seeds:
        spacing = (
            data.find(b"\x28\x00\x30\x00DS")
            if b"\x28\x00\x30\x00DS" in data
            else data.find(b"\x18\x00\x64\x11DS")
        )
        pixel_data = data.rfind(b"\xe0\x7f\x10\x00")
        for _ in range(150):
            corrupt = bytearray(data)
            region = (spacing, spacing + 16) if rng.random() < 0.5 else (132, pixel_data)
            for _ in range(int(rng.integers(1, 5))):
                corrupt[int(rng.integers(*region))] = int(rng.integers(0, 256))
            try:
                read_radiograph(bytes(corrupt))
            except typed as exc:
                _no_identifier(exc.detail)
