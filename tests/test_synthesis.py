"""mris.synthesis: eq. 4 by hand, the NaN rules (majority, all), non-positive similarities, the
std."""

from __future__ import annotations

import numpy as np
import pytest

from mris.synthesis import NAN_RULES, similarity_weights, synthesize


def test_eq4_by_hand_without_nan():
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.5, 5.0, (3, 4, 5, 6)).astype(np.float32)  # N=3 queries, k=4
    sims = rng.uniform(0.2, 0.9, (3, 4)).astype(np.float32)
    out = synthesize(maps, sims)
    for q in range(3):
        w = sims[q].astype(np.float64) / sims[q].astype(np.float64).sum()
        expected = sum(w[i] * maps[q, i].astype(np.float64) for i in range(4))
        std = np.sqrt(sum(w[i] * (maps[q, i] - expected) ** 2 for i in range(4)))
        np.testing.assert_allclose(out.thickness_mm[q], expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out.std_mm[q], std, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out.weights[q], w, atol=1e-7)
    assert out.thickness_mm.dtype == np.float32 and out.thickness_mm.shape == (3, 5, 6)


def test_unbatched_form_and_identical_neighbours_have_zero_std():
    one = np.full((3, 2, 2), 2.5, np.float32)
    out = synthesize(one, np.array([0.9, 0.5, 0.1]))
    assert out.thickness_mm.shape == (1, 2, 2)
    np.testing.assert_allclose(out.thickness_mm, 2.5, atol=1e-6)
    np.testing.assert_allclose(out.std_mm, 0.0, atol=1e-6)


def test_nan_rule_weight_share_and_renormalisation():
    nan = np.nan
    # one pixel, k = 3 neighbours with weights 0.5, 0.3, 0.2
    sims = np.array([[0.5, 0.3, 0.2]])
    cases = [
        ([1.0, 2.0, 3.0], 0.5 * 1 + 0.3 * 2 + 0.2 * 3),  # all cartilage: plain eq. 4
        ([1.0, nan, nan], 1.0),  # share 0.5 -> cartilage, renormalised over neighbour 0
        ([nan, 2.0, 3.0], (0.3 * 2 + 0.2 * 3) / 0.5),  # share 0.5 -> cartilage
        ([nan, 2.0, nan], nan),  # share 0.3 < 0.5 -> outside
        ([nan, nan, nan], nan),
    ]
    for values, expected in cases:
        maps = np.array(values, np.float32).reshape(1, 3, 1, 1)
        out = synthesize(maps, sims)
        got = out.thickness_mm[0, 0, 0]
        if np.isnan(expected):
            assert np.isnan(got) and np.isnan(out.std_mm[0, 0, 0]), values
        else:
            assert got == pytest.approx(expected, abs=1e-6), values
    maps = np.array([nan, 2.0, 3.0], np.float32).reshape(1, 3, 1, 1)
    assert synthesize(maps, sims).cartilage_share[0, 0, 0] == pytest.approx(0.5)
    assert np.isnan(synthesize(maps, sims, min_cartilage_share=0.6).thickness_mm[0, 0, 0])


def test_all_rule_is_the_reference_nan_propagating_weighted_sum():
    rng = np.random.default_rng(2)
    maps = rng.uniform(0.5, 5.0, (2, 6, 9, 8)).astype(np.float32)
    maps[rng.uniform(size=maps.shape) < 0.1] = np.nan
    sims = rng.uniform(0.2, 0.9, (2, 6)).astype(np.float32)
    out = synthesize(maps, sims, nan_rule="all")
    assert out.nan_rule == "all"
    for q in range(2):
        w = sims[q].astype(np.float64) / sims[q].astype(np.float64).sum()
        reference = np.sum(w[:, None, None] * maps[q].astype(np.float64), axis=0)  # NaN propagates
        assert np.isnan(reference).any() and np.isfinite(reference).any()
        np.testing.assert_array_equal(np.isnan(out.thickness_mm[q]), np.isnan(reference))
        np.testing.assert_allclose(out.thickness_mm[q], reference, atol=1e-5, equal_nan=True)


def test_the_rules_differ_where_some_neighbours_lack_cartilage():
    nan = np.nan
    sims = np.array([[0.5, 0.3, 0.2]])
    cases = [  # neighbour values at one pixel -> (majority, all)
        ([1.0, 2.0, 3.0], 0.5 * 1 + 0.3 * 2 + 0.2 * 3, 0.5 * 1 + 0.3 * 2 + 0.2 * 3),
        ([1.0, 2.0, nan], (0.5 * 1 + 0.3 * 2) / 0.8, nan),
        ([1.0, nan, nan], 1.0, nan),
        ([nan, 2.0, nan], nan, nan),
    ]
    for values, majority, every in cases:
        maps = np.array(values, np.float32).reshape(1, 3, 1, 1)
        for rule, expected in zip(NAN_RULES, (majority, every)):
            got = synthesize(maps, sims, nan_rule=rule).thickness_mm[0, 0, 0]
            assert got == pytest.approx(expected, abs=1e-6, nan_ok=True), (values, rule)
    # A neighbour with weight 0 (similarity <= 0) still counts for `all`, as in the reference's
    # sum (NaN * 0 is NaN); a FAISS "no result" slot is no neighbour and does not.
    maps = np.array([2.0, 3.0, nan], np.float32).reshape(1, 3, 1, 1)
    assert np.isnan(
        synthesize(maps, np.array([[0.6, 0.4, -0.1]]), nan_rule="all").thickness_mm[0, 0, 0]
    )
    no_result = synthesize(maps, np.array([[0.6, 0.4, -3.4e38]]), nan_rule="all").thickness_mm[
        0, 0, 0
    ]
    assert no_result == pytest.approx(0.6 * 2 + 0.4 * 3, abs=1e-6)
    with pytest.raises(ValueError, match="nan_rule"):
        synthesize(maps, np.array([[0.6, 0.4, 0.2]]), nan_rule="any")


def test_non_positive_similarities():
    w = similarity_weights(np.array([[0.6, 0.2, -0.4, 0.0]]))
    np.testing.assert_allclose(w, [[0.75, 0.25, 0.0, 0.0]])
    # all non-positive: equal weights over the valid neighbours
    np.testing.assert_allclose(similarity_weights(np.array([[-0.1, -0.5]])), [[0.5, 0.5]])
    # FAISS "no result" slots (-3.4e38) weigh nothing, even in the fallback
    np.testing.assert_allclose(similarity_weights(np.array([[-0.2, -3.4e38]])), [[1.0, 0.0]])
    np.testing.assert_allclose(similarity_weights(np.array([[0.4, np.nan]])), [[1.0, 0.0]])


def test_float16_maps_match_float32_within_bound_below_4mm():
    """Measured fp16 storage error of the weighted average (docs/INDEX.md)."""
    rng = np.random.default_rng(1)
    maps = rng.uniform(0.0, 5.5, (8, 20, 64, 64)).astype(np.float32)
    maps[:, :, :8] = np.nan
    sims = rng.uniform(0.3, 0.9, (8, 20)).astype(np.float32)
    full = synthesize(maps, sims).thickness_mm
    half = synthesize(maps.astype(np.float16), sims).thickness_mm
    error = np.nanmax(np.abs(full - half))
    assert error < 1e-3  # independent rounding errors average out over k = 20
    # worst case: every neighbour rounds the same way (identical maps) near 5.5 mm
    same = np.full((1, 20, 1, 1), 5.4980, np.float32)
    worst = abs(synthesize(same.astype(np.float16), sims[:1]).thickness_mm - 5.4980).max()
    assert 1e-3 < worst <= 0.002


def test_shape_errors():
    with pytest.raises(ValueError):
        synthesize(np.zeros((2, 3, 4, 4), np.float32), np.ones((2, 4)))
