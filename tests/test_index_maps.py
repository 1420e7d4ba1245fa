"""mris.index.maps: MapsWriter -> MapStore round trips, compaction, appends, refused files, and
eq. 4 over a store's rows read in place (``MapStore.synthesize``, the pipeline's path)."""

from __future__ import annotations

import numpy as np
import pytest

from mris.errors import BadParameter, BundleInvalid
from mris.index.maps import MapStore, MapsWriter, prepend_maps
from mris.pipeline import Hits, synthesize_maps
from mris.synthesis import NAN_RULES, synthesize


def thickness_maps(n, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0.5, 3.5, (n, h, w)).astype(np.float32)
    maps[:, 0, :] = np.nan  # outside cartilage
    return maps


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("resident", [False, True])
def test_writer_store_round_trip(tmp_path, dtype, resident):
    maps = thickness_maps(7)
    writer = MapsWriter(tmp_path / "maps-fc.npy", 7, dtype)
    for row in (3, 0, 6, 1, 2, 5, 4):  # rows arrive in any order
        writer.write(row, maps[row])
    assert writer.finish() == (7, 6, 5)
    store = MapStore(tmp_path / "maps-fc.npy", resident=resident, shape=(7, 6, 5), dtype=dtype)
    ids = np.array([[4, -1, 0], [6, 6, 2]])
    got = store.rows(ids)
    assert got.dtype == np.float32 and got.shape == (2, 3, 6, 5)
    want = maps.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(got[0, 0], want[4])
    np.testing.assert_array_equal(got[1, 2], want[2])
    assert np.isnan(got[0, 1]).all()  # id -1: no neighbour
    np.testing.assert_array_equal(np.asarray(store.array, np.float32), want)
    store.close()


def test_write_block_and_compaction_keep_row_order(tmp_path):
    maps = thickness_maps(5, seed=1)
    writer = MapsWriter(tmp_path / "maps-tc.npy", 5, "float32")
    writer.write_block(0, maps[:3])
    writer.write_block(3, maps[3:])
    keep = np.array([True, False, True, True, False])
    assert writer.finish(keep) == (3, 6, 5)
    assert not list(tmp_path.glob("*.compact.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "maps-tc.npy"), maps[keep])


def test_prepend_puts_the_base_rows_first(tmp_path):
    base, new = thickness_maps(3, seed=2), thickness_maps(2, seed=3)
    np.save(tmp_path / "base.npy", base)
    np.save(tmp_path / "new.npy", new)
    assert prepend_maps(tmp_path / "base.npy", tmp_path / "new.npy") == (5, 6, 5)
    np.testing.assert_array_equal(np.load(tmp_path / "new.npy"), np.concatenate([base, new]))
    assert not list(tmp_path.glob("*.append.npy"))


def test_writer_refuses_bad_dtype_and_empty_finish(tmp_path):
    with pytest.raises(BadParameter):
        MapsWriter(tmp_path / "maps-fc.npy", 3, "float64")
    with pytest.raises(BundleInvalid):
        MapsWriter(tmp_path / "maps-fc.npy", 3, "float32").finish()


def test_store_refuses_corrupt_and_mismatched_files(tmp_path):
    path = tmp_path / "maps-fc.npy"
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(BundleInvalid):
        MapStore(path)
    np.save(path, np.zeros((4, 6), np.float32))  # not [rows, H, W]
    with pytest.raises(BundleInvalid):
        MapStore(path)
    np.save(path, thickness_maps(4))
    with pytest.raises(BundleInvalid):
        MapStore(path, shape=(5, 6, 5))  # the card says another shape
    with pytest.raises(BundleInvalid):
        MapStore(path, dtype="float16")
    with open(path, "r+b") as handle:  # truncated data section
        handle.truncate(path.stat().st_size - 7)
    with pytest.raises(BundleInvalid):
        MapStore(path)


def test_store_refuses_out_of_range_rows(tmp_path):
    np.save(tmp_path / "maps-fc.npy", thickness_maps(3))
    store = MapStore(tmp_path / "maps-fc.npy")
    with pytest.raises(IndexError):
        store.rows(np.array([3]))
    store.close()


def _store_file(tmp_path, dtype, rows=12, seed=4):
    maps = thickness_maps(rows, h=19, w=31, seed=seed)  # 589 pixels: two kernel blocks
    maps[rows // 2 :, 5:, :8] = np.nan  # a region only half the neighbours have
    path = tmp_path / f"maps-{dtype}.npy"
    writer = MapsWriter(path, rows, dtype)
    writer.write_block(0, maps)
    writer.finish()
    return path


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("nan_rule", NAN_RULES)
def test_synthesize_in_place_equals_synthesize_of_the_rows(tmp_path, dtype, resident, nan_rule):
    store = MapStore(_store_file(tmp_path, dtype), resident=resident)
    ids = np.array([[3, 7, 0, 11, 5], [2, 9, 10, -1, -1]])  # a FAISS-padded query
    sims = np.array([[0.9, 0.8, 0.6, 0.5, -0.1], [0.7, 0.6, 0.5, -np.inf, -3.4e38]], np.float32)
    want = synthesize(store.rows(ids), sims, nan_rule=nan_rule)
    got = store.synthesize(ids, sims, nan_rule=nan_rule)
    assert got.nan_rule == nan_rule and got.thickness_mm.shape == (2, 19, 31)
    assert np.isfinite(got.thickness_mm).any() and np.isnan(got.thickness_mm).any()
    np.testing.assert_array_equal(np.isnan(got.thickness_mm), np.isnan(want.thickness_mm))
    np.testing.assert_allclose(got.thickness_mm, want.thickness_mm, atol=1e-5)
    np.testing.assert_allclose(got.std_mm, want.std_mm, atol=1e-5)
    np.testing.assert_allclose(got.cartilage_share, want.cartilage_share, atol=1e-6)
    with pytest.raises(IndexError):
        store.synthesize(np.array([[0, 12]]), sims[:1, :2])
    store.close()


class _Stores:
    """``NeighbourMaps`` over two ``MapStore``s; ``in_place`` adds ``synthesize_neighbours``
    as ``IndexBundle`` has it."""

    def __init__(self, stores: dict[str, MapStore]) -> None:
        self.stores = stores

    def cartilages(self, region: str) -> list[str]:
        return [region]

    def neighbour_maps(self, cartilage, row_ids):
        return self.stores[cartilage].rows(row_ids)


class _InPlaceStores(_Stores):
    def synthesize_neighbours(self, cartilage, row_ids, similarities, nan_rule):
        return self.stores[cartilage].synthesize(row_ids, similarities, nan_rule=nan_rule)


@pytest.mark.parametrize("nan_rule", NAN_RULES)
def test_pipeline_step_reads_in_place_with_the_same_answer(tmp_path, nan_rule):
    stores = {
        "fc": MapStore(_store_file(tmp_path, "float16", seed=5), resident=True),
        "tc": MapStore(_store_file(tmp_path, "float32", seed=6)),
    }
    hits = {
        "fc": Hits(np.array([0.9, 0.7, 0.4, -3.4e38], np.float32), np.array([4, 1, 8, -1])),
        "tc": Hits(np.array([0.8, 0.6, 0.5], np.float32), np.array([2, 6, 10])),
    }
    gathered = synthesize_maps(hits, _Stores(stores), 20, nan_rule)
    in_place = synthesize_maps(hits, _InPlaceStores(stores), 20, nan_rule)
    assert in_place.nan_rule == nan_rule and list(in_place.maps_mm) == ["fc", "tc"]
    for name in ("fc", "tc"):
        np.testing.assert_allclose(in_place.maps_mm[name], gathered.maps_mm[name], atol=1e-5)
        np.testing.assert_allclose(in_place.std_mm[name], gathered.std_mm[name], atol=1e-5)
        assert np.isfinite(in_place.maps_mm[name]).any()
    for store in stores.values():
        store.close()
