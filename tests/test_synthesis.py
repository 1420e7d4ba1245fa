"""mris.synthesis: eq. 4 by hand, the NaN rules (majority, all), non-positive similarities, the
std; the compiled kernel against the numpy formulation it replaced, gathered maps and rows read
in place alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mris.synthesis import (
    BLOCK_PX,
    NAN_RULES,
    _neighbour_slots,
    similarity_weights,
    synthesize,
    synthesize_rows,
    warm_up,
)

REPO = Path(__file__).resolve().parent.parent


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


def numpy_synthesize(maps, similarities, min_cartilage_share=0.5, nan_rule="majority"):
    """The numpy formulation ``synthesize`` had before the compiled kernel (commit 92dc227), kept
    as the oracle: maps [N, k, H, W] -> (thickness, std, share) float32 [N, H, W]."""
    weights = similarity_weights(similarities)
    n, k, h, w = maps.shape
    filled = maps.reshape(n, k, h * w).astype(np.float32, copy=True)
    missing = np.isnan(filled)
    np.copyto(filled, np.float32(0), where=missing)
    mask = np.logical_not(missing, out=missing).astype(np.float32)
    row_weights = weights[:, None, :]
    share = np.matmul(row_weights, mask)[:, 0]
    weighted_sum = np.matmul(row_weights, filled)[:, 0]
    if nan_rule == "all":
        slots = _neighbour_slots(similarities).astype(np.float32)[:, None, :]
        with_cartilage = np.matmul(slots, mask)[:, 0]
        needed = slots.sum(axis=2)
        cartilage = (with_cartilage >= needed - np.float32(0.5)) & (needed > 0)
    else:
        cartilage = share >= np.float32(min_cartilage_share) - np.float32(1e-6)
    safe_share = np.where(share > 0, share, np.float32(1))
    mean = weighted_sum / safe_share
    deviation = np.subtract(filled, mean[:, None, :], out=filled)
    deviation *= mask
    deviation *= deviation
    variance = np.matmul(row_weights, deviation)[:, 0] / safe_share
    nan = np.float32(np.nan)
    thickness = np.where(cartilage, mean, nan).astype(np.float32).reshape(n, h, w)
    std = np.where(cartilage, np.sqrt(variance), nan).astype(np.float32).reshape(n, h, w)
    return thickness, std, share.reshape(n, h, w)


def database_and_queries(dtype, seed=0, rows=30, shape=(23, 29)):
    """A maps array with NaN outside cartilage, and 5 queries of k = 7 (odd: the kernel pairs
    rows) with FAISS "no result" slots (row -1 at -inf / -3.4e38), a row -1 at a finite
    similarity (a neighbour without a map), non-positive and all-non-positive similarities."""
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0.0, 5.5, (rows, *shape)).astype(np.float32)
    maps[rng.uniform(size=maps.shape) < 0.3] = np.nan
    maps[:, :3] = np.nan  # outside every neighbour's cartilage
    maps[rng.uniform(size=rows) < 0.3, 10:] = np.nan  # whole regions some neighbours lack
    ids = np.stack([rng.choice(rows, 7, replace=False) for _ in range(5)]).astype(np.int64)
    sims = rng.uniform(0.2, 0.9, ids.shape).astype(np.float32)
    ids[1, 5:], sims[1, 5:] = -1, [-np.inf, -3.4e38]
    sims[2, 2] = -0.3
    sims[3] = rng.uniform(-0.5, 0.0, 7)
    ids[4, 3] = -1
    return maps.astype(dtype), ids, sims


def gathered(maps, ids):
    """maps[ids] as float32 with NaN maps for row -1 (what ``MapStore.rows`` returns)."""
    out = maps[np.where(ids >= 0, ids, 0)].astype(np.float32)
    out[ids < 0] = np.nan
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("nan_rule", NAN_RULES)
@pytest.mark.parametrize("shape", [(9, 11), (41, 37)])  # one block; several, the last partial
def test_kernel_equals_the_numpy_formulation(dtype, nan_rule, shape):
    assert shape[0] * shape[1] < BLOCK_PX or shape[0] * shape[1] % BLOCK_PX
    maps, ids, sims = database_and_queries(dtype, shape=shape)
    thickness, std, share = numpy_synthesize(gathered(maps, ids), sims, nan_rule=nan_rule)
    assert np.isnan(thickness).any() and np.isfinite(thickness).any()
    for got in (
        synthesize_rows(maps, ids, sims, nan_rule=nan_rule),  # rows read in place
        synthesize(gathered(maps, ids), sims, nan_rule=nan_rule),  # maps gathered, float32
        synthesize(maps[np.where(ids >= 0, ids, 0)], sims, nan_rule=nan_rule)  # stored dtype
        if (ids >= 0).all()
        else None,
    ):
        if got is None:
            continue
        assert got.thickness_mm.dtype == np.float32 and got.thickness_mm.shape == (5, *shape)
        np.testing.assert_array_equal(np.isnan(got.thickness_mm), np.isnan(thickness))
        np.testing.assert_allclose(got.thickness_mm, thickness, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.std_mm, std, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.cartilage_share, share, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got.weights, similarity_weights(sims))
    # the unbatched form of one query
    one = synthesize_rows(maps, ids[0], sims[0], nan_rule=nan_rule)
    np.testing.assert_allclose(one.thickness_mm[0], thickness[0], atol=1e-5)


@pytest.mark.parametrize("nan_rule", NAN_RULES)
def test_kernel_majority_threshold_and_no_neighbours(nan_rule):
    maps, ids, sims = database_and_queries(np.float32)
    for share in (0.3, 0.75, 1.0):
        want = numpy_synthesize(gathered(maps, ids), sims, share, nan_rule)[0]
        got = synthesize_rows(maps, ids, sims, share, nan_rule).thickness_mm
        np.testing.assert_allclose(got, want, atol=1e-5)
    # only "no result" slots, or no neighbour at all: nothing is cartilage
    empty = synthesize_rows(maps, [[-1, -1]], [[-np.inf, -3.4e38]], nan_rule=nan_rule)
    assert np.isnan(empty.thickness_mm).all() and np.isnan(empty.std_mm).all()
    none = synthesize(np.zeros((1, 0, 4, 5), np.float32), np.zeros((1, 0)), nan_rule=nan_rule)
    assert none.thickness_mm.shape == (1, 4, 5) and np.isnan(none.thickness_mm).all()
    want = numpy_synthesize(np.zeros((1, 0, 4, 5), np.float32), np.zeros((1, 0)), 0.5, nan_rule)
    np.testing.assert_array_equal(none.cartilage_share, want[2])


def test_rows_read_in_place_keep_a_near_zero_spread_at_zero():
    # identical neighbours at thick cartilage: the spread must be 0, not float32 cancellation
    maps = np.full((4, 40, 40), 5.4980, np.float32)
    maps[:, :, :5] = np.nan
    out = synthesize_rows(maps, [[0, 1, 2, 3, 1]], [[0.9, 0.7, 0.6, 0.4, 0.3]])
    np.testing.assert_allclose(out.thickness_mm[0, :, 5:], 5.4980, atol=1e-6)
    assert np.nanmax(out.std_mm) < 1e-6
    assert np.isnan(out.thickness_mm[0, :, :5]).all()


def test_rows_refused_past_the_array_and_bad_shapes():
    maps = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(IndexError):
        synthesize_rows(maps, [[0, 3]], [[0.5, 0.4]])
    with pytest.raises(ValueError):
        synthesize_rows(maps, [[0, 1]], [[0.5, 0.4, 0.3]])
    with pytest.raises(ValueError):
        synthesize_rows(maps[0], [[0]], [[0.5]])
    with pytest.raises(ValueError, match="nan_rule"):
        synthesize_rows(maps, [[0]], [[0.5]], nan_rule="any")


def test_warm_up_and_other_dtypes():
    warm_up("float32")
    warm_up(np.float16)
    maps, ids, sims = database_and_queries(np.float64)
    want = numpy_synthesize(gathered(maps, ids), sims)[0]
    np.testing.assert_allclose(synthesize_rows(maps, ids, sims).thickness_mm, want, atol=1e-5)
    readonly = maps.astype(np.float32)
    readonly.flags.writeable = False
    np.testing.assert_allclose(synthesize_rows(readonly, ids, sims).thickness_mm, want, atol=1e-5)


def test_kernel_runs_without_a_writable_numba_cache(tmp_path):
    """numba raises at decoration when no cache directory is writable; the kernel then compiles
    without a cache. A file as NUMBA_CACHE_DIR's parent cannot be written, even by root."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(blocker / "numba"),
        "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator",
    }
    code = (
        "import numpy as np; from mris.synthesis import synthesize_rows; "
        "out = synthesize_rows(np.full((2, 3, 3), 2.0, np.float16), [[0, 1]], [[0.6, 0.4]]); "
        "assert np.allclose(out.thickness_mm, 2.0) and np.allclose(out.std_mm, 0.0); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
