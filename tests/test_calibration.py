"""Calibrated intervals (mris.calibration) on data whose answer is known, and `mris index
calibrate` end to end: a new verified bundle version that the service's pipeline serves with
intervals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mris.calibration import (
    POOLED,
    Calibration,
    KneeSample,
    achieved_coverage,
    conformal_quantile,
    coverage_counts,
    fit,
    knee_group,
)
from mris.errors import BundleInvalid

SHAPE = (24, 24)


def _knees(n: int, seed: int, sd_scale: float = 1.0, group: str = "klg1") -> list[KneeSample]:
    """Knees whose truth is mean + N(0, sd) per pixel; the SD they report is ``sd_scale`` times
    the true one (1: honest, 0.5: over-confident)."""
    rng = np.random.default_rng(seed)
    knees = []
    for i in range(n):
        mean = {c: rng.uniform(1.0, 4.0, SHAPE).astype(np.float32) for c in ("fc", "tc")}
        true_sd = {c: rng.uniform(0.1, 0.6, SHAPE).astype(np.float32) for c in ("fc", "tc")}
        truth = {c: mean[c] + rng.normal(0, 1, SHAPE).astype(np.float32) * true_sd[c] for c in mean}
        for c in mean:  # outside cartilage
            mean[c][:3] = np.nan
            truth[c][:3] = np.nan
        sd = {c: true_sd[c] * sd_scale for c in mean}
        knees.append(KneeSample(f"S{seed}-{i // 2}", group, truth, mean, sd))
    return knees


def test_conformal_quantile_is_the_finite_sample_rank():
    values = np.arange(1, 10, dtype=float)  # n = 9
    assert conformal_quantile(values, 0.9) == 9.0  # ceil(10 * 0.9) = 9th
    assert conformal_quantile(values, 0.5) == 5.0  # ceil(5) = 5th
    assert conformal_quantile(np.arange(3.0), 0.9) == float("inf")  # too few for 0.9


@pytest.mark.parametrize("sd_scale", [1.0, 0.5, 2.0])
def test_intervals_reach_their_coverage_on_new_knees(sd_scale):
    """Honest, over-confident or too cautious: the calibrated intervals hold 90 % of new pixels."""
    calibration = fit(_knees(60, seed=1, sd_scale=sd_scale), 0.9, sd_floor=0.0)
    achieved = achieved_coverage(calibration, _knees(60, seed=2, sd_scale=sd_scale))
    for cartilage in ("fc", "tc"):
        assert achieved[cartilage][POOLED]["coverage"] == pytest.approx(0.9, abs=0.02)
    # the quantile undoes the mis-scaling: about 1.645 / sd_scale for a normal error
    assert calibration.quantile("fc", "klg1") == pytest.approx(1.645 / sd_scale, rel=0.06)
    # and the fit's own held-out check says so
    held = calibration.achieved["by_cartilage"]["fc"][POOLED]["coverage"]
    assert held == pytest.approx(0.9, abs=0.03)


def test_groups_get_their_own_quantile_and_small_groups_the_pooled_one():
    calm = _knees(40, seed=3, sd_scale=1.0, group="klg0")
    wild = _knees(40, seed=4, sd_scale=0.25, group="klg4")  # SD four times too small
    few = _knees(4, seed=5, sd_scale=1.0, group="klg2")
    calibration = fit(calm + wild + few, 0.9, sd_floor=0.0)
    assert calibration.quantile("tc", "klg4") > 3 * calibration.quantile("tc", "klg0")
    assert "klg2" not in calibration.quantiles["tc"]  # 4 knees < MIN_GROUP_KNEES
    assert calibration.quantile("tc", "klg2") == calibration.quantile("tc", POOLED)
    achieved = achieved_coverage(calibration, _knees(40, seed=6, sd_scale=0.25, group="klg4"))
    assert achieved["tc"]["klg4"]["coverage"] == pytest.approx(0.9, abs=0.02)


def test_interval_bounds():
    calibration = Calibration(0.9, 0.05, {"fc": {POOLED: 2.0}, "tc": {POOLED: 2.0}}, "test")
    mean = np.array([[0.1, 2.0, np.nan]], np.float32)
    sd = np.array([[0.2, 0.0, np.nan]], np.float32)
    lower, upper = calibration.interval("fc", mean, sd, "klg3")
    np.testing.assert_allclose(lower[0, :2], [0.0, 1.9], atol=1e-6)  # clipped at 0 mm
    np.testing.assert_allclose(upper[0, :2], [0.6, 2.1], atol=1e-6)  # the floor keeps it open
    assert np.isnan(lower[0, 2]) and np.isnan(upper[0, 2])
    sample = KneeSample("S", "klg3", {"fc": mean + 0.05}, {"fc": mean}, {"fc": sd})
    assert coverage_counts(calibration, sample, "fc") == (2, 2)


def test_knee_group_is_the_weighted_grade_of_the_neighbours():
    assert knee_group([0, 4], [0.75, 0.25]) == "klg1"
    assert knee_group([2, None, 3], [0.5, 0.2, 0.5]) == "klg2"  # 2.5 rounds to even
    assert knee_group([None, None], [0.5, 0.5]) == POOLED


def test_calibration_file_round_trip_and_refusals():
    calibration = fit(_knees(30, seed=7), 0.8, data={"split": "downstream"})
    again = Calibration.from_json(calibration.to_json())
    assert again == calibration
    assert again.summary()["data"]["split"] == "downstream"
    broken = json.loads(calibration.to_json())
    del broken["quantiles"]["tc"]
    with pytest.raises(BundleInvalid):
        Calibration.from_json(json.dumps(broken))
    with pytest.raises(BundleInvalid):
        Calibration.from_json("{}")


def test_index_calibrate_publishes_a_calibrated_version_the_pipeline_serves(
    localised_bundles, tiny_cohort, tmp_path
):
    from mris.index.bundle import load_index_bundle
    from mris.index.verify import verify_bundle
    from mris.manifest import read_manifest
    from mris.options import RequestOptions
    from mris.pipeline import Pipeline

    root = tmp_path / "index"
    shutil.copytree(localised_bundles["index"], root, symlinks=True)
    before = load_index_bundle(root).card.version
    split = read_manifest(tiny_cohort).rows[0].split
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mris.cli",
            "index",
            "calibrate",
            "--model",
            str(localised_bundles["model"]),
            "--manifest",
            str(tiny_cohort),
            "--root",
            str(root),
            "--split",
            split,
            "--k",
            "3",
            "--publish",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    bundle = load_index_bundle(root)
    assert bundle.card.version != before and bundle.card.source["calibrated_from"] == before
    assert bundle.calibration is not None and bundle.calibration.coverage == 0.9
    assert bundle.card.calibration["data"]["split"] == split
    verify_bundle(bundle.root)
    assert load_index_bundle(root / before).calibration is None  # the old version is untouched

    pipeline = Pipeline.load(localised_bundles["model"], root)
    radiograph = tiny_cohort.parent / read_manifest(tiny_cohort).rows[0].radiograph_path
    for result in pipeline.run(radiograph, RequestOptions(k=3)):
        for cartilage in ("fc", "tc"):
            mean = result.maps_mm[cartilage]
            finite = np.isfinite(mean)
            assert (result.lower_mm[cartilage][finite] <= mean[finite] + 1e-6).all()
            assert (result.upper_mm[cartilage][finite] >= mean[finite] - 1e-6).all()
            assert (result.lower_mm[cartilage][finite] >= 0).all()
        assert result.reliability_mm > 0 and result.calibration_group is not None
