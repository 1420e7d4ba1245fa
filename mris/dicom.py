"""Radiograph DICOM reading: bytes or a path -> ``Radiograph`` (float32 pixels, spacing in mm).

The first arrow of the data path (ARCHITECTURE.md). Training, index building and serving all call
``read_radiograph``; nothing else decodes pixel data. Decisions (docs/PREPROCESSING.md):

- DICOM Part 10 files (128-byte preamble + ``DICM``) are read, and so are bare datasets without
  preamble and file meta (what old archives export) when they start with a little-endian group
  0x0008 element: their encoding (implicit / explicit VR LE) is taken from the data and their
  pixel data must be native, since nothing says which codec compressed it. Anything else is
  ``UnreadableDicom``.
- Limits (``DecodeLimits``) are checked from the header before any pixel data is decoded, and a
  compressed codestream's frame header (JPEG baseline / extended / lossless SOF, JPEG-LS SOF55
  and its LSE, JPEG 2000 and HTJ2K SIZ, the RLE header) is checked against the limits and the
  header before its decoder runs: a height or width of 0, a height left to a DNL marker, more
  than one component, a precision above BitsAllocated or dimensions unlike the header's are
  refused. The service also runs this function in a memory- and time-bounded worker process
  (``mris.sandbox``) in case a decoder runs away all the same.
- Grayscale only (SamplesPerPixel 1, MONOCHROME1/2): RGB, YBR and palette colour are refused
  (``UnsupportedDicom``), as are multi-frame images and images smaller than ``min_side_px``.
- Pixel formats: the integer formats DX and CR allow, BitsAllocated 8 or 16 with any BitsStored
  up to that, plus signed pixels (PixelRepresentation 1, a documented superset: DX requires 0).
  BitsAllocated 32 and float pixel data are refused. Bits above BitsStored are ignored.
- Modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence) is applied; MONOCHROME1 is
  inverted within the LUT's output range so that bone is bright in both photometrics.
- Spacing: the caller's ``spacing_mm`` wins when given; else the first usable of
  ImagerPixelSpacing and PixelSpacing (mm per pixel, no magnification correction). Usable means
  two finite values in [SPACING_MIN_MM, SPACING_MAX_MM] differing by at most
  SPACING_SQUARE_TOLERANCE (relative); the spacing is their mean.
- Every failure inside pydicom or a decoder plugin, including pyo3's ``PanicException`` (a
  ``BaseException``) from pylibjpeg-rle, becomes ``UnreadableDicom`` at one boundary in
  ``read_radiograph``. ``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit`` and
  ``MemoryError`` pass through: they say something about the process, not the file.
- Error messages never contain tag values that could identify a patient.
- The source's identity (UIDs, patient and study attributes: ``SourceIdentity``) is read once,
  from the dataset the pixels come from, and travels beside the de-identified pixels as
  ``Radiograph.source`` for a DICOM result that must reference and copy them. It is never in
  ``metadata``, in ``repr`` or in a message; an attribute pydicom cannot read is left unset
  (the identity never makes a readable image unreadable).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mris import codestream
from mris.errors import (
    BadParameter,
    ImageTooLarge,
    MrisError,
    NoUsableSpacing,
    UnreadableDicom,
    UnsupportedDicom,
)

SPACING_MIN_MM = 0.05
SPACING_MAX_MM = 2.0  # real detectors: 0.1-0.2 mm; the demo cohort's small images: ~1.1 mm
SPACING_SQUARE_TOLERANCE = 0.01  # row and column spacing may differ by 1 % (relative)
SPACING_TAGS = ("ImagerPixelSpacing", "PixelSpacing")

_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)
BITS_ALLOCATED = (8, 16)  # what DX and CR images allow (PS3.3 C.8.11.3, C.8.1.2)

# Metadata copied into Radiograph.metadata: technical tags only, never identifiers.
_METADATA_TAGS = {
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view_position",
    "PhotometricInterpretation": "photometric",
    "BitsAllocated": "bits_allocated",
    "BitsStored": "bits_stored",
    "PixelRepresentation": "pixel_representation",
    "Rows": "rows",
    "Columns": "columns",
    "RescaleSlope": "rescale_slope",
    "RescaleIntercept": "rescale_intercept",
}

_MIB = 1 << 20


@dataclass(frozen=True)
class DecodeLimits:
    """What a file may claim before we refuse it (``ImageTooLarge``) or call it unusable.

    - ``max_rows`` / ``max_columns``: image size in pixels (header and codestream).
    - ``max_frames``: NumberOfFrames accepted by the size check (multi-frame images are then
      refused as ``UnsupportedDicom`` anyway; the limit keeps a huge claim a 413).
    - ``max_file_bytes``: size of the file itself; ``max_pixel_bytes``: the decoded pixel data
      (rows x columns x frames x bytes per sample); a deflated dataset may not inflate beyond
      ``max_file_bytes + max_pixel_bytes``.
    - ``min_side_px``: smaller images (1 x 1 ...) are ``UnsupportedDicom``.
    - ``check_codestreams``: compare compressed frame headers with the DICOM header before
      decoding. Turn it off only to test that the decode sandbox contains a runaway decoder.
    """

    # OAI-like bilateral radiographs are about 2,900 x 2,400 px; 8192 fits any detector.
    max_rows: int = 8192
    max_columns: int = 8192
    max_frames: int = 64
    max_file_bytes: int = 256 * _MIB
    max_pixel_bytes: int = 256 * _MIB
    min_side_px: int = 16
    check_codestreams: bool = True


# SourceIdentity field -> DICOM keyword: what a derived object (Secondary Capture, Structured
# Report) references (the source's SOP instance, series, study, frame of reference) and copies
# (the Patient and General Study modules, laterality; the character set its names were in).
SOURCE_IDENTITY_TAGS = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "frame_of_reference_uid": "FrameOfReferenceUID",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_id": "StudyID",
    "accession_number": "AccessionNumber",
    "referring_physician_name": "ReferringPhysicianName",
    "laterality": "Laterality",
    "image_laterality": "ImageLaterality",
    "specific_character_set": "SpecificCharacterSet",
}


@dataclass(frozen=True, repr=False)
class SourceIdentity:
    """Who and what a radiograph is: its UIDs and the patient/study attributes a DICOM result
    made from it must copy (``SOURCE_IDENTITY_TAGS`` names the DICOM keyword of each field).

    Every field is the tag's text, or None where the file has none (or an empty or unreadable
    one); multi-valued text is joined with ``\\`` as DICOM writes it. Protected health
    information: ``repr`` and ``str`` show only how many fields are set, never a value; nothing
    may log it or put it into a message (``Radiograph.metadata`` stays technical-only).
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    frame_of_reference_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_id: str | None = None
    accession_number: str | None = None
    referring_physician_name: str | None = None
    laterality: str | None = None
    image_laterality: str | None = None
    specific_character_set: str | None = None

    @classmethod
    def from_dataset(cls, ds: Any) -> SourceIdentity:
        """The identity of a pydicom dataset; never raises on a bad value (that field is None)."""
        tags = SOURCE_IDENTITY_TAGS.items()
        return cls(**{name: _tag_text(ds, keyword) for name, keyword in tags})

    def as_keywords(self) -> dict[str, str]:
        """The fields that are set, by DICOM keyword (what a DICOM writer copies)."""
        return {
            SOURCE_IDENTITY_TAGS[item.name]: getattr(self, item.name)
            for item in fields(self)
            if getattr(self, item.name) is not None
        }

    def __repr__(self) -> str:
        return f"SourceIdentity(<{len(self.as_keywords())} fields set>)"

    __str__ = __repr__


def _tag_text(ds: Any, keyword: str) -> str | None:
    from pydicom.multival import MultiValue

    try:
        value = ds.get(keyword, None)
        if value is None:
            return None
        if isinstance(value, (list, tuple, MultiValue)):
            text = "\\".join(str(item) for item in value)
        else:
            text = str(value)
    except Exception:  # noqa: BLE001 - an unreadable identity tag leaves the field unset
        return None
    text = text.strip()
    return text or None


@dataclass(frozen=True)
class Radiograph:
    """A decoded radiograph.

    - ``pixels``: float32 (rows, cols), Modality LUT applied, MONOCHROME1 inverted (bone bright,
      higher = more attenuation).
    - ``spacing_mm``: mm per pixel (square pixels); ``spacing_source``: ``ImagerPixelSpacing`` |
      ``PixelSpacing`` | ``caller``.
    - ``metadata``: technical tags only (modality, photometric, bits, transfer syntax, sizes,
      manufacturer, file spacing...), never a patient identifier; JSON-serialisable.
    - ``source``: the file's ``SourceIdentity`` (UIDs, patient and study attributes) for a
      DICOM result made from it; None for pixels that came from no DICOM file. Left out of
      ``repr``; never logged.
    """

    pixels: np.ndarray
    spacing_mm: float
    spacing_source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: SourceIdentity | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


# ----------------------------------------------------------------------------- bytes in


def _read_source(
    source: bytes | bytearray | memoryview | str | Path, limits: DecodeLimits
) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_file_bytes:
            raise ImageTooLarge(
                f"the file is {len(data)} bytes; the limit is {limits.max_file_bytes} bytes"
            )
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise UnreadableDicom(f"cannot read {path}: {exc.strerror or exc}") from exc
        if not path.is_file():
            raise UnreadableDicom(f"{path} is not a file")
        if size > limits.max_file_bytes:
            raise ImageTooLarge(
                f"the file is {size} bytes; the limit is {limits.max_file_bytes} bytes"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UnreadableDicom(f"cannot read {path}: {exc.strerror or exc}") from exc
    else:
        raise TypeError(f"source must be bytes or a path, not {type(source).__name__}")
    if not data:
        raise UnreadableDicom("the file is empty")
    if not (is_part10(data) or is_bare_dataset(data)):
        raise UnreadableDicom(
            "not a DICOM file: no 'DICM' marker after the 128-byte preamble, and not a bare "
            "dataset starting with a group 0008 element"
        )
    return data


def is_part10(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_bare_dataset(data: bytes) -> bool:
    """A dataset without preamble and file meta, as old archives export it: it starts with a
    little-endian group 0x0008 element (implicit VR: a 4-byte length follows; explicit VR: two
    upper-case letters)."""
    if len(data) < 8 or data[0:2] != b"\x08\x00":
        return False
    vr = data[4:6]
    explicit = vr.isalpha() and vr.isupper()
    return explicit or struct.unpack("<I", data[4:8])[0] < len(data)


def _check_deflated_size(data: bytes, limits: DecodeLimits) -> None:
    """Refuse a deflated dataset that would inflate beyond the limits (a zip bomb), before
    pydicom inflates all of it in one go."""
    # File meta starts with its group length (0002,0000) UL at byte 132 (explicit VR LE).
    if data[132:138] != b"\x02\x00\x00\x00UL":
        return
    (group_length,) = struct.unpack("<I", data[140:144])
    start = 144 + group_length
    if b"1.2.840.10008.1.2.1.99" not in data[144:start]:
        return
    budget = limits.max_file_bytes + limits.max_pixel_bytes
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    chunk = 1 << 20
    for offset in range(start, len(data), chunk):
        out = inflater.decompress(data[offset : offset + chunk], budget + 1 - inflated)
        inflated += len(out)
        while inflater.unconsumed_tail and inflated <= budget:
            out = inflater.decompress(inflater.unconsumed_tail, budget + 1 - inflated)
            inflated += len(out)
        if inflated > budget:
            raise ImageTooLarge(f"the deflated dataset inflates beyond {budget} bytes")


# ----------------------------------------------------------------------------- header checks


def _int_tag(ds: Any, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is None:
            raise UnsupportedDicom(f"the {keyword} tag is missing, so there is no image to read")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise UnreadableDicom(f"the {keyword} tag is not a number") from exc


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str


def _check_header(ds: Any, limits: DecodeLimits) -> _Geometry:
    rows = _int_tag(ds, "Rows")
    columns = _int_tag(ds, "Columns")
    frames = _int_tag(ds, "NumberOfFrames", 1) or 1
    samples = _int_tag(ds, "SamplesPerPixel", 1)
    bits_allocated = _int_tag(ds, "BitsAllocated")
    bits_stored = _int_tag(ds, "BitsStored", bits_allocated)
    representation = _int_tag(ds, "PixelRepresentation", 0)
    if rows > limits.max_rows or columns > limits.max_columns:
        raise ImageTooLarge(
            f"the image is {rows} x {columns} pixels; the limit is "
            f"{limits.max_rows} x {limits.max_columns}"
        )
    if frames > limits.max_frames:
        raise ImageTooLarge(f"the file holds {frames} frames; the limit is {limits.max_frames}")
    pixel_bytes = rows * columns * frames * max(samples, 1) * max(bits_allocated, 8) // 8
    if pixel_bytes > limits.max_pixel_bytes:
        raise ImageTooLarge(
            f"the pixel data would take {pixel_bytes} bytes decoded; "
            f"the limit is {limits.max_pixel_bytes} bytes"
        )
    if rows < limits.min_side_px or columns < limits.min_side_px:
        raise UnsupportedDicom(
            f"the image is {rows} x {columns} pixels, too small to be a radiograph "
            f"(at least {limits.min_side_px} x {limits.min_side_px})"
        )
    if frames > 1:
        raise UnsupportedDicom(
            f"multi-frame images ({frames} frames) are not supported; send one single-frame "
            "radiograph per request"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        kind = photometric or f"{samples} samples per pixel"
        raise UnsupportedDicom(
            f"only grayscale (MONOCHROME1/MONOCHROME2) radiographs are supported, not {kind}"
        )
    if bits_allocated not in BITS_ALLOCATED:
        raise UnsupportedDicom(
            f"BitsAllocated {bits_allocated} is not supported: radiographs (DX, CR) store 8 or "
            "16 bits per pixel"
        )
    if not 1 <= bits_stored <= bits_allocated:
        raise UnreadableDicom(
            f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}"
        )
    if representation not in (0, 1):
        raise UnreadableDicom(f"PixelRepresentation {representation} is neither 0 nor 1")
    return _Geometry(
        rows, columns, frames, bits_allocated, bits_stored, representation == 1, photometric
    )


# ----------------------------------------------------------------------------- codestreams


def _first_frame(pixel_data: bytes) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(pixel_data, number_of_frames=1))


HTJ2K_UIDS = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")


def _check_codestream(
    ts: Any, pixel_data: bytes, geometry: _Geometry, limits: DecodeLimits
) -> None:
    """Check a compressed frame's own header (``mris.codestream``) against the limits and the
    DICOM header, before its decoder runs."""
    from pydicom import uid

    frame = _first_frame(pixel_data)
    if not frame:
        raise UnreadableDicom("the compressed pixel data holds an empty frame")
    if ts == uid.RLELossless:
        codestream.rle_segment_count(frame, geometry.bits_allocated // 8)
        return
    if str(ts) in HTJ2K_UIDS:
        header = codestream.j2k_frame_header(frame, "HTJ2K")
    elif ts in uid.JPEG2000TransferSyntaxes:
        header = codestream.j2k_frame_header(frame)
    elif ts in uid.JPEGTransferSyntaxes or ts in uid.JPEGLSTransferSyntaxes:
        header = codestream.jpeg_frame_header(frame)
    else:
        raise UnsupportedDicom(f"the transfer syntax {ts.name} is not one this service decodes")
    kind = header.kind
    if header.rows > limits.max_rows or header.columns > limits.max_columns:
        raise ImageTooLarge(
            f"the {kind} codestream is {header.rows} x {header.columns} pixels; the limit is "
            f"{limits.max_rows} x {limits.max_columns}"
        )
    if (header.rows, header.columns) != (geometry.rows, geometry.columns):
        raise UnreadableDicom(
            f"the {kind} codestream is {header.rows} x {header.columns} pixels but the header says "
            f"{geometry.rows} x {geometry.columns}"
        )
    if header.tiles > codestream.MAX_J2K_TILES:
        raise UnreadableDicom(
            f"the {kind} codestream declares {header.tiles} tiles (at most "
            f"{codestream.MAX_J2K_TILES})"
        )
    if header.components != 1:
        raise UnreadableDicom(
            f"the {kind} codestream has {header.components} components but the header says one "
            "sample per pixel"
        )
    if not 2 <= header.precision <= geometry.bits_allocated:
        raise UnreadableDicom(
            f"the {kind} codestream has {header.precision}-bit samples but the header allocates "
            f"{geometry.bits_allocated} bits"
        )


def _check_native_length(pixel_data: bytes, geometry: _Geometry) -> None:
    expected = geometry.rows * geometry.columns * geometry.frames * geometry.bits_allocated // 8
    actual = len(pixel_data)
    if actual == expected or actual == expected + 1 and expected % 2 == 1:
        return
    problem = "shorter" if actual < expected else "longer"
    raise UnreadableDicom(
        f"the pixel data is {actual} bytes, {problem} than the {expected} bytes that "
        f"{geometry.rows} x {geometry.columns} pixels at {geometry.bits_allocated} bits need "
        "(truncated or corrupt file?)"
    )


# ----------------------------------------------------------------------------- decode


def _decode(ds: Any, geometry: _Geometry, limits: DecodeLimits, data: bytes) -> np.ndarray:
    from pydicom import uid
    from pydicom.pixels import get_decoder, pixel_array

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None:
        raise UnreadableDicom("the file meta information has no transfer syntax")
    ts = uid.UID(str(ts))
    if "PixelData" not in ds:
        if b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data:
            # The tag is there but pydicom could not read its value: a file cut short.
            raise UnreadableDicom("the pixel data is cut short (truncated file?)")
        raise UnsupportedDicom("the file has no pixel data (PixelData tag missing)")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedDicom(
            "float pixel data is not a radiograph pixel format (DX and CR store integers)"
        )
    pixel_data = ds.PixelData
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise UnsupportedDicom(f"no decoder for the transfer syntax {ts.name}") from exc
        if not decoder.is_available:
            raise UnsupportedDicom(f"no decoder installed for the transfer syntax {ts.name}")
        if limits.check_codestreams:
            _check_codestream(ts, pixel_data, geometry, limits)
        plugins = decoder.available_plugins
        # The compiled plugins are far faster than pydicom's pure-Python RLE / Pillow's J2K.
        plugin = "pylibjpeg" if "pylibjpeg" in plugins else ""
        array = pixel_array(ds, decoding_plugin=plugin) if plugin else pixel_array(ds)
    else:
        _check_native_length(pixel_data, geometry)
        array = pixel_array(ds)
    array = np.asarray(array)
    if array.shape != (geometry.rows, geometry.columns):
        raise UnreadableDicom(
            f"the decoded image is {array.shape} but the header says "
            f"{geometry.rows} x {geometry.columns}"
        )
    return array


def _stored_range(geometry: _Geometry) -> tuple[int, int]:
    if geometry.signed:
        return -(1 << (geometry.bits_stored - 1)), (1 << (geometry.bits_stored - 1)) - 1
    return 0, (1 << geometry.bits_stored) - 1


def _mask_unused_bits(array: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """Ignore bits above BitsStored (old files keep overlays there); sign-extend if signed."""
    if geometry.bits_stored >= geometry.bits_allocated or array.dtype.kind not in "iu":
        return array
    bits = geometry.bits_stored
    # int32 holds every 8- or 16-bit value: half the memory of int64 on a full-size image.
    as_unsigned = array.astype(np.int32) & ((1 << bits) - 1)
    if geometry.signed:
        as_unsigned = np.where(
            as_unsigned >= 1 << (bits - 1), as_unsigned - (1 << bits), as_unsigned
        )
    return as_unsigned


def _to_float(ds: Any, array: np.ndarray, geometry: _Geometry) -> tuple[np.ndarray, dict]:
    """Modality LUT, then MONOCHROME1 inversion within the LUT's output range; float32."""
    from pydicom.pixels import apply_modality_lut

    array = _mask_unused_bits(array, geometry)
    low, high = _stored_range(geometry)
    info: dict[str, Any] = {}
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(array, ds).astype(np.float32)
        info["modality_lut"] = "sequence"
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        out_low, out_high = float(lut.min()), float(lut.max())
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
            raise UnreadableDicom("RescaleSlope/RescaleIntercept are not usable numbers")
        values = array.astype(np.float32)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
        info["modality_lut"] = "rescale" if (slope, intercept) != (1.0, 0.0) else "identity"
        out_low, out_high = sorted((low * slope + intercept, high * slope + intercept))
    if geometry.photometric == "MONOCHROME1":
        values = np.float32(out_low + out_high) - values
    return np.ascontiguousarray(values, dtype=np.float32), info


# ----------------------------------------------------------------------------- spacing


def _spacing_pair(ds: Any, keyword: str) -> tuple[tuple[float, float] | None, str]:
    """(row, col) spacing from a tag, or None and why it is unusable."""
    from pydicom.multival import MultiValue

    if keyword not in ds or ds[keyword].value in (None, ""):
        return None, f"{keyword} absent"
    value = ds[keyword].value
    try:
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        return None, f"{keyword} is not numeric"
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        return None, f"{keyword} has {len(numbers)} values, 2 expected"
    row, col = numbers
    if not all(math.isfinite(v) for v in numbers):
        return None, f"{keyword} is not finite"
    if row <= 0 or col <= 0:
        return None, f"{keyword} is zero or negative ({row:g}, {col:g})"
    if abs(row - col) > SPACING_SQUARE_TOLERANCE * max(row, col):
        return None, (
            f"{keyword} is not square ({row:g} x {col:g} mm; tolerance "
            f"{SPACING_SQUARE_TOLERANCE:.0%})"
        )
    mean = (row + col) / 2
    if not SPACING_MIN_MM <= mean <= SPACING_MAX_MM:
        return None, (
            f"{keyword} {mean:g} mm is outside the plausible range "
            f"{SPACING_MIN_MM:g}-{SPACING_MAX_MM:g} mm"
        )
    return (row, col), ""


def _spacing(ds: Any, caller_mm: float | None, metadata: dict) -> tuple[float, str]:
    reasons = []
    file_spacing: tuple[float, str] | None = None
    for keyword in SPACING_TAGS:
        pair, why = _spacing_pair(ds, keyword)
        if pair is not None:
            file_spacing = ((pair[0] + pair[1]) / 2, keyword)
            break
        reasons.append(why)
    if file_spacing is not None:
        metadata["file_spacing_mm"] = round(file_spacing[0], 6)
        metadata["file_spacing_source"] = file_spacing[1]
    if caller_mm is not None:
        return validate_spacing_mm(caller_mm), "caller"
    if file_spacing is None:
        raise NoUsableSpacing(
            "the file has no usable pixel spacing (" + "; ".join(reasons) + "); "
            "give spacing_mm (mm per pixel) to read it"
        )
    return file_spacing


def validate_spacing_mm(spacing_mm: float) -> float:
    """A caller-given spacing in mm per pixel, checked; raises ``BadParameter``."""
    try:
        value = float(spacing_mm)
    except (TypeError, ValueError) as exc:
        raise BadParameter("spacing_mm must be a number (mm per pixel)") from exc
    if not math.isfinite(value) or not SPACING_MIN_MM <= value <= SPACING_MAX_MM:
        raise BadParameter(
            f"spacing_mm must be between {SPACING_MIN_MM:g} and {SPACING_MAX_MM:g} mm per pixel, "
            f"got {spacing_mm!r}"
        )
    return value


# ----------------------------------------------------------------------------- public


def _infer_transfer_syntax(ds: Any) -> None:
    """A bare dataset (no file meta): its transfer syntax is the encoding pydicom read it with.
    Encapsulated pixel data cannot be decoded without knowing its codec."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    implicit, little = ds.original_encoding
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise UnsupportedDicom(
            "the dataset has no file meta information, so the codec of its compressed pixel data "
            "is unknown; send it as a DICOM Part 10 file"
        )
    if implicit and not little:
        raise UnreadableDicom("the dataset's encoding (implicit VR big endian) is not valid DICOM")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        uid.ImplicitVRLittleEndian
        if implicit
        else uid.ExplicitVRLittleEndian
        if little
        else uid.ExplicitVRBigEndian
    )


def _metadata(ds: Any, ts: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for keyword, name in _METADATA_TAGS.items():
        value = ds.get(keyword, None)
        if value is None or value == "":
            continue
        if isinstance(value, (int, float)):
            meta[name] = value if isinstance(value, int) else float(value)
        else:
            try:
                meta[name] = float(value) if name.startswith("rescale") else str(value)[:64]
            except (TypeError, ValueError):
                continue
    meta["transfer_syntax"] = ts.name if ts is not None else "unknown"
    meta["transfer_syntax_uid"] = str(ts) if ts is not None else ""
    return meta


def read_radiograph(
    source: bytes | str | Path,
    spacing_mm: float | None = None,
    limits: DecodeLimits | None = None,
) -> Radiograph:
    """Read a radiograph DICOM (bytes or path) into a ``Radiograph``.

    ``spacing_mm`` (mm per pixel), when given, overrides the file's spacing tags
    (``spacing_source == "caller"``). Raises only ``UnreadableDicom``, ``UnsupportedDicom``,
    ``ImageTooLarge``, ``NoUsableSpacing`` (and ``BadParameter`` for a bad ``spacing_mm``).
    """
    import pydicom

    limits = limits or DecodeLimits()
    if spacing_mm is not None:
        validate_spacing_mm(spacing_mm)
    data = _read_source(source, limits)
    stage = "reading the header"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_deflated_size(data, limits)
            bare = not is_part10(data)
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=bare)
            geometry = _check_header(header, limits)
            stage = "reading the file"
            ds = pydicom.dcmread(io.BytesIO(data), force=bare)
            if bare:
                _infer_transfer_syntax(ds)
            ts = ds.file_meta.get("TransferSyntaxUID")
            ts = pydicom.uid.UID(str(ts)) if ts is not None else None
            stage = "decoding the pixel data"
            array = _decode(ds, geometry, limits, data)
            stage = "applying the modality LUT"
            pixels, lut_info = _to_float(ds, array, geometry)
            stage = "reading the spacing and technical tags"
            if not np.isfinite(pixels).all():
                raise UnreadableDicom("the decoded image holds non-finite values")
            metadata = _metadata(ds, ts)
            metadata.update(lut_info)
            spacing, source_name = _spacing(ds, spacing_mm, metadata)
            identity = SourceIdentity.from_dataset(ds)
    except MrisError:
        raise
    except _PASS_THROUGH:
        raise
    except BaseException as exc:
        raise UnreadableDicom(
            f"the DICOM could not be read: {type(exc).__name__} while {stage} "
            "(truncated, corrupt or non-conforming file?)"
        ) from exc
    metadata["spacing_mm"] = spacing
    metadata["spacing_source"] = source_name
    return Radiograph(
        pixels=pixels,
        spacing_mm=float(spacing),
        spacing_source=source_name,
        metadata=metadata,
        source=identity,
    )
