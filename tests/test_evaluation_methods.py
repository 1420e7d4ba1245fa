"""The compared methods' map rules: MRIS maps use the NaN rule asked (the paper's ``all`` by
default, also from ``mris evaluate --nan-rule``), the mean map is eq. 4 with equal weights, the
oracle finds the true map when the database holds it and cannot win by covering little."""

from __future__ import annotations

import json

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
    oracle = OracleMethod(
        lambda name, ids: database[name][ids], 30, shortlist=4, chunk_rows=7
    )  # 5 chunks
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
    oracle = OracleMethod.from_arrays(
        {"fc": np.stack([exact_corner, close_everywhere]), "tc": np.stack([close_everywhere] * 2)}
    )
    assert oracle.best_rows("fc", truth).tolist() == [1]


def test_mris_maps_use_the_papers_all_rule_unless_told(tmp_path):
    from conftest import knee_phantom, make_dicom_bytes
    from serve_process import tiny_bundle
    from test_service import KEYPOINTS

    from mris.evaluation.methods import MrisMethod
    from mris.pipeline import Pipeline, RequestOptions, synthesize_maps
    from mris.roi import parse_keypoints

    model, index = tiny_bundle(tmp_path)
    pipeline = Pipeline.load(model, index, device="cpu", intra_op_threads=1)
    options = RequestOptions(keypoints=parse_keypoints(json.dumps(KEYPOINTS)))
    rois = pipeline.prepare(
        make_dicom_bytes(knee_phantom(), imager_spacing=(0.2, 0.2)), options
    ).rois
    hits = pipeline.search(rois, 5)
    method = MrisMethod(pipeline, 5)
    assert method.nan_rule == "all"
    strict, majority = method.predict(rois), MrisMethod(pipeline, 5, "majority").predict(rois)
    for rule, answer in (("all", strict), ("majority", majority)):
        expected = [synthesize_maps(knee_hits, pipeline.index, 5, rule) for knee_hits in hits]
        for name in ("fc", "tc"):
            np.testing.assert_array_equal(
                answer[name], np.stack([r.maps_mm[name] for r in expected])
            )
    assert (
        np.isnan(strict.fc).sum() > np.isnan(majority.fc).sum()
    )  # the rules differ on this bundle


def test_evaluate_takes_a_nan_rule_and_defaults_to_all(tmp_path):
    import typer
    from typer.testing import CliRunner

    from mris.cli import app
    from mris.errors import BadParameter
    from mris.evaluation.run import EvaluateRequest

    assert EvaluateRequest(tmp_path, tmp_path, tmp_path, tmp_path).nan_rule == "all"
    evaluate = typer.main.get_command(app).commands["evaluate"]
    assert next(p for p in evaluate.params if p.name == "nan_rule").default == "all"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--model",
            str(tmp_path),
            "--index",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
            "--nan-rule",
            "any",
        ],
    )
    assert isinstance(result.exception, BadParameter) and "nan_rule" in str(result.exception)
