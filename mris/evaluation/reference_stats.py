"""Table 2 exactly as the reference computes it (uncbiag/MRIS ``synthesis.get_synthesis_stat``).

For every test knee-visit pair and cartilage (fc, tc):

1. the true and the synthesized map are resized to 256 x 256 with the reference's NaN-aware
   ``preprocess.resize_image(img, (256, 256), ignore_nan=True)``: a mask (1 where NaN, else 0)
   is resized, NaN set to 0 and the map resized, and the result is NaN where the resized mask
   exceeds 0.5 (``resize_ignore_nan``);
2. the absolute error map |synthesized - true| (NaN where either is NaN);
3. its ``np.nanmedian`` and ``scipy.stats.median_abs_deviation(..., nan_policy='omit')`` (the raw
   MAD, ``scale=1``) over the pixels: one (median, MAD) per pair (``pair_statistic``).

The table (``reference_table``) shows the mean over pairs (``np.nanmean``) of the per-pair medians
and of the per-pair MADs, "median +- MAD", per cartilage, by the KL grade of that visit in the
reference's strata KLG01 (grades 0 and 1), KLG2, KLG3, KLG4, and over all pairs (a pair without
a grade counts only in ``all``, as in the reference). Added (not in the reference): a
95 % interval of the ``all`` cells by resampling subjects, and paired comparisons of methods on
the same knee-visits (``paired_difference``), also resampling subjects — no knee-visit-level
test anywhere (a subject's knees and visits are not independent).

The resize is skimage's ``transform.resize`` with its defaults for float images, rewritten on
scipy (a base dependency) so the service install does not need scikit-image: when any side
shrinks, a Gaussian pre-filter with sigma = max(0, (factor - 1) / 2) per axis, then first-order
spline interpolation by ``scipy.ndimage.zoom(..., grid_mode=True)``, both with ndimage's
``mirror`` boundary (skimage's ``reflect``), then the output clipped to the input's range; float32
in, float32 out, as skimage. ``tests/test_evaluation_reference_stats.py`` checks it against
scikit-image itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mris.constants import CARTILAGES

REFERENCE_SIZE = (256, 256)
KLG_STRATA: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("KLG01", (0, 1)),
    ("KLG2", (2,)),
    ("KLG3", (3,)),
    ("KLG4", (4,)),
)
STRATA = tuple(name for name, _ in KLG_STRATA) + ("all",)


# ------------------------------------------------------------------------------------ resize
def skimage_resize(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``skimage.transform.resize(image, shape)`` with its defaults (order 1, mode 'reflect',
    anti-aliasing when shrinking, clip) for a 2-D float image without NaN."""
    from scipy import ndimage

    array = np.asarray(image)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected a 2-D float image, got {array.dtype} {array.shape}")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    output = (int(shape[0]), int(shape[1]))
    factors = np.divide(array.shape, output)
    filtered = array
    if any(o < i for o, i in zip(output, array.shape)):
        filtered = ndimage.gaussian_filter(
            array, np.maximum(0, (factors - 1) / 2), cval=0, mode="mirror"
        )
    out = ndimage.zoom(
        filtered, [1 / f for f in factors], order=1, mode="mirror", cval=0, grid_mode=True
    )
    np.clip(out, np.min(array), np.max(array), out=out)
    return out


def resize_ignore_nan(image: np.ndarray, shape: Sequence[int] = REFERENCE_SIZE) -> np.ndarray:
    """The reference's ``resize_image(img, shape, ignore_nan=True)``: (H, W) mm, NaN outside
    cartilage -> ``shape``, NaN where the resized NaN mask exceeds 0.5. The input is not changed."""
    array = np.asarray(image)
    missing = np.isnan(array)
    mask = np.zeros_like(array)
    mask[missing] = 1
    mask = skimage_resize(mask, shape)
    filled = np.where(missing, array.dtype.type(0), array)
    resized = skimage_resize(filled, shape)
    return np.where(mask > 0.5, np.nan, resized).astype(resized.dtype, copy=False)


def pair_statistic(predicted_resized: np.ndarray, true_resized: np.ndarray) -> tuple[float, float]:
    """(median, MAD) in mm of |predicted - true| over the pixels finite in both (maps already
    resized by ``resize_ignore_nan``); NaNs when no pixel is. The same numbers as the reference's
    ``np.nanmedian`` and ``median_abs_deviation(..., nan_policy='omit')`` (median of the absolute
    deviations from the median, scale 1) on the finite pixels, without scipy's slower NaN path."""
    error = np.abs(
        np.asarray(predicted_resized, np.float64) - np.asarray(true_resized, np.float64)
    ).ravel()
    error = error[np.isfinite(error)]
    if error.size == 0:
        return float("nan"), float("nan")
    median = np.median(error)
    return float(median), float(np.median(np.abs(error - median)))


# ------------------------------------------------------------------------------ per pair
@dataclass
class ReferenceErrors:
    """Per test knee-visit pair and method: the reference's (median, MAD) per cartilage."""

    size: tuple[int, int] = REFERENCE_SIZE
    pair_ids: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    klg: list[int | None] = field(default_factory=list)
    median: dict[str, dict[str, list[float]]] = field(
        default_factory=dict
    )  # method -> fc/tc -> [N]
    mad: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(
        self, rows: Sequence[Any], truth: dict[str, np.ndarray], answers: dict[str, Any]
    ) -> None:
        """One batch: ``rows`` (manifest rows), ``truth`` fc/tc [B, H, W] and every method's
        answer (indexable by "fc"/"tc" -> [B, H, W]). The true maps are resized once."""
        for row in rows:
            self.pair_ids.append(row.pair_id)
            self.subjects.append(row.subject_id)
            self.klg.append(row.klg)
        for name in CARTILAGES:
            true_resized = [resize_ignore_nan(t, self.size) for t in truth[name]]
            for method, answer in answers.items():
                medians = self.median.setdefault(method, {"fc": [], "tc": []})[name]
                mads = self.mad.setdefault(method, {"fc": [], "tc": []})[name]
                for predicted, true in zip(answer[name], true_resized):
                    median, mad = pair_statistic(resize_ignore_nan(predicted, self.size), true)
                    medians.append(median)
                    mads.append(mad)


def stratum_positions(klg: Sequence[int | None]) -> dict[str, np.ndarray]:
    """Stratum name -> bool [N] (``STRATA``; ungraded pairs only in ``all``)."""
    grades = np.array([-1 if g is None else int(g) for g in klg])
    out = {name: np.isin(grades, members) for name, members in KLG_STRATA}
    out["all"] = np.ones(grades.size, bool)
    return out


def _nanmean(values: np.ndarray) -> float:
    if not np.isfinite(values).any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


# ---------------------------------------------------------------------------------- table
PAIRED = (("mris-s", "unet"), ("mris-s", "mris-c"), ("mris-s", "pix2pix"))


def reference_table(
    errors: ReferenceErrors,
    resamples: int,
    seed: int,
    comparisons: Sequence[tuple[str, str]] = PAIRED,
) -> dict[str, Any]:
    """The main Table 2 (module docstring) for every method in ``errors``, with subject-bootstrap
    intervals of the ``all`` cells and the paired comparisons of ``comparisons`` present."""
    from mris.evaluation.metrics import bootstrap_ci

    strata = stratum_positions(errors.klg)
    table: dict[str, Any] = {
        "pairs": len(errors.pair_ids),
        "size": list(errors.size),
        "strata": list(STRATA),
        "methods": {},
    }
    for method in errors.median:
        entry: dict[str, Any] = {}
        for name in CARTILAGES:
            medians = np.asarray(errors.median[method][name], np.float64)
            mads = np.asarray(errors.mad[method][name], np.float64)
            cells = {
                stratum: {
                    "median": _nanmean(medians[where]),
                    "mad": _nanmean(mads[where]),
                    "n": int(np.isfinite(medians[where]).sum()),
                }
                for stratum, where in strata.items()
            }
            cells["all"]["median_ci95"] = list(
                bootstrap_ci(lambda p, v=medians: _nanmean(v[p]), errors.subjects, resamples, seed)
            )
            cells["all"]["mad_ci95"] = list(
                bootstrap_ci(lambda p, v=mads: _nanmean(v[p]), errors.subjects, resamples, seed)
            )
            entry[name] = cells
        table["methods"][method] = entry
    table["paired"] = {}
    for first, second in comparisons:
        if first in errors.median and second in errors.median:
            table["paired"][f"{first} vs {second}"] = {
                "first": first,
                "second": second,
                "statistic": "per-pair median absolute error (mm)",
                **{
                    name: paired_difference(
                        errors.median[first][name],
                        errors.median[second][name],
                        errors.subjects,
                        resamples,
                        seed,
                    )
                    for name in CARTILAGES
                },
            }
    return table


def paired_difference(
    first: Sequence[float],
    second: Sequence[float],
    subjects: Sequence[str],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Per-pair values of two methods on the same knee-visits (lower = better): the mean and
    median of ``first - second`` over the pairs both have, the share of pairs where ``first`` is
    lower, and 95 % intervals of the mean difference and of that share from resampling SUBJECTS."""
    from mris.evaluation.metrics import bootstrap_ci

    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return {"n": 0, "subjects": 0}
    difference = a[ok] - b[ok]
    groups = np.asarray(subjects)[ok]
    return {
        "n": int(ok.sum()),
        "subjects": int(np.unique(groups).size),
        "mean_difference_mm": float(difference.mean()),
        "mean_difference_ci95": list(
            bootstrap_ci(lambda p: float(difference[p].mean()), groups, resamples, seed)
        ),
        "median_difference_mm": float(np.median(difference)),
        "first_better_share": float(np.mean(difference < 0)),
        "first_better_share_ci95": list(
            bootstrap_ci(lambda p: float(np.mean(difference[p] < 0)), groups, resamples, seed)
        ),
    }
