"""The downstream classifiers of Table 3: features from a pair of thickness maps, and an
L2-regularised multinomial logistic regression (numpy + scipy's L-BFGS; no torch).

Why this classifier and not the paper's ResNet-18: the evaluation must run on a 2-core CPU in
minutes and without torch, and it compares METHODS, not classifiers — every row (MR maps, MRIS-C,
MRIS-S, U-Net, mean map, oracle) gets the same features, the same model and the same penalty
search, trained on that method's maps of the ``downstream`` split and tested on its maps of the
``test`` split.

Features (``map_features``): each map (fc, tc; mm, NaN outside cartilage) with NaN -> 0, cut
into ``grid`` x ``grid`` cells (rows and columns split as evenly as ``np.array_split`` does) and
averaged per cell, so a cell holds its mean thickness with no-cartilage counting as 0 mm (the
encoders' and the reference classifier's NaN -> 0 convention): 2 x grid^2 numbers per knee (128
at grid 8). Exact cell means (not a filtered resize) keep every pixel in exactly one feature.

Model (``LogisticModel``): features standardised with the training split's mean and standard
deviation; softmax over the classes; loss = mean cross-entropy + l2 / 2 * ||W||^2 (bias not
penalised); the penalty l2 is chosen from ``L2_GRID`` by grouped K-fold cross-validation on the
training split (folds by subject, lowest mean held-out log-loss). Classes are not re-weighted:
the model maximises plain accuracy, which is what the paper reports first; balanced accuracy is
reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp


FEATURE_GRID = 8
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
CV_FOLDS = 5


def map_features(fc_mm: np.ndarray, tc_mm: np.ndarray, grid: int = FEATURE_GRID) -> np.ndarray:
    """float32 [2 * grid * grid]: the two maps (NaN -> 0) averaged to grid x grid cells."""
    parts = []
    for thickness in (fc_mm, tc_mm):
        filled = np.nan_to_num(np.asarray(thickness, dtype=np.float64), nan=0.0)
        rows, cols = filled.shape
        if rows < grid or cols < grid:
            raise ValueError(f"a {rows} x {cols} map cannot be cut into {grid} x {grid} cells")
        row_starts = np.array([part[0] for part in np.array_split(np.arange(rows), grid)])
        col_starts = np.array([part[0] for part in np.array_split(np.arange(cols), grid)])
        sums = np.add.reduceat(np.add.reduceat(filled, row_starts, axis=0), col_starts, axis=1)
        sizes = np.outer(np.diff(np.r_[row_starts, rows]), np.diff(np.r_[col_starts, cols]))
        parts.append((sums / sizes).ravel())
    return np.concatenate(parts).astype(np.float32)


def _softmax_parts(weights: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = x @ weights[:-1] + weights[-1]
    log_probability = logits - logsumexp(logits, axis=1, keepdims=True)
    return logits, log_probability


@dataclass
class LogisticModel:
    """A fitted model: ``classes`` [C], standardisation ``mean`` / ``scale`` [F], ``weights``
    [F + 1, C] (last row = bias), the chosen ``l2``."""

    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    l2: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: Sequence[int], l2: float) -> LogisticModel:
        x = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-8] = 1.0  # constant features (e.g. the mean-map row) carry nothing
        x = (x - mean) / scale
        n, f = x.shape
        c = classes.size
        onehot = (labels[:, None] == classes[None, :]).astype(np.float64)
        if c == 1:  # one class seen: predict it always
            weights = np.zeros((f + 1, 1))
            return cls(classes, mean, scale, weights, l2)

        def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
            weights = flat.reshape(f + 1, c)
            _, log_probability = _softmax_parts(weights, x)
            loss = -np.sum(onehot * log_probability) / n + 0.5 * l2 * np.sum(weights[:-1] ** 2)
            residual = (np.exp(log_probability) - onehot) / n
            gradient = np.vstack([x.T @ residual + l2 * weights[:-1], residual.sum(axis=0, keepdims=True)])
            return float(loss), gradient.ravel()

        result = minimize(objective, np.zeros((f + 1) * c), jac=True, method="L-BFGS-B",
                          options={"maxiter": 500})
        return cls(classes, mean, scale, result.x.reshape(f + 1, c), l2)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float64 [N, C] class probabilities (columns in ``classes`` order)."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        if self.classes.size == 1:
            return np.ones((x.shape[0], 1))
        _, log_probability = _softmax_parts(self.weights, x)
        return np.exp(log_probability)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.probabilities(features), axis=1)]

    def score(self, features: np.ndarray, positive: int = 1) -> np.ndarray:
        """Probability of class ``positive`` (0 when it was never seen in training)."""
        hits = np.flatnonzero(self.classes == positive)
        probabilities = self.probabilities(features)
        return probabilities[:, hits[0]] if hits.size else np.zeros(probabilities.shape[0])


def _log_loss(model: LogisticModel, features: np.ndarray, labels: np.ndarray) -> float:
    probabilities = model.probabilities(features)
    column = {c: i for i, c in enumerate(model.classes)}
    picked = np.array([probabilities[i, column[label]] if label in column else 0.0 for i, label in enumerate(labels)])
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def fit_with_cv(features: np.ndarray, labels: Sequence[int], groups: Sequence[str],
                l2_grid: Sequence[float] = L2_GRID, folds: int = CV_FOLDS, seed: int = 0) -> LogisticModel:
    """Choose ``l2`` by grouped K-fold cross-validation (folds by ``groups``, i.e. subjects), then
    refit on everything with it."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    unique = np.unique(groups)
    folds = min(folds, unique.size)
    if folds < 2 or len(l2_grid) == 1:
        return LogisticModel.fit(features, labels, l2_grid[0] if len(l2_grid) == 1 else 1e-2)
    fold_of_group = dict(zip(unique[np.random.default_rng([seed, 9]).permutation(unique.size)],
                             np.arange(unique.size) % folds))
    fold = np.array([fold_of_group[g] for g in groups])
    losses = []
    for l2 in l2_grid:
        held_out = [
            _log_loss(LogisticModel.fit(features[fold != k], labels[fold != k], l2), features[fold == k], labels[fold == k])
            for k in range(folds)
        ]
        losses.append(float(np.mean(held_out)))
    best = l2_grid[int(np.argmin(losses))]
    return LogisticModel.fit(features, labels, best)
