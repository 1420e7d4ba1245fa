"""The compared methods' map rules: the mean map is eq. 4 with equal weights, the oracle finds
the true map when the database holds it and cannot win by covering little."""

from __future__ import annotations

import numpy as np

from mris.evaluation.methods import MeanMethod, OracleMethod, database_mean_maps
from mris.evaluation.metrics import map_error
from mris.synthesis import synthesize


def _maps(n: int, seed: int, shape=(12, 10)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.uniform(1.0, 3.5, (n, *shape)).astype(np.float32)
    maps[rng.uniform(size=maps.shape) < 0.4] = np.nan
    return maps


def test_mean_map_is_eq4_with_equal_weights_in_chunks():
    database = {"fc": _maps(23, 1), "tc": _maps(23, 2)}
    means = database_mean_maps(lambda name, ids: database[name][ids], 23, chunk_rows=5)
    for name in ("fc", "tc"):
        expected = synthesize(database[name][None], np.ones((1, 23), np.float32)).thickness_mm[0]
        np.testing.assert_allclose(means[name], expected, rtol=1e-5, equal_nan=True)
    answer = MeanMethod(means).predict([None, None, None])
    assert answer.fc.shape == (3, 12, 10)
    assert np.array_equal(MeanMethod(means).atlas_masks["fc"], np.isfinite(means["fc"]))


def test_oracle_finds_the_true_map_in_the_database():
    database = {"fc": _maps(30, 3), "tc": _maps(30, 4)}
    oracle = OracleMethod(lambda name, ids: database[name][ids], 30, shortlist=4, chunk_rows=7)  # 5 chunks
    truth = {"fc": database["fc"][[7, 21]], "tc": database["tc"][[2, 2]]}
    answer = oracle.predict_from_truth(truth)
    assert oracle.chosen == {"fc": [7, 21], "tc": [2, 2]}
    for name in ("fc", "tc"):
        for predicted, true in zip(answer[name], truth[name]):
            assert map_error(predicted, true) == (0.0, 1.0)


def test_oracle_does_not_pick_a_map_that_covers_little():
    truth = np.full((1, 4, 4), 2.0, np.float32)
    exact_corner = np.full((4, 4), np.nan, np.float32)
    exact_corner[0, 0] = 2.0  # perfect on 1 of 16 pixels, missing elsewhere
    close_everywhere = np.full((4, 4), 2.2, np.float32)
    oracle = OracleMethod.from_arrays({"fc": np.stack([exact_corner, close_everywhere]),
                                     "tc": np.stack([close_everywhere] * 2)})
    assert oracle.best_rows("fc", truth).tolist() == [1]
