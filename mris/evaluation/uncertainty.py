"""What the neighbours' spread means, measured on the test split (issue 19).

MRIS returns per pixel the neighbours' weighted standard deviation ``s`` beside the synthesized
thickness ``m`` (eq. 4); a calibrated index bundle turns it into an interval with a stated
coverage (``mris.calibration``). This module measures both against the true maps ``y``, on the
pixels where the true and the synthesized map both have cartilage, for the maps as the SERVICE
makes them (``mris.synthesis.DEFAULT_NAN_RULE``; ``MethodMaps.served``), whatever NaN rule the
tables use:

- **SD coverage** (every method with a spread: MRIS-S, MRIS-C): the share of pixels with
  ``|y - m| <= s`` and ``<= 2 s``. A spread that were the SD of Gaussian errors would give
  68.3 % and 95.4 %; lower means over-confident.
- **Reliability diagram**: the pixels in fixed bins of the predicted SD (``SD_BIN_EDGES_MM``);
  per bin the RMS of the predicted SD against the RMS of the observed error, and the pixel
  count. A calibrated SD lies on the identity (RMS error = RMS SD, with no Gaussian
  assumption); above it the SD is too small.
- **Spearman** rank correlation (``scipy.stats.spearmanr``) between a knee-visit's mean SD and
  its MAE over the same pixels: does a wider spread flag a worse knee?
- **Calibrated intervals** (MRIS-S, the served variant): the coverage the intervals reach,
  against the issue's goals: within ``GOAL_OVERALL`` of the stated coverage overall and within
  ``GOAL_PER_GRADE`` in every KL grade (a grade with fewer than ``MIN_GRADE_KNEES`` test
  knee-visits is reported, not judged), and their mean width. The calibration is the served
  index bundle's when it has one, else one fitted here by ``mris.calibration.fit`` on the
  ``downstream`` split (held out from the encoders and the database), on knees made as
  ``mris index calibrate`` makes them.

Everything is by the knee-visit's TRUE KL grade (the manifest's) and overall; every interval is
a 95 % percentile interval over resamples of SUBJECTS (``metrics.subject_resamples``), the
pooled statistics recomputed on each resample (coverage = inside pixels / pixels over the drawn
knees).

Memory: per test knee-visit and cartilage a few counts and per-bin sums (``SpreadCounts``,
``IntervalCounts``); no pixel of the test split is kept. A calibration fitted here holds the
downstream knees' scoring pixels (truth, mean and SD where all three are finite, float32: 12
bytes per cartilage pixel) until it is fitted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from mris.calibration import (
    DEFAULT_COVERAGE,
    Calibration,
    KneeSample,
    coverage_counts,
    fit,
)
from mris.constants import CARTILAGES
from mris.evaluation import metrics
from mris.evaluation.tables import KL_GRADES
from mris.manifest import ManifestRow

# Bin edges of the predicted SD in mm; the last bin is open ([1.0, inf)). Chosen from the demo
# cohort's test pixels (SD 5th-95th percentile 0.14-0.52 mm), fixed so reports compare.
SD_BIN_EDGES_MM = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
SPREAD_METHODS = ("mris-c", "mris-s")
INTERVAL_METHOD = "mris-s"
# P(|z| <= 1) and P(|z| <= 2) for a standard normal z: 68.3 % and 95.4 %
GAUSSIAN_WITHIN = {"within_1sd": math.erf(1 / math.sqrt(2)), "within_2sd": math.erf(math.sqrt(2))}
GOAL_OVERALL = 0.02  # the issue: within 2 points of the stated coverage overall
GOAL_PER_GRADE = 0.05  # ... and within 5 points in every KL grade
MIN_GRADE_KNEES = 10  # fewer test knee-visits in a grade: reported, too few to judge
SERVED = "the served bundle's calibration"
FITTED = "fitted here on the downstream split"
PASS, FAIL, TOO_FEW = "PASS", "FAIL", "too few knees"


# ------------------------------------------------------------------------------ per-knee counts
@dataclass
class SpreadCounts:
    """Per knee-visit sums over its pixels where truth, mean and SD are all finite: int64 / float64
    [N], and per SD bin [N, bins] (mm, mm^2)."""

    pixels: np.ndarray
    within_1sd: np.ndarray
    within_2sd: np.ndarray
    sd_sum: np.ndarray
    abs_error_sum: np.ndarray
    bin_pixels: np.ndarray
    bin_sd_squared_sum: np.ndarray
    bin_error_squared_sum: np.ndarray

    @classmethod
    def of(
        cls,
        truth: np.ndarray,
        mean: np.ndarray,
        sd: np.ndarray,
        edges: Sequence[float] = SD_BIN_EDGES_MM,
    ) -> SpreadCounts:
        """From maps [N, H, W] in mm (NaN outside cartilage)."""
        truth = np.asarray(truth, np.float64)
        mean = np.asarray(mean, np.float64)
        sd = np.asarray(sd, np.float64)
        count = truth.shape[0]
        both = np.isfinite(truth) & np.isfinite(mean) & np.isfinite(sd)
        error = np.where(both, np.abs(truth - mean), 0.0)
        spread = np.where(both, sd, 0.0)
        axes = tuple(range(1, truth.ndim))
        bins = len(edges)
        # bin b holds edges[b] <= s < edges[b + 1] (the last bin is open above)
        which = np.digitize(spread, np.asarray(edges[1:], np.float64))
        knee = np.broadcast_to(np.arange(count).reshape((-1,) + (1,) * len(axes)), truth.shape)
        flat = (knee * bins + which)[both]

        def per_bin(weights: np.ndarray | None) -> np.ndarray:
            summed = np.bincount(flat, weights=weights, minlength=count * bins)
            return summed.reshape(count, bins)

        return cls(
            pixels=both.sum(axis=axes).astype(np.int64),
            within_1sd=(both & (error <= spread)).sum(axis=axes).astype(np.int64),
            within_2sd=(both & (error <= 2 * spread)).sum(axis=axes).astype(np.int64),
            sd_sum=spread.sum(axis=axes),
            abs_error_sum=error.sum(axis=axes),
            bin_pixels=per_bin(None).astype(np.int64),
            bin_sd_squared_sum=per_bin((spread**2)[both]),
            bin_error_squared_sum=per_bin((error**2)[both]),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[SpreadCounts]) -> SpreadCounts:
        return cls(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)}
        )


@dataclass
class IntervalCounts:
    """Per knee-visit [N]: pixels inside the calibrated interval and pixels with truth and
    synthesis (``mris.calibration.coverage_counts``), and the summed width (mm) over the
    synthesized cartilage with the number of those pixels."""

    inside: np.ndarray
    pixels: np.ndarray
    width_sum: np.ndarray
    width_pixels: np.ndarray

    @classmethod
    def of(
        cls,
        calibration: Calibration,
        cartilage: str,
        truth: np.ndarray,
        mean: np.ndarray,
        sd: np.ndarray,
        groups: Sequence[str],
    ) -> IntervalCounts:
        """From maps [N, H, W] in mm and each knee's calibration group."""
        inside, pixels, width, shown = [], [], [], []
        for i, group in enumerate(groups):
            sample = KneeSample(
                "", group, {cartilage: truth[i]}, {cartilage: mean[i]}, {cartilage: sd[i]}
            )
            knee_inside, knee_pixels = coverage_counts(calibration, sample, cartilage)
            lower, upper = calibration.interval(cartilage, mean[i], sd[i], group)
            finite = np.isfinite(lower) & np.isfinite(upper)
            inside.append(knee_inside)
            pixels.append(knee_pixels)
            width.append(float((upper[finite] - lower[finite]).astype(np.float64).sum()))
            shown.append(int(finite.sum()))
        return cls(
            np.asarray(inside, np.int64),
            np.asarray(pixels, np.int64),
            np.asarray(width, np.float64),
            np.asarray(shown, np.int64),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[IntervalCounts]) -> IntervalCounts:
        return cls(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)}
        )


def scoring_sample(
    subject: str,
    group: str,
    truth: dict[str, np.ndarray],
    mean: dict[str, np.ndarray],
    sd: dict[str, np.ndarray],
) -> KneeSample:
    """A ``KneeSample`` holding only the pixels ``mris.calibration`` scores (truth, mean and SD
    all finite) as float32 vectors: its scores, quantiles and coverage counts equal those of the
    whole maps, in a fraction of the memory."""
    kept: tuple[dict[str, np.ndarray], ...] = ({}, {}, {})  # truth, mean, sd
    for cartilage in CARTILAGES:
        maps = [np.asarray(a[cartilage], np.float32) for a in (truth, mean, sd)]
        scored = np.isfinite(maps[0]) & np.isfinite(maps[1]) & np.isfinite(maps[2])
        for into, values in zip(kept, maps):
            into[cartilage] = values[scored]
    return KneeSample(subject, group, *kept)


# ------------------------------------------------------------------------------------ the tally
@dataclass
class UncertaintyTally:
    """Filled batch by batch by ``run.run_methods``: the test knee-visits' subjects and true KL
    grades, per spread method and cartilage their ``SpreadCounts``, MRIS-S's ``IntervalCounts``
    once a calibration is known, and the downstream knees a calibration is fitted on."""

    methods: list[str]  # the methods with a spread, in the table order
    calibration: Calibration | None = None
    calibration_source: str | None = None  # SERVED or FITTED
    subjects: list[str] = field(default_factory=list)
    klg: list[int | None] = field(default_factory=list)
    spread: dict[str, dict[str, list[SpreadCounts]]] = field(default_factory=dict)
    intervals: dict[str, list[IntervalCounts]] = field(default_factory=dict)
    calibration_knees: list[KneeSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why no calibrated interval was measured

    @classmethod
    def start(cls, methods: Sequence[str], served: Calibration | None) -> UncertaintyTally:
        """For the evaluated ``methods``; ``served``: the MRIS-S index bundle's calibration."""
        tally = cls(methods=[m for m in methods if m in SPREAD_METHODS])
        if INTERVAL_METHOD not in methods:
            tally.skipped = "MRIS-S was not evaluated"
        elif served is not None:
            tally.calibration, tally.calibration_source = served, SERVED
        return tally

    @property
    def wants_calibration_knees(self) -> bool:
        return self.calibration is None and self.skipped is None

    def add_calibration_knees(
        self, rows: Sequence[ManifestRow], truth: dict[str, np.ndarray], answer
    ) -> None:
        """A downstream batch: MRIS-S's answer (``MethodMaps``, its ``served`` maps) per knee."""
        served = answer.served
        for i, row in enumerate(rows):
            self.calibration_knees.append(
                scoring_sample(
                    row.subject_id,
                    served.groups[i],
                    {c: truth[c][i] for c in CARTILAGES},
                    {c: served[c][i] for c in CARTILAGES},
                    {c: served.std[c][i] for c in CARTILAGES},
                )
            )

    def fit_calibration(
        self, coverage: float = DEFAULT_COVERAGE, seed: int = 0, data: dict | None = None
    ) -> None:
        """Fit on the downstream knees gathered (then dropped) when the served bundle has no
        calibration; without any such knee, say why none is measured."""
        if not self.wants_calibration_knees:
            return
        if not self.calibration_knees:
            self.skipped = (
                "the served bundle has no calibration and no downstream knee could be read to "
                "fit one on"
            )
            return
        self.calibration = fit(self.calibration_knees, coverage, seed=seed, data=data)
        self.calibration_source = FITTED
        self.calibration_knees = []

    def add_test(
        self, rows: Sequence[ManifestRow], truth: dict[str, np.ndarray], answers: dict
    ) -> None:
        """A test batch: every spread method's ``MethodMaps`` (its ``served`` maps)."""
        self.subjects.extend(row.subject_id for row in rows)
        self.klg.extend(row.klg for row in rows)
        for method in self.methods:
            served = answers[method].served
            for cartilage in CARTILAGES:
                self.spread.setdefault(method, {}).setdefault(cartilage, []).append(
                    SpreadCounts.of(truth[cartilage], served[cartilage], served.std[cartilage])
                )
                if method == INTERVAL_METHOD and self.calibration is not None:
                    self.intervals.setdefault(cartilage, []).append(
                        IntervalCounts.of(
                            self.calibration,
                            cartilage,
                            truth[cartilage],
                            served[cartilage],
                            served.std[cartilage],
                            served.groups,
                        )
                    )


# ------------------------------------------------------------------------------------ the table
def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> Callable[[np.ndarray], float]:
    def statistic(positions: np.ndarray) -> float:
        total = denominator[positions].sum()
        return float(numerator[positions].sum() / total) if total else float("nan")

    return statistic


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if x.size < 3:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, said by the value itself
        return float(spearmanr(x, y).statistic)


def _spearman_statistic(
    sd_mean: np.ndarray, mae: np.ndarray, valid: np.ndarray
) -> Callable[[np.ndarray], float]:
    def statistic(positions: np.ndarray) -> float:
        kept = positions[valid[positions]]
        return _spearman(sd_mean[kept], mae[kept])

    return statistic


def _bootstrap(
    statistics: dict[Any, Callable[[np.ndarray], float]],
    members: np.ndarray,
    subjects: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[Any, list[float]]:
    """95 % intervals of every statistic over the same subject resamples of ``members`` (the
    positions of one stratum's knee-visits); each statistic receives knee-visit positions."""
    values: dict[Any, list[float]] = {key: [] for key in statistics}
    for drawn in metrics.subject_resamples(subjects[members], resamples, seed):
        chosen = members[drawn]
        for key, statistic in statistics.items():
            values[key].append(statistic(chosen))
    return {key: list(metrics.percentile_interval(v)) for key, v in values.items()}


def _strata(klg: Sequence[int | None]) -> dict[str, np.ndarray]:
    """``all`` and each KL grade (the true one) -> positions of the knee-visits."""
    grades = np.array([-1 if g is None else int(g) for g in klg], np.int64)
    strata = {"all": np.arange(grades.size)}
    for grade in KL_GRADES:
        strata[str(grade)] = np.flatnonzero(grades == grade)
    return strata


def _reliability(counts: SpreadCounts, members: np.ndarray) -> list[dict[str, Any]]:
    pixels = counts.bin_pixels[members].sum(axis=0)
    sd_squared = counts.bin_sd_squared_sum[members].sum(axis=0)
    error_squared = counts.bin_error_squared_sum[members].sum(axis=0)
    edges = list(SD_BIN_EDGES_MM) + [None]
    return [
        {
            "sd_from_mm": edges[b],
            "sd_to_mm": edges[b + 1],
            "pixels": int(pixels[b]),
            "sd_rms_mm": math.sqrt(sd_squared[b] / pixels[b]) if pixels[b] else float("nan"),
            "error_rms_mm": math.sqrt(error_squared[b] / pixels[b]) if pixels[b] else float("nan"),
        }
        for b in range(len(SD_BIN_EDGES_MM))
    ]


def _verdict(coverage: float, target: float, knees: int, stratum: str) -> str:
    if stratum != "all" and knees < MIN_GRADE_KNEES:
        return TOO_FEW
    if not math.isfinite(coverage):
        return FAIL
    goal = GOAL_OVERALL if stratum == "all" else GOAL_PER_GRADE
    return PASS if abs(coverage - target) <= goal + 1e-12 else FAIL


def uncertainty_table(tally: UncertaintyTally, resamples: int, seed: int) -> dict[str, Any]:
    """``report.json``'s ``uncertainty``: the spread measures per method and cartilage and the
    calibrated intervals' coverage, by true KL grade and overall, with subject-bootstrap 95 %
    intervals."""
    from mris.synthesis import DEFAULT_NAN_RULE

    subjects = np.asarray(tally.subjects)
    strata = _strata(tally.klg)
    spread = {
        method: {c: SpreadCounts.concatenate(parts) for c, parts in by_cartilage.items()}
        for method, by_cartilage in tally.spread.items()
    }
    intervals = {c: IntervalCounts.concatenate(parts) for c, parts in tally.intervals.items()}

    # every statistic of a stratum on the same resamples of its subjects
    cells: dict[str, dict[Any, list[float]]] = {}
    for stratum, members in strata.items():
        statistics: dict[Any, Callable[[np.ndarray], float]] = {}
        for method, by_cartilage in spread.items():
            for cartilage, counts in by_cartilage.items():
                for key in ("within_1sd", "within_2sd"):
                    statistics[(method, cartilage, key)] = _ratio(
                        getattr(counts, key), counts.pixels
                    )
                valid = counts.pixels > 0
                safe = np.maximum(counts.pixels, 1)
                statistics[(method, cartilage, "rho")] = _spearman_statistic(
                    counts.sd_sum / safe, counts.abs_error_sum / safe, valid
                )
        for cartilage, counts in intervals.items():
            statistics[("intervals", cartilage, "coverage")] = _ratio(counts.inside, counts.pixels)
        cells[stratum] = (
            _bootstrap(statistics, members, subjects, resamples, seed) if members.size else {}
        )

    def knees_of(members: np.ndarray) -> dict[str, int]:
        return {"knees": int(members.size), "subjects": int(np.unique(subjects[members]).size)}

    methods: dict[str, Any] = {}
    for method, by_cartilage in spread.items():
        methods[method] = {}
        for cartilage, counts in by_cartilage.items():
            entry: dict[str, Any] = {"sd_coverage": {}, "spearman_sd_mae": {}, "reliability": {}}
            valid = counts.pixels > 0
            safe = np.maximum(counts.pixels, 1)
            for stratum, members in strata.items():
                pixels = int(counts.pixels[members].sum())
                coverage = {**knees_of(members), "pixels": pixels}
                for key in ("within_1sd", "within_2sd"):
                    coverage[key] = _ratio(getattr(counts, key), counts.pixels)(members)
                    coverage[f"{key}_ci95"] = cells[stratum].get((method, cartilage, key))
                kept = members[valid[members]]
                spearman = {
                    "knees": int(kept.size),
                    "rho": _spearman(
                        (counts.sd_sum / safe)[kept], (counts.abs_error_sum / safe)[kept]
                    ),
                    "rho_ci95": cells[stratum].get((method, cartilage, "rho")),
                }
                reliability = _reliability(counts, members)
                if stratum == "all":
                    entry["sd_coverage"]["all"] = coverage
                    entry["spearman_sd_mae"]["all"] = spearman
                    entry["reliability"]["all"] = reliability
                    entry["mean_sd_mm"] = (
                        float(counts.sd_sum.sum() / pixels) if pixels else float("nan")
                    )
                    entry["mae_mm"] = (
                        float(counts.abs_error_sum.sum() / pixels) if pixels else float("nan")
                    )
                else:
                    entry["sd_coverage"].setdefault("by_klg", {})[stratum] = coverage
                    entry["spearman_sd_mae"].setdefault("by_klg", {})[stratum] = spearman
                    entry["reliability"].setdefault("by_klg", {})[stratum] = reliability
            methods[method][cartilage] = entry

    return {
        "nan_rule": DEFAULT_NAN_RULE,
        "knees": len(tally.subjects),
        "subjects": int(np.unique(subjects).size),
        "sd_bin_edges_mm": list(SD_BIN_EDGES_MM),
        "gaussian_within": GAUSSIAN_WITHIN,
        "methods": methods,
        "intervals": _interval_section(tally, intervals, strata, cells, knees_of),
    }


def _interval_section(
    tally: UncertaintyTally,
    intervals: dict[str, IntervalCounts],
    strata: dict[str, np.ndarray],
    cells: dict[str, dict[Any, list[float]]],
    knees_of: Callable[[np.ndarray], dict[str, int]],
) -> dict[str, Any]:
    from mris.synthesis import DEFAULT_NAN_RULE

    calibration = tally.calibration
    if calibration is None or not intervals:
        return {"skipped": tally.skipped or "no calibrated interval was measured"}
    target = calibration.coverage
    notes = list(tally.notes)
    data = calibration.data or {}
    if data.get("split") == "test":
        notes.append(
            "the calibration was fitted on the test split: this coverage is not measured on "
            "held-out knees"
        )
    if data.get("nan_rule") not in (None, DEFAULT_NAN_RULE):
        notes.append(
            f"the calibration was fitted on maps of the NaN rule {data['nan_rule']!r}; the "
            f"intervals are measured on the service's ({DEFAULT_NAN_RULE!r})"
        )
    section: dict[str, Any] = {
        "method": INTERVAL_METHOD,
        "source": "served" if tally.calibration_source == SERVED else "fitted",
        "source_text": tally.calibration_source,
        "coverage": target,
        "goals": {
            "overall_points": 100 * GOAL_OVERALL,
            "per_grade_points": 100 * GOAL_PER_GRADE,
            "min_grade_knees": MIN_GRADE_KNEES,
        },
        "calibration": {
            **calibration.summary(),
            "sd_floor_mm": calibration.sd_floor_mm,
            "quantiles": calibration.quantiles,
        },
        "notes": notes,
    }
    failed: list[str] = []
    for cartilage, counts in intervals.items():
        entry: dict[str, Any] = {}
        for stratum, members in strata.items():
            coverage = _ratio(counts.inside, counts.pixels)(members)
            width_pixels = int(counts.width_pixels[members].sum())
            cell = {
                **knees_of(members),
                "pixels": int(counts.pixels[members].sum()),
                "coverage": coverage,
                "coverage_ci95": cells[stratum].get(("intervals", cartilage, "coverage")),
                "mean_width_mm": (
                    float(counts.width_sum[members].sum() / width_pixels)
                    if width_pixels
                    else float("nan")
                ),
                "verdict": _verdict(coverage, target, int(members.size), stratum),
            }
            if cell["verdict"] == FAIL:
                where = "overall" if stratum == "all" else f"KL{stratum}"
                failed.append(f"{cartilage} {where}")
            if stratum == "all":
                entry["all"] = cell
            else:
                entry.setdefault("by_klg", {})[stratum] = cell
        section[cartilage] = entry
    section["verdict"] = FAIL if failed else PASS
    section["failed"] = failed
    return section


__all__ = [
    "FITTED",
    "GOAL_OVERALL",
    "GOAL_PER_GRADE",
    "IntervalCounts",
    "MIN_GRADE_KNEES",
    "SD_BIN_EDGES_MM",
    "SERVED",
    "SPREAD_METHODS",
    "SpreadCounts",
    "UncertaintyTally",
    "scoring_sample",
    "uncertainty_table",
]
