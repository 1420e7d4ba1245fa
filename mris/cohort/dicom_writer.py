"""Writing a rendered radiograph as a DX DICOM file (pydicom).

Tags follow a "Bilateral PA Fixed Flexion Knee" DX object: Modality DX, SOP class Digital X-Ray
Image Storage - For Presentation, 12 bits stored in 16 allocated, MONOCHROME1 for a share of
scanners (stored inverted), ImagerPixelSpacing and/or PixelSpacing, a synthetic PatientName
and PatientID (so tests can check that no identifier leaks downstream). UIDs derive from the
cohort seed (``generate_uid(entropy_srcs=...)``), so the same seed writes the same UIDs.

Transfer syntaxes: Explicit VR Little Endian for most files, a share RLE Lossless (pydicom's
native encoder) and a share JPEG 2000 Lossless (pylibjpeg-openjpeg encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from mris.fsutil import atomic_write

SCANNERS = (
    # manufacturer, model, photometric, share
    ("Synthetic Imaging Co", "SynDX 3000", "MONOCHROME2", 0.45),
    ("Acme Medical", "AcmeRad CR-12", "MONOCHROME1", 0.30),
    ("Northwind Radiology", "NW Flat Panel 43", "MONOCHROME2", 0.25),
)
TRANSFER_SYNTAX_SHARES = (
    (ExplicitVRLittleEndian, 0.6),
    (RLELossless, 0.2),
    (JPEG2000Lossless, 0.2),
)
SPACING_TAG_SHARES = (("both", 0.7), ("imager", 0.25), ("pixel", 0.05))


@dataclass(frozen=True)
class DicomChoices:
    """Per-visit scanner and encoding choices (drawn from the visit generator)."""

    scanner: int
    transfer_syntax: str
    spacing_tags: str


def draw_choices(rng: np.random.Generator) -> DicomChoices:
    scanner = int(rng.choice(len(SCANNERS), p=[s[3] for s in SCANNERS]))
    ts = [t for t, _ in TRANSFER_SYNTAX_SHARES]
    tsi = int(rng.choice(len(ts), p=[p for _, p in TRANSFER_SYNTAX_SHARES]))
    tags = [t for t, _ in SPACING_TAG_SHARES]
    tgi = int(rng.choice(len(tags), p=[p for _, p in SPACING_TAG_SHARES]))
    return DicomChoices(scanner=scanner, transfer_syntax=str(ts[tsi]), spacing_tags=tags[tgi])


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["mris-cohort", str(seed), *[str(p) for p in parts]])


def build_dataset(
    pixels: np.ndarray,
    spacing_mm: float,
    choices: DicomChoices,
    *,
    seed: int,
    subject_id: str,
    sex: str,
    age: float,
    month: int,
    magnification: float,
) -> FileDataset:
    """A complete DX dataset (uncompressed); ``pixels`` uint16 12-bit, bone bright."""
    manufacturer, model, photometric, _ = SCANNERS[choices.scanner]
    stored = (
        (4095 - pixels).astype(np.uint16)
        if photometric == "MONOCHROME1"
        else pixels.astype(np.uint16)
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    sop_uid = _uid(seed, subject_id, month, "sop")
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)

    study_date = f"{2004 + month // 12:04d}{1 + (int(subject_id[1:]) % 12):02d}15"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, subject_id, month, "study")
    ds.SeriesInstanceUID = _uid(seed, subject_id, month, "series")
    ds.FrameOfReferenceUID = _uid(seed, subject_id, month, "frame")
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"A{subject_id[1:]}{month:03d}"
    ds.StudyID = f"{month:03d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "Bilateral PA Fixed Flexion Knee"
    ds.SeriesDescription = "Bilateral PA Fixed Flexion Knee"
    ds.BodyPartExamined = "KNEE"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["R", "F"]
    ds.Laterality = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionName = "Synthetic OAI-like Cohort"
    ds.PatientName = f"SYNTHETIC^{subject_id}"
    ds.PatientID = f"SYN-{subject_id}"
    ds.PatientSex = sex
    ds.PatientAge = f"{int(age + month / 12):03d}Y"
    ds.PatientBirthDate = ""
    ds.KVP = 70 + (choices.scanner * 3)
    ds.DistanceSourceToDetector = 1830.0
    ds.DistanceSourceToPatient = round(1830.0 / magnification, 1)
    ds.EstimatedRadiographicMagnificationFactor = round(magnification, 4)
    ds.BurnedInAnnotation = "NO"

    spacing = [
        f"{spacing_mm:.4f}".rstrip("0").rstrip("."),
        f"{spacing_mm:.4f}".rstrip("0").rstrip("."),
    ]
    if choices.spacing_tags in ("both", "imager"):
        ds.ImagerPixelSpacing = spacing
    if choices.spacing_tags in ("both", "pixel"):
        ds.PixelSpacing = spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = stored.tobytes()
    return ds


def write_dicom(path: Path, ds: FileDataset, transfer_syntax: str) -> None:
    """Compress (if asked) and write atomically."""
    if transfer_syntax == str(RLELossless):
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    elif transfer_syntax == str(JPEG2000Lossless):
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
