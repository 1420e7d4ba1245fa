"""The evaluation's numbers against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from mris.evaluation import metrics


def test_perfect_retrieval_gives_recall_one():
    keys = np.eye(6, 8, dtype=np.float32)
    recall = metrics.recall_at_k(keys @ keys.T)
    assert recall == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "R@20": 1.0}


def test_ranks_and_recall_by_hand():
    similarity = np.array(
        [
            [0.9, 0.1, 0.2],  # own 0.9 best: rank 0
            [0.5, 0.4, 0.6],  # own 0.4, two higher: rank 2
            [0.3, 0.7, 0.5],  # own 0.5, one higher: rank 1
        ]
    )
    assert metrics.retrieval_ranks(similarity).tolist() == [0, 2, 1]
    recall = metrics.recall_at_k(similarity, ks=(1, 2, 3))
    assert recall == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    assert metrics.recall_curve(np.array([0, 2, 1]), 3).tolist() == pytest.approx(
        [1 / 3, 2 / 3, 1.0]
    )


def test_ties_go_to_the_query():
    assert metrics.retrieval_ranks(np.full((2, 2), 0.5)).tolist() == [0, 0]


def test_a_gallery_smaller_than_the_queries_is_refused():
    with pytest.raises(ValueError):
        metrics.retrieval_ranks(np.zeros((3, 2)))


def test_map_error_by_hand():
    nan = np.nan
    truth = np.array([[1.0, 2.0], [3.0, nan]])
    predicted = np.array([[1.5, nan], [2.0, 4.0]])
    mae, coverage = metrics.map_error(predicted, truth)
    assert mae == pytest.approx((0.5 + 1.0) / 2)  # pixels (0,0) and (1,0) are cartilage in both
    assert coverage == pytest.approx(2 / 3)  # 2 of the 3 true cartilage pixels covered
    assert metrics.map_error(truth, truth) == (
        0.0,
        1.0,
    )  # a perfect synthesis: error 0, all covered


def test_map_error_without_overlap_is_nan():
    mae, coverage = metrics.map_error(np.full((2, 2), np.nan), np.ones((2, 2)))
    assert np.isnan(mae) and coverage == 0.0
    with pytest.raises(ValueError):
        metrics.map_error(np.ones((2, 2)), np.ones((3, 2)))


def test_median_mad():
    assert metrics.median_mad([1.0, 2.0, 4.0, np.nan]) == (2.0, 1.0, 3)
    median, mad, n = metrics.median_mad([])
    assert np.isnan(median) and np.isnan(mad) and n == 0


def test_bootstrap_resamples_whole_groups():
    values = np.array([1.0, 1.0, 5.0])  # subject a has two samples of 1, subject b one of 5
    groups = ["a", "a", "b"]
    seen = set()

    def statistic(positions: np.ndarray) -> float:
        counts = np.bincount(positions, minlength=3)
        assert counts[0] == counts[1]  # the two samples of subject a always travel together
        seen.add(float(values[positions].mean()))
        return float(values[positions].mean())

    low, high = metrics.bootstrap_ci(statistic, groups, resamples=200, seed=1)
    assert low == pytest.approx(1.0) and high == pytest.approx(5.0)
    assert seen <= {1.0, 5.0, 7 / 3}
    assert metrics.bootstrap_ci(lambda p: 2.0, groups, resamples=20) == (2.0, 2.0)
