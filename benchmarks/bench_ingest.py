"""Decode and knee-ROI time for a full-size 2048 x 2560 12-bit radiograph DICOM.

Writes the same image uncompressed (explicit VR little endian) and as JPEG 2000 (lossless and
lossy, pylibjpeg-openjpeg through pydicom's encoder), then times ``read_radiograph`` and
``extract_rois`` (both knees, 140 mm at 0.15 mm/px -> 933 px -> 256 px), and the same decode
through the service's decode sandbox (``mris.sandbox``: a worker process, bytes and pixels in
shared memory) to show what the isolation costs. Medians of repeats.

    python benchmarks/bench_ingest.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from mris.constants import PreprocessConfig
from mris.dicom import read_radiograph
from mris.roi import extract_rois
from mris.sandbox import DecodeSandbox

ROWS, COLS, SPACING_MM = 2048, 2560, 0.15


def make_image(seed: int = 0) -> np.ndarray:
    """A smooth 12-bit bilateral-knee-like image with noise (realistic entropy for codecs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    image = 600 + 200 * yy / ROWS
    for cx in (0.3 * COLS, 0.7 * COLS):
        image += 2600 * np.exp(-(((xx - cx) / 350) ** 2 + ((yy - ROWS / 2) / 700) ** 2))
    image += rng.normal(0, 30, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 4095).astype(np.uint16)


def write(image: np.ndarray, ts: str, **encode: object) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [str(SPACING_MM), str(SPACING_MM)]
    ds.PixelData = image.tobytes()
    if ts != uid.ExplicitVRLittleEndian:
        ds.compress(ts, **encode)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    image = make_image()
    config = PreprocessConfig()
    centres = {"RIGHT": (0.3 * COLS, ROWS / 2), "LEFT": (0.7 * COLS, ROWS / 2)}
    cases = [
        ("uncompressed", uid.ExplicitVRLittleEndian, {}),
        ("JPEG 2000 lossless", uid.JPEG2000Lossless, {}),
        ("JPEG 2000 lossy", uid.JPEG2000, {"j2k_cr": [20]}),
    ]
    print(
        f"{ROWS} x {COLS} 12-bit, {SPACING_MM} mm/px, ROI {config.roi_size_mm:g} mm -> "
        f"{config.encoder_px} px, median of {args.repeats}"
    )
    print(
        f"{'syntax':<20} {'file MiB':>9} {'decode ms':>10} {'2 ROIs ms':>10} {'total ms':>9} "
        f"{'sandboxed decode ms':>20} {'ratio':>6}"
    )
    with DecodeSandbox(workers=1) as sandbox:
        for name, ts, encode in cases:
            data = write(image, ts, **encode)
            radiograph = read_radiograph(data)
            decode = median_ms(lambda data=data: read_radiograph(data), args.repeats)
            roi = median_ms(lambda r=radiograph: extract_rois(r, centres, config), args.repeats)
            sandboxed = median_ms(lambda data=data: sandbox.read(data), args.repeats)
            print(
                f"{name:<20} {len(data) / 2**20:>9.2f} {decode:>10.1f} {roi:>10.1f} "
                f"{decode + roi:>9.1f} "
                f"{sandboxed:>20.1f} {sandboxed / decode:>6.2f}"
            )


if __name__ == "__main__":
    main()
