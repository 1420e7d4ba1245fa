"""The report's plain sentences follow the numbers, and report.json is strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np

from mris.evaluation.report import findings, json_safe


def _error(median: float) -> dict:
    return {"all": {"median": median}}


def _report(mris_s_fc: float, unet_fc: float, klg_s: float, klg_mr: float) -> dict:
    return {
        "table1_retrieval": {
            "femoral": {"recall": {"R@20": 0.5}, "chance": {"R@20": 0.05}, "gallery": 400}
        },
        "table2_reference": {
            "methods": {
                "mris-s": {"fc": _error(mris_s_fc), "tc": _error(0.2)},
                "unet": {"fc": _error(unet_fc), "tc": _error(0.3)},
            },
            "paired": None,
        },
        "table2_error": {"methods": {}, "paired": None},
        "table3_downstream": {
            "methods": {"mr": {"klg": {"accuracy": klg_mr}}, "mris-s": {"klg": {"accuracy": klg_s}}}
        },
    }


def test_findings_say_whether_the_papers_ordering_holds():
    agree = " ".join(findings(_report(0.27, 0.30, 0.79, 0.78)))
    assert "R@20 50.0 % against 5.0 % by chance (10.0x)" in agree
    assert "the reference's statistic): MRIS-S 0.270 mm vs U-Net 0.300 mm: AGREES" in agree
    assert "close (within 0.05)" in agree and "the same direction" in agree
    disagree = " ".join(findings(_report(0.33, 0.30, 0.60, 0.78)))
    assert "MRIS-S 0.330 mm vs U-Net 0.300 mm: does NOT agree" in disagree
    assert "NOT close" in disagree and "the OPPOSITE direction" in disagree


def test_json_safe_turns_nan_into_null():
    value = {"a": float("nan"), "b": [np.float32(1.5), np.int64(2), math.inf], 3: "x"}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.5, 2, None], "3": "x"}


def test_paired_lines_give_the_subject_interval_and_say_whether_it_excludes_zero():
    report = _report(0.27, 0.30, 0.79, 0.78)
    paired = {
        "n": 40,
        "subjects": 10,
        "mean_difference_mm": -0.03,
        "mean_difference_ci95": [-0.05, -0.01],
        "first_better_share": 0.7,
        "first_better_share_ci95": [0.55, 0.85],
    }
    report["table2_reference"]["paired"] = {
        "mris-s vs pix2pix": {
            "first": "mris-s",
            "second": "pix2pix",
            "fc": paired,
            "tc": {"n": 0, "subjects": 0},
        }
    }
    text = " ".join(findings(report))
    assert (
        "Paired (per-pair median absolute error, fc, MRIS-S - pix2pix): mean difference -0.030 mm "
        "(95 % subject-bootstrap interval -0.050 to -0.010; excludes 0)"
    ) in text
    assert "of 40 test knee-visits of 10 subjects" in text and ", tc, " not in text
    assert "p =" not in text and "Wilcoxon" not in text
