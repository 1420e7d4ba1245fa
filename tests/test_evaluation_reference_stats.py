"""Table 2's reference statistic against an independent computation written from the reference's
description (uncbiag/MRIS ``preprocess.resize_image(..., ignore_nan=True)`` and
``synthesis.get_synthesis_stat``) with scikit-image and scipy, on hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require
from scipy.stats import median_abs_deviation

from mris.evaluation.reference_stats import (
    ReferenceErrors,
    paired_difference,
    reference_table,
    resize_ignore_nan,
    skimage_resize,
)
from mris.manifest import ManifestRow

skimage_transform = require("skimage.transform")  # a dev dependency: the reference's own resize


def reference_resize(img: np.ndarray, size=(256, 256)) -> np.ndarray:
    """The reference's resize_image(img, size, ignore_nan=True), line by line."""
    img = img.copy()
    mask = np.zeros_like(img)
    mask[np.isnan(img)] = 1
    mask = skimage_transform.resize(mask, size)
    img[np.isnan(img)] = 0
    img = skimage_transform.resize(img, size)
    return np.where(mask > 0.5, np.nan, img)


def reference_pair(truth: np.ndarray, synthesized: np.ndarray) -> tuple[float, float]:
    error = np.abs(reference_resize(synthesized) - reference_resize(truth)).reshape(-1)
    return float(np.nanmedian(error)), float(median_abs_deviation(error, nan_policy="omit"))


def _map(rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    inside = ((y - rows / 2) / (0.4 * rows)) ** 2 + ((x - cols / 2) / (0.45 * cols)) ** 2 <= 1
    values = 2.0 + np.sin(y / rows * 3 + rng.uniform(0, 3)) + rng.normal(0, 0.1, shape)
    return np.where(inside, values, np.nan).astype(dtype)


def _row(i: int, subject: str, klg: int | None) -> ManifestRow:
    return ManifestRow(
        pair_id=f"p{i}",
        subject_id=subject,
        side="LEFT",
        visit_month=12 * i,
        radiograph_path="x.dcm",
        fc_path="fc.npy",
        tc_path="tc.npy",
        split="test",
        klg=klg,
    )


@pytest.mark.parametrize("shape", [(310, 310), (40, 36), (32, 32), (300, 200)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resize_is_skimages(shape, dtype):
    rng = np.random.default_rng(shape[0])
    image = _map(rng, shape, dtype)
    expected = reference_resize(image)
    ours = resize_ignore_nan(image)
    assert ours.dtype == expected.dtype and ours.shape == (256, 256)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6, equal_nan=True)
    assert (
        np.isnan(image).any() and not np.isnan(skimage_resize(np.nan_to_num(image), (64, 64))).any()
    )


def test_a_constant_offset_has_that_median_and_no_spread():
    truth = _map(np.random.default_rng(0), (64, 64))
    errors = ReferenceErrors()
    errors.add(
        [_row(0, "a", 2)],
        {"fc": truth[None], "tc": truth[None]},
        {"unet": {"fc": truth[None] + np.float32(0.25), "tc": truth[None]}},
    )
    table = reference_table(errors, resamples=10, seed=0)
    fc, tc = table["methods"]["unet"]["fc"], table["methods"]["unet"]["tc"]
    assert fc["KLG2"]["median"] == pytest.approx(0.25, abs=1e-6) and fc["KLG2"][
        "mad"
    ] == pytest.approx(0, abs=1e-6)
    assert tc["all"]["median"] == 0.0 and fc["KLG01"]["n"] == 0 and np.isnan(fc["KLG01"]["median"])


def test_table_equals_the_reference_statistic_by_hand():
    rng = np.random.default_rng(7)
    grades = [0, 1, 2, 3, 4, None, 2]
    subjects = ["a", "a", "b", "c", "c", "d", "e"]
    rows = [_row(i, s, g) for i, (s, g) in enumerate(zip(subjects, grades))]
    shape = (50, 44)
    truth = {name: np.stack([_map(rng, shape) for _ in rows]) for name in ("fc", "tc")}
    answers = {}
    for method, noise in (("mris-s", 0.2), ("unet", 0.35)):
        maps = {}
        for name in ("fc", "tc"):
            m = truth[name] + rng.normal(0, noise, truth[name].shape).astype(np.float32)
            m[:, :, :3] = np.nan  # a method may claim less cartilage than the truth
            maps[name] = m
        answers[method] = maps
    answers["empty"] = {
        name: np.full_like(truth[name], np.nan) for name in ("fc", "tc")
    }  # no cartilage at all
    errors = ReferenceErrors()
    errors.add(
        rows[:4],
        {n: truth[n][:4] for n in truth},
        {m: {n: a[n][:4] for n in a} for m, a in answers.items()},
    )
    errors.add(
        rows[4:],
        {n: truth[n][4:] for n in truth},
        {m: {n: a[n][4:] for n in a} for m, a in answers.items()},
    )
    table = reference_table(errors, resamples=30, seed=0)

    strata = {
        "KLG01": [0, 1],
        "KLG2": [2, 6],
        "KLG3": [3],
        "KLG4": [4],
        "all": list(range(len(rows))),
    }
    for method in ("mris-s", "unet"):
        for name in ("fc", "tc"):
            by_pair = np.array(
                [reference_pair(truth[name][i], answers[method][name][i]) for i in range(len(rows))]
            )
            for stratum, members in strata.items():
                cell = table["methods"][method][name][stratum]
                assert cell["median"] == pytest.approx(np.nanmean(by_pair[members, 0]), abs=1e-6)
                assert cell["mad"] == pytest.approx(np.nanmean(by_pair[members, 1]), abs=1e-6)
                assert cell["n"] == len(members)
            low, high = table["methods"][method][name]["all"]["median_ci95"]
            assert low <= table["methods"][method][name]["all"]["median"] <= high
    empty = table["methods"]["empty"]["fc"]["all"]
    assert empty["n"] == 0 and np.isnan(empty["median"])
    paired = table["paired"]["mris-s vs unet"]["fc"]
    assert paired["n"] == len(rows) and paired["subjects"] == 5
    expected = np.mean(
        [
            reference_pair(truth["fc"][i], answers["mris-s"]["fc"][i])[0]
            - reference_pair(truth["fc"][i], answers["unet"]["fc"][i])[0]
            for i in range(len(rows))
        ]
    )
    assert paired["mean_difference_mm"] == pytest.approx(expected, abs=1e-6)
    assert "mris-s vs mris-c" not in table["paired"] and "mris-s vs pix2pix" not in table["paired"]


def test_paired_difference_resamples_subjects():
    """Ten knee-visits of one subject are one subject's evidence: a single draw, a point
    interval."""
    paired = paired_difference(
        np.linspace(0.1, 0.5, 10), np.full(10, 0.3), ["s"] * 10, resamples=50, seed=0
    )
    assert paired["subjects"] == 1 and paired["n"] == 10
    assert paired["mean_difference_ci95"][0] == pytest.approx(paired["mean_difference_ci95"][1])
    assert paired_difference([np.nan], [0.1], ["s"], 10, 0) == {"n": 0, "subjects": 0}
