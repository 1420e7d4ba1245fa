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
    return Radiograph(pixels=pixels.astype(np.float32), spacing_mm=spacing_mm, spacing_source="caller")


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
    image = np.ones((200, 200), dtype=np.float32)
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
    unflipped = extract_roi(radiograph, "RIGHT", (120, 150), PreprocessConfig(encoder_px=64, flip_right=False))
    np.testing.assert_allclose(unflipped.image, left.image)


def test_monochrome1_and_2_give_the_same_roi():
    image = knee_phantom(300, 400, seed=2)
    mono2 = read_radiograph(make_dicom_bytes(image, bits_stored=12), spacing_mm=0.5)
    mono1 = read_radiograph(
        make_dicom_bytes((4095 - image).astype(np.uint16), photometric="MONOCHROME1", bits_stored=12),
        spacing_mm=0.5,
    )
    centres = {"RIGHT": (120, 150), "LEFT": (280, 150)}
    for a, b in zip(extract_rois(mono1, centres, CONFIG), extract_rois(mono2, centres, CONFIG)):
        np.testing.assert_array_equal(a.image, b.image)


def test_padding_uses_the_image_minimum_and_ignores_it_for_the_percentile():
    rng = np.random.default_rng(0)
    image = (50 + 100 * rng.random((200, 200))).astype(np.float32)
    radiograph = _radiograph(image, 1.0)  # ROI 140 px
    corner = extract_roi(radiograph, "LEFT", (0, 0), PreprocessConfig(encoder_px=70))
    # The upper-left quadrant lies outside the image: padded with the minimum, then scaled.
    padded = corner.image[:30, :30]
    np.testing.assert_allclose(padded, image.min() * corner.scale, rtol=1e-5)
    inside = corner.image[36:, 36:]
    assert np.percentile(inside, 99) == pytest.approx(0.99, rel=0.01)


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
    radiograph = _radiograph(np.zeros((100, 100), dtype=np.float32))
    with pytest.raises(KneeNotFound, match="blank"):
        extract_roi(radiograph, "LEFT", (50, 50), CONFIG)
    with pytest.raises(BadParameter):
        extract_roi(radiograph, "MIDDLE", (50, 50), CONFIG)
    with pytest.raises(BadParameter):
        extract_roi(radiograph, "LEFT", ("a", 1), CONFIG)
