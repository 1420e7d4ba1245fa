"""Calibrated per-pixel intervals for synthesized maps (split conformal prediction).

The synthesis (eq. 4) gives per pixel a mean ``m`` and the neighbours' weighted standard
deviation ``s`` (``mris.synthesis``). The raw ``s`` has no stated meaning: nothing says the true
thickness lies within ``m +- 2 s`` 95 % of the time. A calibration turns it into an interval
with a stated coverage:

    score   r = |y - m| / (s + s0)                 on held-out knees whose truth y is known
    q       = the ceil((n + 1) * coverage)-th smallest of the n scores (split conformal)
    interval [max(0, m - q (s + s0)), m + q (s + s0)]

``s0`` (``SD_FLOOR_MM``) keeps an interval open where every neighbour agrees (s = 0). The
quantile is fitted per cartilage and per group of knees (Mondrian conformal prediction): the
group is the neighbours' weighted KL grade rounded (what retrieval itself says of the knee's
OA, known at serving time, no truth needed); a group with fewer than ``MIN_GROUP_KNEES``
calibration knees uses the cartilage's pooled quantile.

What it promises: for a new knee from the population the calibration knees came from, a
cartilage pixel's true thickness lies within the interval with probability ``coverage``
(marginally over knees and pixels; pixels of one knee are not independent, so one knee's own
share can be far from it). What it does not: coverage under a population shift (another
scanner, another cohort, another segmentation) - recalibrate on held-out knees of that
population.

Scores are pixel-level and knees are the exchangeable units: ``fit`` therefore also reports
the coverage it achieved on a subject-disjoint held-out part of the calibration knees
(``HOLDOUT_FRACTION``), then refits on all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import CARTILAGES
from mris.errors import BundleInvalid

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 1
DEFAULT_COVERAGE = 0.9
SD_FLOOR_MM = 0.05
MIN_GROUP_KNEES = 20
HOLDOUT_FRACTION = 0.25
POOLED = "all"
METHOD = (
    "split conformal prediction on the per-pixel normalised error |y - m| / (s + {floor} mm), "
    "one quantile per cartilage and per group of the neighbours' weighted KL grade (Mondrian), "
    "the pooled quantile for groups with fewer than {min_group} calibration knees"
)


def knee_group(neighbour_klg: Sequence[float | None], weights: Sequence[float]) -> str:
    """The knee's calibration group: ``klg<g>`` with g the neighbours' weighted KL grade
    rounded, or ``all`` when no neighbour has a grade."""
    pairs = [
        (float(k), float(w))
        for k, w in zip(neighbour_klg, weights)
        if k is not None and not (isinstance(k, float) and math.isnan(k))
    ]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return POOLED
    return f"klg{int(round(sum(k * w for k, w in pairs) / total))}"


def neighbours_group(knee, rows: Sequence) -> str:
    """The group of a ``mris.pipeline.KneeMaps``: its neighbours' KL grades (``rows[row].klg``,
    e.g. an index bundle's ``RowsTable``) weighted by eq. 4's weights, over every region (each
    region's weights count equally)."""
    grades: list[float | None] = []
    weights: list[float] = []
    for region, hits in knee.neighbours.items():
        for row, weight in zip(hits.rows, knee.weights[region]):
            grades.append(rows[int(row)].klg)
            weights.append(float(weight))
    return knee_group(grades, weights)


@dataclass
class KneeSample:
    """One held-out knee: per cartilage its true map, synthesized mean and SD (mm, NaN outside),
    its group (``knee_group``) and subject (for subject-disjoint splits and bootstraps)."""

    subject: str
    group: str
    truth: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]


def scores(sample: KneeSample, cartilage: str, sd_floor: float = SD_FLOOR_MM) -> np.ndarray:
    """The normalised errors of a knee's pixels where both truth and synthesis have cartilage."""
    truth = np.asarray(sample.truth[cartilage], np.float64)
    mean = np.asarray(sample.mean[cartilage], np.float64)
    sd = np.asarray(sample.sd[cartilage], np.float64)
    both = np.isfinite(truth) & np.isfinite(mean) & np.isfinite(sd)
    return np.abs(truth[both] - mean[both]) / (sd[both] + sd_floor)


def conformal_quantile(values: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile: the ceil((n + 1) coverage)-th smallest of n scores (inf
    when n is too small for the coverage)."""
    values = np.sort(np.asarray(values, np.float64))
    n = values.size
    rank = math.ceil((n + 1) * coverage)
    return float(values[rank - 1]) if 0 < rank <= n else float("inf")


@dataclass
class Calibration:
    """A fitted calibration (``calibration.json`` in an index bundle)."""

    coverage: float
    sd_floor_mm: float
    quantiles: dict[str, dict[str, float]]  # cartilage -> group -> q
    method: str
    data: dict[str, Any] = field(default_factory=dict)  # what it was fitted on
    achieved: dict[str, Any] = field(default_factory=dict)  # coverage on held-out knees
    format: int = CALIBRATION_FORMAT

    def quantile(self, cartilage: str, group: str) -> float:
        per_group = self.quantiles[cartilage]
        return per_group.get(group, per_group[POOLED])

    def interval(
        self, cartilage: str, mean: np.ndarray, sd: np.ndarray, group: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) float32 maps in mm, NaN where ``mean`` is; lower is at least 0."""
        half = self.quantile(cartilage, group) * (np.asarray(sd, np.float32) + self.sd_floor_mm)
        mean = np.asarray(mean, np.float32)
        lower = np.maximum(mean - half, np.float32(0)).astype(np.float32)
        lower[np.isnan(mean)] = np.nan
        return lower, (mean + half).astype(np.float32)

    def intervals(
        self, means: dict[str, np.ndarray], sds: dict[str, np.ndarray], group: str
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per cartilage of ``means``: (lower maps, upper maps)."""
        lower, upper = {}, {}
        for name in means:
            lower[name], upper[name] = self.interval(name, means[name], sds[name], group)
        return lower, upper

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            record = json.loads(text)
            calibration = cls(**record)
        except (TypeError, ValueError) as exc:
            raise BundleInvalid(f"not a calibration file: {exc}") from None
        if calibration.format != CALIBRATION_FORMAT:
            raise BundleInvalid(f"calibration format {calibration.format} is not supported")
        missing = [c for c in CARTILAGES if POOLED not in calibration.quantiles.get(c, {})]
        if missing or not 0 < calibration.coverage < 1:
            raise BundleInvalid("calibration file lacks quantiles or a coverage in (0, 1)")
        return calibration

    @classmethod
    def read(cls, path: str | Path) -> Calibration:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def summary(self) -> dict[str, Any]:
        """What an index card says of it."""
        return {
            "file": CALIBRATION_FILE,
            "coverage": self.coverage,
            "method": self.method,
            "data": self.data,
            "achieved": self.achieved,
        }


def _quantiles(
    samples: Sequence[KneeSample], coverage: float, sd_floor: float, min_group: int
) -> dict[str, dict[str, float]]:
    quantiles: dict[str, dict[str, float]] = {}
    for cartilage in CARTILAGES:
        pooled = [scores(s, cartilage, sd_floor) for s in samples]
        per_group: dict[str, float] = {
            POOLED: conformal_quantile(np.concatenate(pooled) if pooled else np.empty(0), coverage)
        }
        groups = sorted({s.group for s in samples} - {POOLED})
        for group in groups:
            members = [p for p, s in zip(pooled, samples) if s.group == group]
            if len(members) >= min_group:
                per_group[group] = conformal_quantile(np.concatenate(members), coverage)
        quantiles[cartilage] = per_group
    return quantiles


def coverage_counts(
    calibration: Calibration, sample: KneeSample, cartilage: str
) -> tuple[int, int]:
    """(pixels whose truth lies in the interval, pixels with truth and synthesis) of a knee."""
    lower, upper = calibration.interval(
        cartilage, sample.mean[cartilage], sample.sd[cartilage], sample.group
    )
    truth = np.asarray(sample.truth[cartilage], np.float32)
    both = np.isfinite(truth) & np.isfinite(lower)
    inside = (truth >= lower) & (truth <= upper) & both
    return int(inside.sum()), int(both.sum())


def achieved_coverage(
    calibration: Calibration, samples: Iterable[KneeSample]
) -> dict[str, dict[str, Any]]:
    """Share of pixels inside the intervals, per cartilage, overall and per group."""
    result: dict[str, dict[str, Any]] = {}
    samples = list(samples)
    for cartilage in CARTILAGES:
        tallies: dict[str, list[int]] = {}
        for sample in samples:
            inside, total = coverage_counts(calibration, sample, cartilage)
            for key in (POOLED, sample.group):
                tally = tallies.setdefault(key, [0, 0, 0])
                tally[0] += inside
                tally[1] += total
                tally[2] += 1
        result[cartilage] = {
            key: {"coverage": inside / total if total else float("nan"), "knees": knees}
            for key, (inside, total, knees) in sorted(tallies.items())
        }
    return result


def fit(
    samples: Sequence[KneeSample],
    coverage: float = DEFAULT_COVERAGE,
    *,
    sd_floor: float = SD_FLOOR_MM,
    min_group: int = MIN_GROUP_KNEES,
    holdout_fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
    data: dict[str, Any] | None = None,
) -> Calibration:
    """Fit on ``samples``: first on a subject-disjoint part to measure the coverage achieved on
    the rest (``achieved``), then on all of them (the quantiles kept)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    if not samples:
        raise ValueError("no calibration knees")
    method = METHOD.format(floor=sd_floor, min_group=min_group)
    subjects = sorted({s.subject for s in samples})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(subjects)[: max(1, round(holdout_fraction * len(subjects)))])
    fit_part = [s for s in samples if s.subject not in held]
    check_part = [s for s in samples if s.subject in held]
    achieved: dict[str, Any] = {}
    if fit_part and check_part:
        trial = Calibration(
            coverage, sd_floor, _quantiles(fit_part, coverage, sd_floor, min_group), method
        )
        achieved = {
            "held_out_knees": len(check_part),
            "fitted_on_knees": len(fit_part),
            "by_cartilage": achieved_coverage(trial, check_part),
        }
    return Calibration(
        coverage=coverage,
        sd_floor_mm=sd_floor,
        quantiles=_quantiles(samples, coverage, sd_floor, min_group),
        method=method,
        data={**(data or {}), "knees": len(samples), "subjects": len(subjects)},
        achieved=achieved,
    )


__all__ = [
    "CALIBRATION_FILE",
    "Calibration",
    "DEFAULT_COVERAGE",
    "KneeSample",
    "POOLED",
    "SD_FLOOR_MM",
    "achieved_coverage",
    "conformal_quantile",
    "coverage_counts",
    "fit",
    "knee_group",
    "neighbours_group",
    "scores",
]
