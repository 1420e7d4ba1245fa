"""The numbers of Tables 1 and 2 and the subject bootstrap, as plain numpy functions (no torch),
each small enough to check by hand (``tests/test_evaluation_metrics.py``). Table 3's
classification metrics are scikit-learn's (``mris.evaluation.downstream``).

- Retrieval: ``retrieval_ranks`` / ``recall_at_k`` — query q's true match sits at gallery
  position q; its rank is the number of gallery items scoring STRICTLY higher, and it counts as
  found at k when the rank is below k (ties go to the query, as in the training's validation).
- Synthesis error: ``map_error`` — mean absolute error in mm over the pixels that are cartilage
  in both the true and the synthesized map (the reference evaluation's ``nanmean`` of the error
  map), plus the ``coverage``: the share of the true map's cartilage pixels the synthesized map
  covers, so a method cannot look good by leaving hard pixels out.
- Summaries: ``median_mad`` (the raw median absolute deviation, unscaled, as
  ``scipy.stats.median_abs_deviation`` with its default ``scale=1``).
- Uncertainty: ``bootstrap_ci`` resamples SUBJECTS with replacement (the unit of independence:
  both knees and every visit of a subject go together) and recomputes the statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

RECALL_AT = (1, 5, 10, 20)


# ----------------------------------------------------------------------------------- retrieval
def retrieval_ranks(similarity: np.ndarray) -> np.ndarray:
    """``similarity[q, g]`` with the true match of query q at gallery position q -> int64 [Q]
    ranks (0 = the true match scores highest)."""
    similarity = np.asarray(similarity, dtype=np.float32)
    if similarity.ndim != 2 or similarity.shape[0] > similarity.shape[1]:
        raise ValueError(f"similarity must be [Q, G] with Q <= G, got {similarity.shape}")
    own = np.diagonal(similarity)[:, None]
    return (similarity > own).sum(axis=1).astype(np.int64)


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall@k (fractions) of a [Q, G] similarity matrix whose true matches lie on the diagonal."""
    ranks = retrieval_ranks(similarity)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """float64 [max_k]: recall@1 .. recall@max_k from the ranks."""
    ranks = np.asarray(ranks)
    return np.array([np.mean(ranks < k) for k in range(1, max_k + 1)], dtype=np.float64)


# ----------------------------------------------------------------------------- synthesis error
def map_error(predicted_mm: np.ndarray, true_mm: np.ndarray) -> tuple[float, float]:
    """(MAE in mm, coverage) of one synthesized map against the true one; both (H, W), NaN
    outside cartilage. MAE is over pixels finite in both (NaN when there are none); coverage is
    the share of the true map's cartilage pixels that the prediction covers."""
    predicted = np.asarray(predicted_mm, dtype=np.float32)
    truth = np.asarray(true_mm, dtype=np.float32)
    if predicted.shape != truth.shape:
        raise ValueError(
            f"predicted map {predicted.shape} and true map {truth.shape} differ in shape"
        )
    true_mask = np.isfinite(truth)
    both = true_mask & np.isfinite(predicted)
    mae = float(np.mean(np.abs(predicted[both] - truth[both]))) if both.any() else float("nan")
    coverage = float(both.sum() / true_mask.sum()) if true_mask.any() else float("nan")
    return mae, coverage


def median_mad(values: Sequence[float]) -> tuple[float, float, int]:
    """(median, median absolute deviation, count) of the finite values; NaNs when empty."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return float("nan"), float("nan"), 0
    median = float(np.median(array))
    return median, float(np.median(np.abs(array - median))), int(array.size)


# ----------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    groups: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(positions)`` over resamples of the GROUPS (subjects).

    ``statistic`` receives int64 positions into the samples (a position repeats when its group is
    drawn more than once) and returns a number; resamples giving NaN are dropped.
    """
    values = [statistic(positions) for positions in subject_resamples(groups, resamples, seed)]
    return percentile_interval(values, level)


def subject_resamples(
    groups: Sequence[str], resamples: int = 1000, seed: int = 0
) -> Iterator[np.ndarray]:
    """``resamples`` int64 position arrays, each the samples of as many subjects as there are,
    drawn with replacement (the draws ``bootstrap_ci`` uses: one sequence serves several paired
    statistics)."""
    groups = np.asarray(groups)
    if groups.size == 0 or resamples < 1:
        return
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(unique.size)]
    rng = np.random.default_rng([seed, 8])
    for _ in range(resamples):
        drawn = rng.integers(0, unique.size, unique.size)
        yield np.concatenate([members[g] for g in drawn])


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite ``values`` (NaN, NaN when there are none)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(array, [tail, 1.0 - tail])
    return float(low), float(high)
