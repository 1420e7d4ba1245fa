"""The downstream classifiers' inputs (cell means) and the logistic regression row."""

from __future__ import annotations

import numpy as np

from mris.evaluation.classify import cell_means, fit_logistic, map_features, positive_score


def test_map_features_are_cell_means_with_nan_as_zero():
    fc = np.full((16, 16), 2.0, np.float32)
    fc[:8, :] = np.nan  # top half no cartilage
    tc = np.ones((16, 16), np.float32)
    features = map_features(fc, tc, grid=2)
    assert features.shape == (8,)
    assert np.allclose(features[:4], [0.0, 0.0, 2.0, 2.0])
    assert np.allclose(features[4:], 1.0)
    assert np.allclose(cell_means(np.arange(12.0).reshape(3, 4), 1, 2), [[4.5, 6.5]])


def test_separable_classes_are_learned_with_grouped_cv():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    features = rng.normal(0, 0.3, (90, 5)) + np.eye(3, 5)[labels] * 3
    groups = [f"s{i // 2}" for i in range(90)]
    model = fit_logistic(features, labels, groups)
    assert (model.predict(features) == labels).mean() == 1.0
    assert model.chosen_c in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def test_constant_features_predict_the_majority_class():
    features = np.ones((10, 3))  # as the database mean map gives every knee
    labels = np.array([0] * 7 + [1] * 3)
    model = fit_logistic(features, labels, [f"s{i}" for i in range(10)])
    assert model.predict(features).tolist() == [0] * 10
    assert np.allclose(
        positive_score(model, features, positive=1), 0.3, atol=0.01
    )  # the prevalence
    assert np.allclose(positive_score(model, features, positive=7), 0.0)  # a class never seen
