"""Table 3 (downstream tasks): per method a classifier trained on that method's maps of the
``downstream`` split and tested on its maps of the ``test`` split, with the MR maps themselves as
the reference row ``mr``.

- Tasks: ``klg`` on every knee-visit pair with a grade, 4 classes (KL 0-1, 2, 3, 4); ``progression``
  on each knee's first visit, label ``progressor`` (KL grade rises within 72 months).
- Classifiers: ``resnet18`` (the paper's, ``mris.training.downstream``, torch imported only when
  it runs) and ``logistic`` (scikit-learn on 8 x 8 cell means, ``classify.fit_logistic``), each
  the same for every method.
- Metrics (scikit-learn): KLG accuracy, balanced accuracy, accuracy per class (the confusion
  matrix's diagonal over its row sums, as the reference prints it) and the confusion matrix;
  progression average precision and ROC AUC of the positive class's probability.
- Intervals: 95 % percentile intervals from resampling test SUBJECTS
  (``metrics.subject_resamples``); every method is scored on the same resamples, so ``paired_vs_mr``
  gives, per method and metric, the difference method - MR on the same test knees and its interval
  from the same draws (a subject's knees and visits are not independent: no knee-visit-level test).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mris.evaluation import metrics
from mris.evaluation.classify import cell_means, fit_logistic, map_features, positive_score
from mris.evaluation.tables import KLG_CLASSES, first_visit_positions, merge_klg
from mris.manifest import ManifestRow

CLASSIFIERS = ("resnet18", "logistic")
TASKS = ("klg", "progression")
KLG_METRICS = ("accuracy", "balanced_accuracy")
PROGRESSION_METRICS = ("average_precision", "roc_auc")
# the quick profile's ResNet-18 sees each map as 24 x 24 cell means (fc above tc: 48 x 24), chosen
# for the budget (all rows x 2 tasks in minutes on 2 cores); here, torch-free, because the maps are
# reduced while the methods run
QUICK_MAP_PX = (24, 24)


@dataclass
class SplitMaps:
    """What the classifiers see of every method's maps for the rows of one split: the logistic
    features and the maps at ``map_px`` (cell means, NaN -> 0; float16, [2, h, w]; None = the
    map grid as it is)."""

    map_px: tuple[int, int] | None = None
    rows: list[ManifestRow] = field(default_factory=list)
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)
    maps: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, method: str, fc: Sequence[np.ndarray], tc: Sequence[np.ndarray]) -> None:
        for fc_map, tc_map in zip(fc, tc):
            self.features.setdefault(method, []).append(map_features(fc_map, tc_map))
            pair = [
                np.nan_to_num(np.asarray(m, np.float32), nan=0.0)
                if self.map_px is None
                else cell_means(m, *self.map_px)
                for m in (fc_map, tc_map)
            ]
            self.maps.setdefault(method, []).append(np.stack(pair).astype(np.float16))

    def matrix(self, method: str, positions: Sequence[int]) -> np.ndarray:
        return np.stack([self.features[method][i] for i in positions])

    def images(self, method: str, positions: Sequence[int]) -> np.ndarray:
        return np.stack([self.maps[method][i] for i in positions]).astype(np.float32)


def task_positions(rows: Sequence[ManifestRow], task: str) -> tuple[list[int], np.ndarray]:
    """Positions of the rows a task uses and their labels (int64)."""
    if task == "klg":
        positions = [i for i, row in enumerate(rows) if row.klg is not None]
        return positions, np.array([merge_klg(rows[i].klg) for i in positions], np.int64)
    positions = [i for i in first_visit_positions(rows) if rows[i].progressor is not None]
    return positions, np.array([int(rows[i].progressor) for i in positions], np.int64)


# ------------------------------------------------------------------------------------ metrics
def klg_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """scikit-learn's accuracy, balanced accuracy and confusion matrix (rows = true class), and
    the accuracy per class (NaN for a class absent from ``truth``)."""
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    matrix = confusion_matrix(truth, predicted, labels=np.arange(len(KLG_CLASSES)))
    totals = matrix.sum(axis=1)
    per_class = np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # a predicted class absent from this (resampled) truth
        balanced = balanced_accuracy_score(truth, predicted)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "balanced_accuracy": float(balanced),
        "class_accuracy": {name: float(value) for name, value in zip(KLG_CLASSES, per_class)},
        "confusion": matrix.tolist(),
    }


def progression_metrics(truth: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """scikit-learn's average precision and ROC AUC (NaN when the truth has one class)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if np.unique(truth).size < 2:
        return {"average_precision": float("nan"), "roc_auc": float("nan")}
    return {
        "average_precision": float(average_precision_score(truth, score)),
        "roc_auc": float(roc_auc_score(truth, score)),
    }


def _resample_values(
    task: str, truth: np.ndarray, answer: np.ndarray, positions: np.ndarray
) -> dict[str, float]:
    if task == "klg":
        # one scikit-learn confusion matrix per resample; accuracy and balanced accuracy read off it
        # exactly as accuracy_score and balanced_accuracy_score define them (the point estimates
        # call those; tests check they agree)
        from sklearn.metrics import confusion_matrix

        matrix = confusion_matrix(
            truth[positions], answer[positions], labels=np.arange(len(KLG_CLASSES))
        )
        totals = matrix.sum(axis=1)
        per_class = np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
        out = {
            "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
            "balanced_accuracy": float(np.nanmean(per_class))
            if np.isfinite(per_class).any()
            else float("nan"),
        }
        out.update(
            {f"class_accuracy.{name}": float(value) for name, value in zip(KLG_CLASSES, per_class)}
        )
        return out
    return progression_metrics(truth[positions], answer[positions])


def scored_with_intervals(
    task: str,
    truth: np.ndarray,
    answers: dict[str, np.ndarray],
    groups: Sequence[str],
    resamples: int,
    seed: int,
    reference: str = "mr",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per method the metrics with ``<metric>_ci95`` intervals, and per method other than
    ``reference`` the paired difference to it (same test knees, same subject resamples)."""
    import sklearn

    scored: dict[str, Any] = {}
    for method, answer in answers.items():
        scored[method] = (
            klg_metrics(truth, answer) if task == "klg" else progression_metrics(truth, answer)
        )
    drawn: dict[str, list[dict[str, float]]] = {method: [] for method in answers}
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        for positions in metrics.subject_resamples(groups, resamples, seed):
            for method, answer in answers.items():
                drawn[method].append(_resample_values(task, truth, answer, positions))
    names = list(KLG_METRICS if task == "klg" else PROGRESSION_METRICS)
    if task == "klg":
        names += [f"class_accuracy.{name}" for name in KLG_CLASSES]
    for method in answers:
        for name in names:
            values = [d[name] for d in drawn[method]]
            if name.startswith("class_accuracy."):
                scored[method].setdefault("class_accuracy_ci95", {})[name.split(".", 1)[1]] = list(
                    metrics.percentile_interval(values)
                )
            else:
                scored[method][f"{name}_ci95"] = list(metrics.percentile_interval(values))
    paired: dict[str, Any] = {}
    if reference in answers:
        for method in answers:
            if method == reference:
                continue
            paired[method] = {}
            for name in names:
                if name.startswith("class_accuracy."):
                    continue
                own, ref = scored[method][name], scored[reference][name]
                differences = [d[name] - r[name] for d, r in zip(drawn[method], drawn[reference])]
                paired[method][name] = {
                    "difference": own - ref,
                    "ci95": list(metrics.percentile_interval(differences)),
                    "resamples_used": int(np.isfinite(differences).sum()),
                }
    return scored, paired


# --------------------------------------------------------------------------------- the table
def _resnet_settings(task: str, profile: str, epochs: int | None):
    from mris.training.downstream import settings_for

    return settings_for(task, profile, epochs)


CLASSIFIER_SETTINGS = {"paper": "paper", "quick": "quick", "reference": "quick"}
"""Which Table 3 ResNet-18 setting each training profile uses: DESIGN.md's (``paper``) or the
demo's (``quick``: 24 x 24 cell means, ``mris.training.downstream``'s QUICK_* figures). The one
place this is decided; ``classifier_map_px`` and ``mris.training.downstream.settings_for`` read
it."""


def classifier_setting(profile: str) -> str:
    """``paper`` or ``quick``: the ResNet-18 setting of training profile ``profile``."""
    if profile not in CLASSIFIER_SETTINGS:
        raise ValueError(
            f"profile must be one of {', '.join(CLASSIFIER_SETTINGS)}, got {profile!r}"
        )
    return CLASSIFIER_SETTINGS[profile]


def classifier_map_px(profile: str) -> tuple[int, int] | None:
    """The per-map input size the ResNet-18 of ``profile`` wants (None = the map grid)."""
    return None if classifier_setting(profile) == "paper" else QUICK_MAP_PX


def downstream_table(
    train: SplitMaps,
    test: SplitMaps,
    methods: Sequence[str],
    resamples: int,
    seed: int,
    classifiers: Sequence[str] = CLASSIFIERS,
    profile: str = "quick",
    epochs: int | None = None,
    weights: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Table 3. ``methods`` are trained and tested in order (``mr`` first for the paired
    comparisons); ``classifiers`` from ``CLASSIFIERS``;
    ``profile``/``epochs``/``weights``/``device``
    /``threads`` for the ResNet-18. ``methods`` at the top level is the first classifier's rows."""
    log = log or (lambda message: None)
    unknown = set(classifiers) - set(CLASSIFIERS)
    if unknown:
        raise ValueError(f"unknown classifiers {sorted(unknown)}; choose from {CLASSIFIERS}")
    table: dict[str, Any] = {"counts": {}, "classifiers": {}, "settings": {}}
    methods = [m for m in methods if m in train.features and m in test.features]
    for classifier in classifiers:
        table["classifiers"][classifier] = {
            "methods": {m: {} for m in methods},
            "paired_vs_mr": {},
            "seconds": 0.0,
        }
    for task in TASKS:
        train_pos, train_labels = task_positions(train.rows, task)
        test_pos, test_labels = task_positions(test.rows, task)
        table["counts"][task] = {
            "train": len(train_pos),
            "test": len(test_pos),
            "test_class_counts": {
                str(c): int((test_labels == c).sum()) for c in np.unique(test_labels)
            },
            "test_subjects": len({test.rows[i].subject_id for i in test_pos}),
        }
        if len(train_pos) < 2 or len(test_pos) < 1 or np.unique(train_labels).size < 2:
            continue
        train_groups = [train.rows[i].subject_id for i in train_pos]
        test_groups = [test.rows[i].subject_id for i in test_pos]
        classes = len(KLG_CLASSES) if task == "klg" else 2
        for classifier in classifiers:
            started = time.perf_counter()
            answers: dict[str, np.ndarray] = {}
            extra: dict[str, dict[str, Any]] = {}
            for method in methods:
                if classifier == "logistic":
                    model = fit_logistic(
                        train.matrix(method, train_pos), train_labels, train_groups
                    )
                    x_test = test.matrix(method, test_pos)
                    answers[method] = (
                        model.predict(x_test) if task == "klg" else positive_score(model, x_test)
                    )
                    extra[method] = {"C": model.chosen_c}
                else:
                    answers[method] = _resnet_answer(
                        train,
                        test,
                        method,
                        train_pos,
                        train_labels,
                        test_pos,
                        task,
                        classes,
                        profile,
                        epochs,
                        weights,
                        device,
                        threads,
                        seed,
                    )
                    log(
                        f"Table 3: ResNet-18 {task} on {method} maps "
                        f"({time.perf_counter() - started:.0f} s so far)"
                    )
            scored, paired = scored_with_intervals(
                task, test_labels, answers, test_groups, resamples, seed
            )
            entry = table["classifiers"][classifier]
            for method in methods:
                entry["methods"][method][task] = {**scored[method], **extra.get(method, {})}
                if task == "progression":
                    entry["methods"][method][task]["prevalence"] = float(test_labels.mean())
            for method, values in paired.items():
                entry["paired_vs_mr"].setdefault(method, {})[task] = values
            entry["seconds"] += time.perf_counter() - started
            if classifier == "resnet18":
                table["settings"].setdefault(
                    "resnet18",
                    {
                        "profile": profile,
                        "weights": str(weights) if weights else None,
                        "device": device,
                    },
                )[task] = _resnet_settings(task, profile, epochs).to_dict()
    if "logistic" in classifiers:
        from mris.evaluation.classify import C_GRID, CV_FOLDS, FEATURE_GRID

        table["settings"]["logistic"] = {
            "features": f"{FEATURE_GRID} x {FEATURE_GRID} cell means of fc and tc",
            "C_grid": list(C_GRID),
            "cv_folds": CV_FOLDS,
        }
    for entry in table["classifiers"].values():
        entry["methods"] = {m: v for m, v in entry["methods"].items() if v}
        entry["seconds"] = round(entry["seconds"], 1)
    table["methods"] = table["classifiers"][classifiers[0]]["methods"] if classifiers else {}
    table["primary"] = classifiers[0] if classifiers else None
    return table


def _resnet_answer(
    train: SplitMaps,
    test: SplitMaps,
    method: str,
    train_pos,
    train_labels,
    test_pos,
    task: str,
    classes: int,
    profile: str,
    epochs: int | None,
    weights: Path | None,
    device: str,
    threads: int | None,
    seed: int,
) -> np.ndarray:
    import torch

    from mris.training.downstream import fit_predict

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probabilities = fit_predict(
        train.images(method, train_pos),
        train_labels,
        test.images(method, test_pos),
        classes,
        _resnet_settings(task, profile, epochs),
        seed=seed,
        weights_path=weights,
        device=device,
    )
    # the reference's scores: the arg-max class for KLG, P(progressor) for progression
    return probabilities.argmax(axis=1) if task == "klg" else probabilities[:, 1]
