"""The three tables from hand-made per-knee results."""

from __future__ import annotations

import numpy as np
import pytest

from mris.evaluation.tables import (
    KneeErrors,
    error_table,
    first_visit_positions,
    merge_klg,
    retrieval_row,
)
from mris.manifest import ManifestRow


def _row(
    subject: str, side: str, month: int, klg: int, progressor: int, split: str = "test"
) -> ManifestRow:
    return ManifestRow(
        pair_id=f"{subject}_{side}_{month:03d}",
        subject_id=subject,
        side=side,
        visit_month=month,
        radiograph_path="x.dcm",
        fc_path="fc.npy",
        tc_path="tc.npy",
        split=split,
        klg=klg,
        progressor=progressor,
    )


def test_first_visits_and_klg_classes():
    rows = [_row("a", "LEFT", 12, 0, 0), _row("a", "LEFT", 0, 0, 0), _row("a", "RIGHT", 24, 1, 0)]
    assert first_visit_positions(rows) == [1, 2]
    assert [merge_klg(g) for g in range(5)] == [0, 0, 1, 2, 3]


def test_perfect_retrieval_row_has_recall_one_and_a_closed_interval():
    keys = np.eye(30, 512, dtype=np.float32)
    row = retrieval_row(keys, keys, [f"s{i // 2}" for i in range(30)], resamples=50, seed=0)
    assert row["recall"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "R@20": 1.0}
    assert row["ci95"]["R@1"] == [1.0, 1.0]
    assert row["chance"]["R@1"] == pytest.approx(1 / 30) and row["chance"]["R@20"] == pytest.approx(
        20 / 30
    )
    assert row["median_rank"] == 1.0 and row["curve"][0] == 1.0


def test_error_table_by_hand():
    errors = KneeErrors()
    errors.add_rows(
        [_row("a", "LEFT", 0, 0, 0), _row("b", "LEFT", 0, 0, 0), _row("c", "LEFT", 0, 3, 0)]
    )
    truth = np.ones((3, 2, 2), np.float32)
    perfect = truth.copy()
    off = truth + np.array([0.1, 0.3, 0.5], np.float32)[:, None, None]
    for name in ("fc", "tc"):
        errors.add("mris-s", name, perfect, truth)
        errors.add("unet", name, off, truth)
    table = error_table(errors, resamples=20, seed=0)
    s, u = table["methods"]["mris-s"]["fc"], table["methods"]["unet"]["fc"]
    assert s["all"]["median"] == 0.0 and s["coverage_mean"] == 1.0  # a perfect synthesis: error 0
    assert u["all"]["median"] == pytest.approx(0.3) and u["all"]["mad"] == pytest.approx(0.2)
    assert u["by_klg"]["0"] == pytest.approx({"median": 0.2, "mad": 0.1, "n": 2})
    assert u["by_klg"]["3"]["median"] == pytest.approx(0.5) and u["by_klg"]["4"]["n"] == 0
    paired = table["paired"]["mris-s vs unet"]["fc"]
    assert paired["first_better_share"] == 1.0 and paired["median_difference_mm"] == pytest.approx(
        -0.3
    )
    assert paired["mean_difference_mm"] == pytest.approx(-0.3) and (
        paired["n"],
        paired["subjects"],
    ) == (3, 3)
    low, high = paired["mean_difference_ci95"]
    assert (
        -0.5 <= low <= -0.3 <= high <= -0.1
    )  # resampled subjects: differences of 0.1, 0.3, 0.5 mm
    assert paired["first_better_share_ci95"] == [1.0, 1.0]
    assert "mris-s vs mris-c" not in table["paired"]  # no MRIS-C errors here


def test_paired_intervals_resample_subjects_not_knee_visits():
    """Ten knee-visits of ONE subject carry one subject's worth of evidence: resampling subjects
    leaves a single draw, so the interval is that subject's value, not a narrow knee-level one."""
    errors = KneeErrors()
    errors.add_rows([_row("s1", "LEFT", 12 * i, 0, 0) for i in range(10)])
    truth = np.ones((10, 2, 2), np.float32)
    shifts = np.linspace(-0.2, 0.2, 10).astype(np.float32)[:, None, None]
    for name in ("fc", "tc"):
        errors.add("mris-s", name, truth + 0.1 + shifts, truth)
        errors.add("unet", name, truth + 0.1, truth)
    paired = error_table(errors, resamples=50, seed=1)["paired"]["mris-s vs unet"]["fc"]
    assert paired["subjects"] == 1 and paired["n"] == 10
    assert paired["mean_difference_ci95"][0] == pytest.approx(paired["mean_difference_ci95"][1])
