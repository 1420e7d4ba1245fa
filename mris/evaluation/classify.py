"""What Table 3's classifiers see of a pair of thickness maps, and the fast second classifier.

- ``cell_means``: a map (mm, NaN outside cartilage) with NaN -> 0 (the encoders' and the
  reference classifier's convention: no cartilage counts as 0 mm), averaged over a rows x cols
  grid of cells (rows and columns split as evenly as ``np.array_split`` does). Exact cell means
  (not a filtered resize) keep every pixel in exactly one cell. The ResNet-18
  (``mris.training.downstream``) gets both maps this way at its input size.
- ``map_features``: the logistic regression's features, both maps at 8 x 8 cells (128 numbers).
- ``fit_logistic``: scikit-learn's L2 logistic regression (multinomial for the KL grade) on
  standardised features (``StandardScaler`` fitted on the training split), its ``C`` chosen from
  ``C_GRID`` by grouped K-fold cross-validation over subjects (``GroupKFold``, lowest held-out
  log-loss), then refitted on all of it. Classes are not re-weighted. Not the paper's classifier:
  a second row that runs in seconds, the same for every method.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FEATURE_GRID = 8
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strength of scikit-learn
CV_FOLDS = 5


def cell_means(thickness_mm: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """float32 [rows, cols]: the map (NaN -> 0) averaged over rows x cols cells."""
    filled = np.nan_to_num(np.asarray(thickness_mm, dtype=np.float64), nan=0.0)
    height, width = filled.shape
    if height < rows or width < cols:
        raise ValueError(f"a {height} x {width} map cannot be cut into {rows} x {cols} cells")
    row_starts = np.array([part[0] for part in np.array_split(np.arange(height), rows)])
    col_starts = np.array([part[0] for part in np.array_split(np.arange(width), cols)])
    sums = np.add.reduceat(np.add.reduceat(filled, row_starts, axis=0), col_starts, axis=1)
    sizes = np.outer(np.diff(np.r_[row_starts, height]), np.diff(np.r_[col_starts, width]))
    return (sums / sizes).astype(np.float32)


def map_features(fc_mm: np.ndarray, tc_mm: np.ndarray, grid: int = FEATURE_GRID) -> np.ndarray:
    """float32 [2 * grid * grid]: the two maps (NaN -> 0) averaged to grid x grid cells."""
    return np.concatenate([cell_means(m, grid, grid).ravel() for m in (fc_mm, tc_mm)])


def fit_logistic(
    features: np.ndarray,
    labels: Sequence[int],
    groups: Sequence[str],
    c_grid: Sequence[float] = C_GRID,
    folds: int = CV_FOLDS,
):
    """A fitted scikit-learn estimator (``predict``, ``predict_proba``, ``classes_``) whose ``C``
    was chosen by ``GroupKFold`` over ``groups`` (subjects); ``.chosen_c`` holds it."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = min(folds, np.unique(groups).size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # a fold without some class
        if folds < 2 or len(c_grid) == 1:
            c = c_grid[0] if len(c_grid) == 1 else 1.0
            model = pipeline.set_params(logisticregression__C=c).fit(features, labels)
        else:
            search = GridSearchCV(
                pipeline,
                {"logisticregression__C": list(c_grid)},
                cv=GroupKFold(n_splits=folds),
                scoring="neg_log_loss",
                error_score=np.nan,
            )
            search.fit(features, labels, groups=groups)
            model, c = search.best_estimator_, search.best_params_["logisticregression__C"]
    model.chosen_c = float(c)
    return model


def positive_score(model, features: np.ndarray, positive: int = 1) -> np.ndarray:
    """Probability of class ``positive`` (0 when it was never seen in training)."""
    probabilities = model.predict_proba(np.asarray(features, dtype=np.float64))
    hits = np.flatnonzero(model.classes_ == positive)
    return probabilities[:, hits[0]] if hits.size else np.zeros(probabilities.shape[0])
