"""The paper's three tables from per-knee results (numbers only; ``report`` writes them).

- ``retrieval_row`` (Table 1): recall@1/5/10/20 of a radiograph encoder against its thickness
  encoder on the TEST split's first visits (one query per knee; the gallery is those knees'
  maps, so chance is k / gallery), with the ratio to chance and 95 % bootstrap intervals over
  subjects (queries resampled by subject, the gallery fixed); ``mris train`` writes the same row
  for its held-out validation knees into the model card.
- Table 2, main: ``reference_stats.reference_table`` (the reference's per-pair median and MAD of
  the pixel errors at 256 x 256, by KL stratum).
- ``error_table`` (Table 2, second: per-pair MAE): per test knee-visit pair and method, the MAE
  (mm) of the fc and tc map over the cartilage both maps cover, and the coverage; median and MAD
  over pairs by KL grade 0-4 and overall, a bootstrap interval of the overall median, and paired
  comparisons (MRIS-S against the U-Net, MRIS-C and pix2pix, on the same knee-visits): the mean
  paired difference and the share of knee-visits where MRIS-S is closer, each with a 95 %
  interval from resampling SUBJECTS (a subject's knee-visits are not independent, so no
  knee-visit-level test).
- Table 3 lives in ``mris.evaluation.downstream`` (it uses ``merge_klg``, ``KLG_CLASSES`` and
  ``first_visit_positions`` from here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mris.constants import CARTILAGES
from mris.evaluation import metrics
from mris.evaluation.reference_stats import PAIRED, paired_difference
from mris.manifest import ManifestRow

KL_GRADES = (0, 1, 2, 3, 4)
KLG_CLASSES = ("KL0-1", "KL2", "KL3", "KL4")
RETRIEVAL_CURVE_K = 50


def first_visit_positions(rows: Sequence[ManifestRow]) -> list[int]:
    """Positions of each knee's first (earliest) visit, in row order (the training's rule,
    ``mris.training.sampler.first_visits``, which imports no torch)."""
    from mris.training.sampler import first_visits

    return sorted(first_visits([row.knee_id for row in rows], [row.visit_month for row in rows]))


def merge_klg(klg: int) -> int:
    """KL 0 and 1 -> class 0, 2 -> 1, 3 -> 2, 4 -> 3 (the paper's 4 classes)."""
    return max(0, int(klg) - 1)


# ---------------------------------------------------------------------------------- Table 1
def retrieval_row(
    queries: np.ndarray, keys: np.ndarray, subjects: Sequence[str], resamples: int, seed: int
) -> dict[str, Any]:
    """Recall@k with intervals for query embeddings [Q, D] whose true keys are ``keys`` [Q, D]
    (same order; the gallery is all of ``keys``)."""
    ranks = metrics.retrieval_ranks(queries @ keys.T)
    gallery = keys.shape[0]
    row: dict[str, Any] = {
        "queries": int(ranks.size),
        "gallery": int(gallery),
        "recall": {},
        "ci95": {},
        "chance": {},
        "ratio_to_chance": {},
        "ratio_ci95": {},
    }
    for k in metrics.RECALL_AT:
        hits = (ranks < k).astype(np.float64)
        row["recall"][f"R@{k}"] = float(hits.mean())
        row["ci95"][f"R@{k}"] = list(
            metrics.bootstrap_ci(
                lambda p, hits=hits: float(hits[p].mean()), subjects, resamples, seed
            )
        )
        chance = min(1.0, k / gallery)
        row["chance"][f"R@{k}"] = chance
        row["ratio_to_chance"][f"R@{k}"] = row["recall"][f"R@{k}"] / chance
        row["ratio_ci95"][f"R@{k}"] = [v / chance for v in row["ci95"][f"R@{k}"]]
    row["curve"] = metrics.recall_curve(ranks, min(RETRIEVAL_CURVE_K, gallery)).tolist()
    row["median_rank"] = float(np.median(ranks) + 1)
    return row


# ---------------------------------------------------------------------------------- Table 2
@dataclass
class KneeErrors:
    """Per test knee-visit pair: the errors of every method (mm) and coverages."""

    pair_ids: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    klg: list[int | None] = field(default_factory=list)
    mae: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> fc/tc -> [N]
    coverage: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add_rows(self, rows: Sequence[ManifestRow]) -> None:
        for row in rows:
            self.pair_ids.append(row.pair_id)
            self.subjects.append(row.subject_id)
            self.klg.append(row.klg)

    def add(self, method: str, name: str, predicted: np.ndarray, truth: np.ndarray) -> None:
        for predicted_map, true_map in zip(predicted, truth):
            mae, coverage = metrics.map_error(predicted_map, true_map)
            self.mae.setdefault(method, {"fc": [], "tc": []})[name].append(mae)
            self.coverage.setdefault(method, {"fc": [], "tc": []})[name].append(coverage)


def error_table(errors: KneeErrors, resamples: int, seed: int) -> dict[str, Any]:
    klg = np.array([-1 if g is None else g for g in errors.klg])
    table: dict[str, Any] = {"knees": len(errors.pair_ids), "methods": {}}
    for method, by_map in errors.mae.items():
        entry: dict[str, Any] = {}
        for name, values in by_map.items():
            values = np.asarray(values, np.float64)
            per_grade = {}
            for grade in KL_GRADES:
                median, mad, n = metrics.median_mad(values[klg == grade])
                per_grade[str(grade)] = {"median": median, "mad": mad, "n": n}
            median, mad, n = metrics.median_mad(values)
            ci = metrics.bootstrap_ci(
                lambda p, v=values: metrics.median_mad(v[p])[0], errors.subjects, resamples, seed
            )
            entry[name] = {
                "by_klg": per_grade,
                "all": {"median": median, "mad": mad, "n": n, "median_ci95": list(ci)},
                "mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
                "coverage_mean": float(np.nanmean(errors.coverage[method][name])),
            }
        table["methods"][method] = entry
    table["paired"] = {
        f"{first} vs {second}": comparison
        for first, second in PAIRED_COMPARISONS
        if (comparison := paired_comparison(errors, first, second, resamples, seed)) is not None
    }
    return table


PAIRED_COMPARISONS = PAIRED  # MRIS-S against the U-Net, MRIS-C and pix2pix, when they ran


def paired_comparison(
    errors: KneeErrors, first: str, second: str, resamples: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """``first`` against ``second`` on the knee-visits both have an MAE for, per map
    (``reference_stats.paired_difference``: first - second in mm, negative = first closer, with
    subject-bootstrap intervals)."""
    if first not in errors.mae or second not in errors.mae:
        return None
    return {
        "first": first,
        "second": second,
        "statistic": "per-pair MAE (mm)",
        **{
            name: paired_difference(
                errors.mae[first][name], errors.mae[second][name], errors.subjects, resamples, seed
            )
            for name in CARTILAGES
        },
    }
