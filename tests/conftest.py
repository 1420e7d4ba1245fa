"""Shared fixtures: tiny real DICOMs written by pydicom (no mocks of our own code).

``make_dicom`` writes a radiograph-like DICOM in any transfer syntax we can encode here:
- pydicom natively: implicit / explicit VR little endian, explicit VR big endian, deflated,
  RLE Lossless;
- pylibjpeg-openjpeg (through pydicom's encoders): JPEG 2000 lossless and lossy;
- Pillow: JPEG Baseline (8-bit, lossy);
- ``encode_jpeg_lossless`` below: JPEG Lossless Process 14 (selection value 1), a minimal
  Huffman encoder written for the tests (no encoder for it is installed).
JPEG Extended (12-bit) and JPEG-LS have no encoder installed; their tests use the files that
ship inside pydicom's own package (``pydicom.data.get_testdata_file``), re-wrapped with our tags.
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate


def encode_jpeg_lossless(image: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless (Process 14, predictor 1) codestream of a 2-D unsigned image.

    One Huffman table with all 17 difference categories coded in 5 bits.
    """
    rows, cols = image.shape
    values = image.astype(np.int64)
    predicted = np.empty_like(values)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = values[0, :-1]
    predicted[1:, 0] = values[:-1, 0]
    predicted[1:, 1:] = values[1:, :-1]
    diffs = (values - predicted).ravel()
    bits: list[str] = []
    for diff in diffs.tolist():
        diff = int(diff)
        category = 0 if diff == 0 else abs(diff).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            extra = diff if diff > 0 else diff + (1 << category) - 1
            bits.append(format(extra, f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    body = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        body.append(byte)
        if byte == 0xFF:
            body.append(0x00)
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision])
    out += rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    table = bytes([0x00]) + bytes(counts) + bytes(range(17))
    out += b"\xff\xc4" + (2 + len(table)).to_bytes(2, "big") + table
    out += b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0])
    out += body + b"\xff\xd9"
    return bytes(out)


def require(module: str) -> Any:
    """Import ``module`` for a test. Outside CI a missing one skips the test (a laptop without
    the ``train`` extra); in CI (``CI=true``) it fails, so a broken install cannot pass as green."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def require_binary(name: str, package: str) -> str:
    """The path of the program ``name`` for a test. Outside CI a missing one skips the test; in
    CI (``CI=true``) it fails (the README's test command installs Debian's ``package``)."""
    import shutil

    path = shutil.which(name)
    if path is not None:
        return path
    missing_dependency(f"{name} is missing (apt-get install {package})")


def missing_dependency(message: str) -> NoReturn:
    """A test's system dependency is missing: skip it on a laptop, fail it in CI (``CI=true``),
    where the README's test command installs every one."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI needs it: {message}")
    pytest.skip(message)


def _base_dataset(ts: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "PID-SECRET-123"
    ds.PatientBirthDate = "19500101"
    ds.Modality = "DX"
    ds.Manufacturer = "TestVendor"
    ds.BodyPartExamined = "KNEE"
    return ds


def write_dataset(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_dicom_bytes(
    pixels: np.ndarray,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    imager_spacing: Any = (0.2, 0.2),
    pixel_spacing: Any = None,
    rescale: tuple[float, float] | None = None,
    j2k_lossy_psnr: float = 60.0,
    jpeg_quality: int = 95,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A single-frame grayscale DICOM of ``pixels`` (2-D uint8/uint16/int16) as bytes.

    ``imager_spacing`` / ``pixel_spacing``: a 2-sequence, a raw string such as ``"0.2\\0.1"``,
    or None (tag absent). ``photometric`` is written as given (the caller inverts values).
    """
    pixels = np.ascontiguousarray(pixels)
    bits_allocated = pixels.dtype.itemsize * 8
    bits_stored = bits_stored or bits_allocated
    ts = uid.UID(transfer_syntax)
    ds = _base_dataset(uid.ExplicitVRLittleEndian)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in (("ImagerPixelSpacing", imager_spacing), ("PixelSpacing", pixel_spacing)):
        if value is None:
            continue
        setattr(ds, keyword, value if isinstance(value, str) else [f"{v:g}" for v in value])
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (f"{rescale[0]:g}", f"{rescale[1]:g}")
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    if ts == uid.ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True, little_endian=False, implicit_vr=False)
        return buffer.getvalue()
    if ts in (
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.DeflatedExplicitVRLittleEndian,
    ):
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
        return write_dataset(ds)
    if ts == uid.RLELossless:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
        ds.compress(uid.RLELossless, encoding_plugin="pydicom")
        return write_dataset(ds)
    if ts in (uid.JPEG2000Lossless, uid.JPEG2000):
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
        kwargs = {"j2k_psnr": [j2k_lossy_psnr]} if ts == uid.JPEG2000 else {}
        ds.compress(ts, **kwargs)
        return write_dataset(ds)
    if ts == uid.JPEGBaseline8Bit:
        from PIL import Image

        if pixels.dtype != np.uint8:
            raise ValueError("JPEG baseline needs uint8 pixels")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=jpeg_quality)
        frame = buffer.getvalue()
    elif ts in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        frame = encode_jpeg_lossless(pixels, bits_stored)
    else:
        raise ValueError(f"no test encoder for {ts.name}")
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write_dataset(ds)


def first_frame(data: bytes) -> bytes:
    """The first compressed frame of an encapsulated DICOM."""
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(io.BytesIO(data))
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def replace_frame(data: bytes, frame: bytes) -> bytes:
    """The same DICOM with its compressed frame replaced by ``frame``."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([bytes(frame)])
    return write_dataset(ds)


def bare_dataset(data: bytes, implicit: bool = False) -> bytes:
    """The dataset of a Part 10 file without preamble and file meta (what old archives export),
    implicit or explicit VR little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset as write_bare

    ds = pydicom.dcmread(io.BytesIO(data))
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_bare(out, ds)
    return out.getvalue()


def rewrap_encapsulated(source_path: str, **overrides: Any) -> bytes:
    """A pydicom test file's compressed pixel data re-wrapped in our tags (DX, spacing...)."""
    import pydicom

    src = pydicom.dcmread(source_path)
    ds = _base_dataset(src.file_meta.TransferSyntaxUID)
    for keyword in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        setattr(ds, keyword, getattr(src, keyword))
    ds.ImagerPixelSpacing = ["0.2", "0.2"]
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    ds.PixelData = src.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return write_dataset(ds)


# A source identity with a known value in every SourceIdentity field but the one-letter ones
# (sex, laterality), which are checked by equality only: a one-letter "secret" is in any text.
PLANTED_IDENTITY = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.70011",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.70022",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.70033",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.70044",
    "PatientID": "PID-KNOWN-4711",
    "PatientName": "Known^Identity",
    "PatientBirthDate": "19610203",
    "PatientSex": "F",
    "StudyDate": "20240115",
    "StudyTime": "101112",
    "StudyID": "STUDY-KNOWN-7",
    "AccessionNumber": "ACC-KNOWN-9",
    "ReferringPhysicianName": "Referrer^Known",
    "ImageLaterality": "B",
}
PLANTED_SECRETS = tuple(v for v in PLANTED_IDENTITY.values() if len(v) > 1)


def identity_dicom_bytes() -> bytes:
    """The knee phantom as a DICOM carrying ``PLANTED_IDENTITY`` (SOP Class: DX for
    presentation; no Laterality tag)."""
    data = make_dicom_bytes(knee_phantom(), imager_spacing=(0.2, 0.2), extra=PLANTED_IDENTITY)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # the file meta agrees
    return write_dataset(ds)


def knee_phantom(rows: int = 96, cols: int = 128, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A tiny uint16 'radiograph': smooth background, two bright blobs (knees), noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    image = 0.15 + 0.05 * yy / rows
    for cx in (0.3 * cols, 0.7 * cols):
        image += 0.6 * np.exp(
            -(((xx - cx) / (0.12 * cols)) ** 2 + ((yy - rows / 2) / (0.3 * rows)) ** 2)
        )
    image += rng.normal(0, 0.01, size=image.shape)
    top = (1 << bits) - 1
    return np.clip(image * top, 0, top).astype(np.uint16)


@pytest.fixture
def make_dicom() -> Callable[..., bytes]:
    """Factory: ``make_dicom(pixels, transfer_syntax, **tags) -> bytes`` (see make_dicom_bytes)."""
    return make_dicom_bytes


@pytest.fixture
def phantom() -> np.ndarray:
    """A 96 x 128 12-bit knee-like image (uint16)."""
    return knee_phantom()


def write_tiny_cohort(out: Path, subjects: int, seed: int = 5, grid: int = 32) -> Path:
    """A small synthetic cohort (small images, ``grid`` x ``grid`` maps, one worker) written
    subject by subject; returns its manifest path. Used by the training tests."""
    from mris.cohort.generate import CohortConfig, iter_subjects
    from mris.manifest import write_manifest

    config = CohortConfig(out=out, subjects=subjects, seed=seed, grid=grid, workers=1)
    rows = [row for result in iter_subjects(config) for row in result.rows]
    return write_manifest(out / "manifest.csv", rows)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """A 12-subject synthetic cohort (small images, 32 x 32 maps); its manifest path."""
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"), subjects=12)


@pytest.fixture(scope="session")
def trained(tiny_cohort, tmp_path_factory) -> tuple[Path, dict]:
    """One tiny model bundle (both variants and a localiser) trained on ``tiny_cohort`` once per
    session (tests/tiny_training.py): (bundle directory, training summary)."""
    require("torch")
    from tiny_training import train_tiny

    out = tmp_path_factory.mktemp("model") / "bundle"
    return out, train_tiny(tiny_cohort, out)


@pytest.fixture(scope="session")
def localised_bundles(trained, tiny_cohort, tmp_path_factory) -> dict[str, Path]:
    """For the tests that find knees as a user's request does (the PACS router, the viewer):
    ``model``, a copy of the session's tiny trained bundle whose localiser accepts any
    confidence (the tiny localiser is not confident: tests/tiny_training.py); ``strict_model``,
    the bundle itself (it finds no knee in noise); ``index``, an index of the tiny cohort."""
    from tiny_training import any_confidence_copy

    from mris.index.build import build_index_bundle

    root = tmp_path_factory.mktemp("localised-bundles")
    model = any_confidence_copy(trained[0], root / "model")
    index = root / "index"
    build_index_bundle(model, tiny_cohort, index, variant="separate", publish=True, threads=1)
    return {"model": model, "strict_model": trained[0], "index": index}
