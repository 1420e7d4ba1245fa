"""mris.roi: geometry, flip, normalisation, padding, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import knee_phantom, make_dicom_bytes

from mris.constants import PreprocessConfig
from mris.dicom import Radiograph, read_radiograph
from mris.errors import BadParameter, KneeNotFound
from mris.roi import KneeRoi, extract_roi, extract_rois, stack_rois

CONFIG = PreprocessConfig(encoder_px=64)


def _radiograph(pixels: np.ndarray, spacing_mm: float = 1.0) -> Radiograph:
    return Radiograph(
        pixels=pixels.astype(np.float32), spacing_mm=spacing_mm, spacing_source="caller"
    )


def test_roi_size_centre_and_percentile():
    image = knee_phantom(300, 400).astype(np.float32)
    roi = extract_roi(_radiograph(image, 0.5), "LEFT", (200, 150), CONFIG)
    assert isinstance(roi, KneeRoi)
    assert roi.image.shape == (64, 64) and roi.image.dtype == np.float32
    assert roi.size_px == pytest.approx(280.0)
    assert roi.box_xyxy == pytest.approx((200.5 - 140, 150.5 - 140, 200.5 + 140, 150.5 + 140))
    assert np.percentile(roi.image, 99) == pytest.approx(0.99, rel=1e-4)
    assert roi.source == "caller" and roi.side == "LEFT" and roi.spacing_mm == 0.5


def test_marker_lands_in_the_centre():
    rows, cols = np.mgrid[0:200, 0:200]
    # A background symmetric about pixel (100, 100) (a flat one would be blank: its shifted
    # 99th percentile is 0).
    image = (1.0 + ((rows - 100) ** 2 + (cols - 100) ** 2) / 1e4).astype(np.float32)
    image[99:102, 99:102] = 100.0  # a bright 3 x 3 marker centred on pixel (100, 100)
    roi = extract_roi(_radiograph(image, 1.0), "LEFT", (100, 100), PreprocessConfig(encoder_px=70))
    # 140 px -> 70 px: the centre of pixel 100 falls between output pixels 34 and 35.
    peak = roi.image.max()
    assert roi.image[34, 34] == pytest.approx(peak) and roi.image[35, 35] == pytest.approx(peak)
    assert np.allclose(roi.image, roi.image[:, ::-1], atol=1e-5)  # symmetric about the centre


def test_right_knee_is_flipped():
    image = knee_phantom(300, 400, seed=1).astype(np.float32)
    radiograph = _radiograph(image, 0.5)
    left = extract_roi(radiograph, "LEFT", (120, 150), CONFIG)
    right = extract_roi(radiograph, "right", (120, 150), CONFIG)
    np.testing.assert_allclose(right.image, left.image[:, ::-1])
    unflipped = extract_roi(
        radiograph, "RIGHT", (120, 150), PreprocessConfig(encoder_px=64, flip_right=False)
    )
    np.testing.assert_allclose(unflipped.image, left.image)


def test_monochrome1_and_2_give_the_same_roi():
    image = knee_phantom(300, 400, seed=2)
    mono2 = read_radiograph(make_dicom_bytes(image, bits_stored=12), spacing_mm=0.5)
    mono1 = read_radiograph(
        make_dicom_bytes(
            (4095 - image).astype(np.uint16), photometric="MONOCHROME1", bits_stored=12
        ),
        spacing_mm=0.5,
    )
    centres = {"RIGHT": (120, 150), "LEFT": (280, 150)}
    for a, b in zip(extract_rois(mono1, centres, CONFIG), extract_rois(mono2, centres, CONFIG)):
        np.testing.assert_array_equal(a.image, b.image)


# A ROI that needs no resampling: 71 mm at 1 mm per pixel into 71 px, centre on a pixel, so the
# box's edges are whole pixels and the ROI is exactly image[r - 35 : r + 36, c - 35 : c + 36].
UNSCALED = PreprocessConfig(roi_size_mm=71.0, encoder_px=71)


def _reference_normalize(img: np.ndarray, percentage_clip: float = 99) -> np.ndarray:
    """uncbiag/MRIS ``preprocess.normalize``, verbatim."""
    img = img - img.min()
    return img / np.percentile(img, percentage_clip) * 0.99


@pytest.mark.parametrize(
    "pedestal, spread",
    [(0.0, 100.0), (1000.0, 100.0), (-300.0, 50.0), (4000.0, 5.0)],
    ids=["from-zero", "pedestal", "negative", "high-pedestal-low-contrast"],
)
def test_intensity_is_the_reference_normalize(pedestal, spread):
    rng = np.random.default_rng(3)
    image = (pedestal + spread * rng.random((160, 180)) ** 2).astype(np.float32)
    image[60:80, 70:120] += 3 * spread  # a bright structure above the 99th percentile
    roi = extract_roi(_radiograph(image), "LEFT", (100, 70), UNSCALED)
    crop = image[70 - 35 : 70 + 36, 100 - 35 : 100 + 36].astype(np.float64)
    np.testing.assert_allclose(roi.image, _reference_normalize(crop), atol=2e-6)
    assert roi.image.min() == 0.0
    assert np.percentile(roi.image, 99) == pytest.approx(0.99, rel=1e-5)
    assert roi.offset == pytest.approx(crop.min())
    if pedestal >= 1000.0:  # the old rule (percentile only) put this ROI near 0.99 everywhere
        old = crop / np.percentile(crop, 99) * 0.99
        assert np.abs(old - roi.image).max() > 0.5


def test_intensity_does_not_depend_on_a_pedestal_or_gain():
    image = knee_phantom(300, 400, seed=4).astype(np.float32)
    base = extract_roi(_radiograph(image, 0.5), "LEFT", (200, 150), CONFIG)
    shifted = extract_roi(_radiograph(3.0 * image + 2500.0, 0.5), "LEFT", (200, 150), CONFIG)
    np.testing.assert_allclose(shifted.image, base.image, atol=1e-4)


def test_padding_maps_to_zero_and_is_left_out_of_the_statistics():
    rng = np.random.default_rng(0)
    image = (50 + 100 * rng.random((200, 200))).astype(np.float32)
    image[:5, :] = 0.0  # the radiograph's minimum lies far from the corner ROI's in-image pixels
    image[150:, 150:] = 10.0
    radiograph = _radiograph(image, 1.0)  # ROI 140 px
    corner = extract_roi(radiograph, "LEFT", (199, 100), PreprocessConfig(encoder_px=70))
    # The right part of the box lies outside the image: it maps to exactly 0, never below.
    assert corner.image.min() >= 0.0
    np.testing.assert_array_equal(corner.image[:, 40:], 0.0)
    inside = corner.image[:, :34]
    assert inside.min() == pytest.approx(0.0, abs=1e-6)  # the in-image minimum is 0 too
    assert np.percentile(inside, 99) == pytest.approx(0.99, rel=0.01)
    # The statistics come from the in-image pixels only: the same as the interior ROI of a
    # radiograph whose padding value differs.
    brighter_pad = image.copy()
    brighter_pad[:5, :] = 40.0
    other = extract_roi(
        _radiograph(brighter_pad, 1.0), "LEFT", (199, 100), PreprocessConfig(encoder_px=70)
    )
    np.testing.assert_allclose(other.image[:, :34], inside, atol=1e-5)
    np.testing.assert_array_equal(other.image[:, 40:], 0.0)


def test_a_roi_that_is_one_value_but_a_few_pixels_is_blank():
    image = np.full((100, 100), 700.0, dtype=np.float32)
    image[50, 50] = 900.0  # under 1 % of the ROI differs: its shifted 99th percentile is 0
    with pytest.raises(KneeNotFound, match="blank"):
        extract_roi(_radiograph(image), "LEFT", (50, 50), UNSCALED)


def test_extract_rois_keeps_order_and_stacks():
    image = knee_phantom(300, 400).astype(np.float32)
    rois = extract_rois(_radiograph(image, 0.5), {"RIGHT": (120, 150), "LEFT": (280, 150)}, CONFIG)
    assert [r.side for r in rois] == ["RIGHT", "LEFT"]
    batch = stack_rois(rois)
    assert batch.shape == (2, 1, 64, 64) and batch.dtype == np.float32


@pytest.mark.parametrize("centre", [(-1, 10), (10, 300), (400, 10), (float("nan"), 5)])
def test_centre_outside_the_image(centre):
    image = knee_phantom(300, 400).astype(np.float32)
    with pytest.raises(KneeNotFound, match="outside"):
        extract_roi(_radiograph(image), "LEFT", centre, CONFIG)


def test_blank_roi_and_bad_parameters():
    radiograph = _radiograph(np.full((100, 100), 123.0, dtype=np.float32))
    with pytest.raises(KneeNotFound, match="blank"):
        extract_roi(radiograph, "LEFT", (50, 50), CONFIG)
    with pytest.raises(BadParameter):
        extract_roi(radiograph, "MIDDLE", (50, 50), CONFIG)
    with pytest.raises(BadParameter):
        extract_roi(radiograph, "LEFT", ("a", 1), CONFIG)
