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
- ``downstream_table`` (Table 3): per method the classifier of ``classify`` trained on the
  method's ``downstream`` maps and tested on its ``test`` maps: KL grade (0 and 1 merged, 4
  classes) on every knee-visit pair with a grade, accuracy and balanced accuracy; progression on
  each knee's first visit (``progressor`` label), average precision and ROC AUC; bootstrap
  intervals over test subjects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mris.evaluation import metrics
from mris.evaluation.classify import fit_with_cv
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
def retrieval_row(queries: np.ndarray, keys: np.ndarray, subjects: Sequence[str], resamples: int,
                  seed: int) -> dict[str, Any]:
    """Recall@k with intervals for query embeddings [Q, D] whose true keys are ``keys`` [Q, D]
    (same order; the gallery is all of ``keys``)."""
    ranks = metrics.retrieval_ranks(queries @ keys.T)
    gallery = keys.shape[0]
    row: dict[str, Any] = {"queries": int(ranks.size), "gallery": int(gallery), "recall": {}, "ci95": {}, "chance": {},
                           "ratio_to_chance": {}, "ratio_ci95": {}}
    for k in metrics.RECALL_AT:
        hits = (ranks < k).astype(np.float64)
        row["recall"][f"R@{k}"] = float(hits.mean())
        row["ci95"][f"R@{k}"] = list(metrics.bootstrap_ci(lambda p, hits=hits: float(hits[p].mean()), subjects, resamples, seed))
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
            ci = metrics.bootstrap_ci(lambda p, v=values: metrics.median_mad(v[p])[0], errors.subjects, resamples, seed)
            entry[name] = {"by_klg": per_grade, "all": {"median": median, "mad": mad, "n": n, "median_ci95": list(ci)},
                           "mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
                           "coverage_mean": float(np.nanmean(errors.coverage[method][name]))}
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
    return {"first": first, "second": second, "statistic": "per-pair MAE (mm)",
            **{name: paired_difference(errors.mae[first][name], errors.mae[second][name], errors.subjects,
                                       resamples, seed) for name in ("fc", "tc")}}


# ---------------------------------------------------------------------------------- Table 3
@dataclass
class SplitFeatures:
    """Classifier features of every method for the rows of one split."""

    rows: list[ManifestRow] = field(default_factory=list)
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)  # method -> [N] x [F]

    def add(self, method: str, features: Sequence[np.ndarray]) -> None:
        self.features.setdefault(method, []).extend(features)

    def matrix(self, method: str, positions: Sequence[int]) -> np.ndarray:
        stacked = np.stack(self.features[method])
        return stacked[np.asarray(positions, np.int64)]


def _task_positions(rows: Sequence[ManifestRow], task: str) -> tuple[list[int], np.ndarray]:
    if task == "klg":
        positions = [i for i, row in enumerate(rows) if row.klg is not None]
        return positions, np.array([merge_klg(rows[i].klg) for i in positions], np.int64)
    positions = [i for i in first_visit_positions(rows) if rows[i].progressor is not None]
    return positions, np.array([int(rows[i].progressor) for i in positions], np.int64)


def downstream_table(train: SplitFeatures, test: SplitFeatures, methods: Sequence[str], resamples: int,
                     seed: int) -> dict[str, Any]:
    table: dict[str, Any] = {"methods": {}, "counts": {}}
    for task in ("klg", "progression"):
        train_pos, train_labels = _task_positions(train.rows, task)
        test_pos, test_labels = _task_positions(test.rows, task)
        table["counts"][task] = {
            "train": len(train_pos), "test": len(test_pos),
            "test_class_counts": {str(c): int((test_labels == c).sum()) for c in np.unique(test_labels)},
        }
        if len(train_pos) < 2 or len(test_pos) < 1 or np.unique(train_labels).size < 2:
            continue
        train_groups = [train.rows[i].subject_id for i in train_pos]
        test_groups = [test.rows[i].subject_id for i in test_pos]
        for method in methods:
            if method not in train.features or method not in test.features:
                continue
            model = fit_with_cv(train.matrix(method, train_pos), train_labels, train_groups, seed=seed)
            x_test = test.matrix(method, test_pos)
            entry = table["methods"].setdefault(method, {})
            if task == "klg":
                predicted = model.predict(x_test)
                entry["klg"] = {**with_intervals({"accuracy": metrics.accuracy,
                                                  "balanced_accuracy": metrics.balanced_accuracy},
                                                 test_labels, predicted, test_groups, resamples, seed),
                                "confusion": confusion(test_labels, predicted, len(KLG_CLASSES)), "l2": model.l2}
            else:
                entry["progression"] = {**with_intervals({"average_precision": metrics.average_precision,
                                                          "roc_auc": metrics.roc_auc},
                                                         test_labels, model.score(x_test, positive=1), test_groups,
                                                         resamples, seed),
                                        "prevalence": float(test_labels.mean()), "l2": model.l2}
    return table


def with_intervals(metric_functions: dict[str, Any], truth: np.ndarray, answer: np.ndarray, groups: Sequence[str],
                   resamples: int, seed: int) -> dict[str, Any]:
    """``name`` -> metric(truth, answer) and ``name_ci95`` -> its subject-bootstrap interval."""
    out: dict[str, Any] = {}
    for name, function in metric_functions.items():
        out[name] = function(truth, answer)
        out[f"{name}_ci95"] = list(metrics.bootstrap_ci(
            lambda p, function=function: function(truth[p], answer[p]), groups, resamples, seed))
    return out


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: int) -> list[list[int]]:
    """Rows = true class, columns = predicted class."""
    matrix = np.zeros((classes, classes), np.int64)
    for t, p in zip(truth, predicted):
        matrix[t, p] += 1
    return matrix.tolist()
