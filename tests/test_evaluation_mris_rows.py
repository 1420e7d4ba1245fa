"""The MRIS-S rows of Table 2, recomputed by hand: ``mris evaluate`` (as a library call, torch-free)
on a tiny real cohort with a tiny real model bundle (tests/bundle_factory.py) and index, then the
same numbers from the neighbour ids and similarities of the index search alone — eq. 4 written
out in numpy on the database maps read from the manifest's files (NaN wherever any neighbour is
NaN: the reference's sum of NaN-propagating maps), the reference's resize with scikit-image, and
the reference's per-pair median and MAD of the absolute error, averaged by KL stratum."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import median_abs_deviation
from test_evaluation_reference_stats import (
    reference_resize,  # the reference's resize, with scikit-image
)

from mris.manifest import read_manifest
from mris.thickness import load_thickness_map

K = 5


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from bundle_factory import make_model_bundle
    from conftest import write_tiny_cohort

    from mris.evaluation.run import EvaluateRequest, evaluate
    from mris.index.build import build_index_bundle

    root = tmp_path_factory.mktemp("mris-rows")
    manifest = write_tiny_cohort(root / "cohort", subjects=12)
    model = make_model_bundle(root / "model", encoder_px=32)
    build_index_bundle(model, manifest, root / "index", variant="separate", publish=True, threads=1)
    report = evaluate(
        EvaluateRequest(
            manifest=manifest,
            model=model,
            index=root / "index",
            out=root / "report",
            methods=["mris-s"],
            k=K,
            resamples=20,
            threads=1,
            device="cpu",
            examples=1,
        )
    )
    return manifest, model, root / "index", root / "report", report


def test_mris_s_rows_equal_a_hand_computation(evaluated):
    from mris.pipeline import Pipeline, RequestOptions

    manifest_path, model, index, out, _ = evaluated
    report = json.loads((out / "report.json").read_text())
    manifest = read_manifest(manifest_path)
    by_id = {row.pair_id: row for row in manifest.rows}
    pipeline = Pipeline.load(model, index, variant="separate", device="cpu", intra_op_threads=1)
    per_knee = report["per_knee"]
    assert per_knee["pair_ids"] and set(per_knee["pair_ids"]) == {
        r.pair_id for r in manifest.select(["test"])
    }

    medians = {"fc": [], "tc": []}
    mads = {"fc": [], "tc": []}
    for pair in per_knee["pair_ids"]:
        row = by_id[pair]
        options = RequestOptions(
            knees=(row.side,), keypoints={row.side: (row.keypoint_x, row.keypoint_y)}
        )
        roi = pipeline.prepare(manifest.resolve_path(row.radiograph_path), options).rois[0]
        hits = pipeline.search([roi.image], K)[0]
        for name in ("fc", "tc"):
            similarity = np.asarray(hits[name].similarities, np.float64)
            ids = [pipeline.index.rows[int(r)].pair_id for r in hits[name].rows]
            assert similarity.size == K and (similarity > 0).all()  # eq. 4 as written needs s_i > 0
            neighbours = np.stack(
                [
                    load_thickness_map(manifest.resolve_path(getattr(by_id[i], f"{name}_path")))
                    for i in ids
                ]
            ).astype(np.float64)
            weights = similarity / similarity.sum()
            synthesized = (weights[:, None, None] * neighbours).sum(
                axis=0
            )  # NaN where any neighbour is NaN
            truth = load_thickness_map(manifest.resolve_path(getattr(row, f"{name}_path"))).astype(
                np.float64
            )
            error = np.abs(reference_resize(synthesized) - reference_resize(truth)).reshape(-1)
            medians[name].append(float(np.nanmedian(error)) if np.isfinite(error).any() else np.nan)
            mads[name].append(
                float(median_abs_deviation(error, nan_policy="omit"))
                if np.isfinite(error).any()
                else np.nan
            )

    grades = np.array([-1 if g is None else g for g in per_knee["klg"]])
    strata = {
        "KLG01": np.isin(grades, (0, 1)),
        "KLG2": grades == 2,
        "KLG3": grades == 3,
        "KLG4": grades == 4,
        "all": np.ones(grades.size, bool),
    }
    table = report["table2_reference"]["methods"]["mris-s"]
    for name in ("fc", "tc"):
        np.testing.assert_allclose(
            np.array(per_knee["reference_median"]["mris-s"][name], np.float64),
            medians[name],
            atol=1e-5,
            equal_nan=True,
        )
        for stratum, where in strata.items():
            cell = table[name][stratum]
            values = np.asarray(medians[name])[where]
            if not np.isfinite(values).any():
                assert cell["median"] is None and cell["n"] == 0  # strict JSON: NaN became null
                continue
            assert cell["median"] == pytest.approx(np.nanmean(values), abs=1e-5)
            assert cell["mad"] == pytest.approx(np.nanmean(np.asarray(mads[name])[where]), abs=1e-5)
            assert cell["n"] == int(np.isfinite(values).sum())
    assert (
        report["model_card"]["validation_first_visit"] == {}
    )  # a card from before the field still loads
    text = (out / "report.md").read_text()
    assert "the reference's statistic" in text and "Table 2b: per-pair MAE" in text
