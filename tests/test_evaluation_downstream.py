"""Table 3 without torch: scikit-learn's metrics, the logistic row, the paired comparison with
the MR maps from the same subject resamples, and the report's Table 3."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    roc_auc_score,
)

from mris.evaluation.downstream import SplitMaps, downstream_table, klg_metrics, progression_metrics
from mris.evaluation.report_downstream import table3_markdown
from mris.evaluation.tables import merge_klg
from mris.manifest import ManifestRow


def test_metrics_are_scikit_learns():
    truth = np.array([0, 0, 0, 1, 2, 3, 3, 1])
    predicted = np.array([0, 0, 1, 1, 2, 3, 0, 2])
    found = klg_metrics(truth, predicted)
    assert found["accuracy"] == accuracy_score(truth, predicted) == 0.625
    assert found["balanced_accuracy"] == balanced_accuracy_score(truth, predicted)
    assert found["confusion"] == confusion_matrix(truth, predicted).tolist()
    assert found["class_accuracy"] == {
        "KL0-1": pytest.approx(2 / 3),
        "KL2": 0.5,
        "KL3": 1.0,
        "KL4": 0.5,
    }
    labels = np.array([1, 0, 1, 0, 0])
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.8])
    progression = progression_metrics(labels, score)
    assert progression["average_precision"] == average_precision_score(labels, score)
    assert progression["roc_auc"] == roc_auc_score(labels, score)
    assert all(np.isnan(v) for v in progression_metrics(np.ones(3, int), score[:3]).values())


def _row(subject: str, month: int, klg: int, progressor: int, split: str) -> ManifestRow:
    return ManifestRow(
        pair_id=f"{subject}_L_{month:03d}",
        subject_id=subject,
        side="LEFT",
        visit_month=month,
        radiograph_path="x.dcm",
        fc_path="fc.npy",
        tc_path="tc.npy",
        split=split,
        klg=klg,
        progressor=progressor,
    )


def _split(name: str, subjects: int, seed: int) -> SplitMaps:
    maps = SplitMaps(map_px=(4, 4))
    rng = np.random.default_rng(seed)
    for i in range(subjects):
        grade = [0, 2, 3, 4][i % 4]
        maps.rows.append(_row(f"{name}{i}", 0, grade, int(grade >= 3), name))
        maps.rows.append(
            _row(f"{name}{i}", 12, grade, int(grade >= 3), name)
        )  # a later visit: KLG only
    labels = np.array([merge_klg(r.klg) for r in maps.rows])
    fc = (
        1.0 + labels[:, None, None] + rng.normal(0, 0.05, (labels.size, 8, 8))
    )  # thickness carries the grade
    maps.add("mr", fc, fc)
    maps.add("copy", fc, fc)
    maps.add(
        "mean", np.ones((labels.size, 8, 8)), np.ones((labels.size, 8, 8))
    )  # the same map for every knee
    return maps


def test_logistic_rows_and_paired_differences_to_mr():
    table = downstream_table(
        _split("downstream", 24, 1),
        _split("test", 12, 2),
        ["mr", "copy", "mean"],
        resamples=40,
        seed=0,
        classifiers=("logistic",),
    )
    assert (
        table["primary"] == "logistic"
        and table["methods"] is table["classifiers"]["logistic"]["methods"]
    )
    mr, mean = table["methods"]["mr"], table["methods"]["mean"]
    assert mr["klg"]["accuracy"] == 1.0 and mr["klg"]["class_accuracy"]["KL4"] == 1.0
    assert mr["progression"]["roc_auc"] == 1.0 and mr["progression"]["average_precision"] == 1.0
    assert mean["klg"]["balanced_accuracy"] == 0.25 and mean["progression"]["roc_auc"] == 0.5
    low, high = mean["klg"]["accuracy_ci95"]
    assert low <= mean["klg"]["accuracy"] <= high
    assert table["counts"]["klg"] == {
        "train": 48,
        "test": 24,
        "test_class_counts": {"0": 6, "1": 6, "2": 6, "3": 6},
        "test_subjects": 12,
    }
    assert table["counts"]["progression"]["test"] == 12  # first visits only
    paired = table["classifiers"]["logistic"]["paired_vs_mr"]
    assert paired["copy"]["klg"]["accuracy"] == {
        "difference": 0.0,
        "ci95": [0.0, 0.0],
        "resamples_used": 40,
    }
    worse = paired["mean"]["progression"]["roc_auc"]
    assert worse["difference"] == -0.5 and worse["ci95"][1] < 0
    assert "mr" not in paired

    text = "\n".join(table3_markdown(table))
    for expected in (
        "| MR maps (truth) | 1.000 (1.000 to 1.000)",
        "| database mean map |",
        "| database mean map - MR |",
        "| copy - MR | +0.000 (+0.000 to +0.000)",
        "KL4 accuracy",
        "logistic regression",
    ):
        assert expected in text, expected


def test_resampled_klg_metrics_agree_with_scikit_learn():
    from mris.evaluation.downstream import _resample_values

    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    positions = rng.integers(0, 50, 50)
    values = _resample_values("klg", truth, predicted, positions)
    assert values["accuracy"] == pytest.approx(
        accuracy_score(truth[positions], predicted[positions])
    )
    assert values["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(truth[positions], predicted[positions])
    )
