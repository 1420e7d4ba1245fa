"""Pictures of synthesis results (``mris.render``): the figure without a calibration (one row
per knee, the raw-SD notice) and with calibrated intervals (a row per cartilage with the lower
and upper bound maps on the thickness scale, the coverage and the knee's reliability in words).
Knee results are built from small synthetic maps and a real ``Calibration``."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from mris.calibration import Calibration
from mris.pipeline import KneeResult
from mris.render import (
    RAW_SD_NOTICE,
    THICKNESS_CMAP,
    THICKNESS_MAX_MM,
    render_results_png,
    results_figure,
)
from mris.roi import KneeRoi

GROUP = "klg2"
SHAPE = (40, 36)  # an odd-sized atlas grid, not square


def _knee(side: str, seed: int) -> KneeResult:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inside = ((rows - 20) / 18.0) ** 2 + ((cols - 18) / 16.0) ** 2 <= 1.0
    maps, sds = {}, {}
    for name, level in (("fc", 2.4), ("tc", 1.8)):
        thickness = (level + 0.4 * rng.standard_normal(SHAPE)).astype(np.float32)
        thickness[~inside] = np.nan
        sd = np.abs(0.3 * rng.standard_normal(SHAPE)).astype(np.float32)
        sd[~inside] = np.nan
        maps[name], sds[name] = thickness, sd
    roi = KneeRoi(
        image=rng.random((32, 32), dtype=np.float32),
        centre_xy=(100.0, 120.0),
        size_px=64.0,
        spacing_mm=0.5,
        side=side,
        source="caller",
    )
    return KneeResult(
        side=side,
        roi=roi,
        spacing_source="dicom",
        confidence=None,
        neighbours={},
        maps_mm=maps,
        std_mm=sds,
        nan_rule="majority",
    )


def _calibrated(result: KneeResult) -> KneeResult:
    calibration = Calibration(
        coverage=0.9,
        sd_floor_mm=0.05,
        quantiles={"fc": {"all": 1.6, GROUP: 1.4}, "tc": {"all": 1.8}},
        method="test",
    )
    lower, upper = calibration.intervals(result.maps_mm, result.std_mm, GROUP)
    return dataclasses.replace(result, lower_mm=lower, upper_mm=upper, calibration_group=GROUP)


@pytest.fixture(scope="module")
def knees() -> list[KneeResult]:
    return [_knee("RIGHT", 1), _knee("LEFT", 2)]


def _texts(figure) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in figure.findobj(Text) if t.get_visible() and t.get_text()]


def _maps(figure) -> dict[str, object]:
    """Panel title (its last line) -> the image drawn in it, for the visible panels."""
    return {
        ax.get_title().splitlines()[-1]: ax.get_images()[0]
        for ax in figure.axes
        if ax.get_visible() and ax.get_images()
    }


def _size(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    assert np.asarray(image.convert("RGB")).std() > 10  # a picture, not a blank page
    return image.size


def test_without_intervals_one_row_per_knee_and_the_raw_sd_notice(knees):
    figure = results_figure(knees)
    texts = _texts(figure)
    assert RAW_SD_NOTICE in texts
    assert not any("interval" in text for text in texts)
    assert sorted(_maps(figure)) == sorted(
        ["ROI (encoder input)"]
        + [f"{c} synthesized" for c in ("FC", "TC")]
        + [f"{c} uncertainty (SD)" for c in ("FC", "TC")]
    )
    assert sum(bool(ax.get_images()) for ax in figure.axes) == 2 * 5


def test_with_intervals_the_bound_maps_coverage_and_reliability(knees):
    bounded = [_calibrated(knee) for knee in knees]
    figure = results_figure(bounded, coverage=0.9)
    texts = "\n".join(_texts(figure))
    assert RAW_SD_NOTICE not in texts
    maps = _maps(figure)
    for name in ("FC", "TC"):
        for bound in ("lower", "upper"):
            image = maps[f"{name} 90 % interval, {bound}"]
            # The thickness maps' own scale and colour map.
            assert image.get_clim() == (0.0, THICKNESS_MAX_MM)
            assert image.get_cmap().name == THICKNESS_CMAP
        assert maps[f"{name} synthesized"].get_clim() == (0.0, THICKNESS_MAX_MM)
    # Per knee: the ROI, and per cartilage its map, SD, lower and upper.
    assert sum(bool(ax.get_images()) for ax in figure.axes) == 2 * (1 + 2 * 4)
    for knee in bounded:
        assert f"interval width {knee.reliability_mm:.2f} mm" in texts
    assert f"calibration group {GROUP}" in texts
    assert "with probability 0.9" in texts
    # A bound map is drawn as it is (NaN outside cartilage masked).
    drawn = maps["FC 90 % interval, lower"].get_array()
    assert np.ma.allclose(drawn, np.ma.masked_invalid(bounded[-1].lower_mm["fc"]))


def test_png_with_intervals_is_larger_and_without_a_coverage_says_calibrated(knees):
    bounded = [_calibrated(knee) for knee in knees]
    plain_size = _size(render_results_png(knees, title="plain"))
    bounded_size = _size(render_results_png(bounded, title="bounded", coverage=0.9))
    assert bounded_size[0] == plain_size[0]  # the same five columns...
    assert bounded_size[1] == 2 * plain_size[1]  # ...and a row per cartilage
    unknown = "\n".join(_texts(results_figure(bounded)))
    assert "FC calibrated interval, lower" in unknown and "probability" not in unknown


def test_with_intervals_and_the_true_maps_one_more_column(knees):
    bounded = [_calibrated(knee) for knee in knees]
    truth = [{name: knee.maps_mm[name] + 0.1 for name in knee.maps_mm} for knee in knees]
    plain = results_figure(bounded, coverage=0.9)
    with_truth = results_figure(bounded, truth_mm=truth, coverage=0.9)
    assert "FC true (MR)" in _maps(with_truth) and "TC true (MR)" in _maps(with_truth)
    assert with_truth.get_figwidth() == pytest.approx(plain.get_figwidth() * 6 / 5)
