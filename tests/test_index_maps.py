"""mris.index.maps: MapsWriter -> MapStore round trips, compaction, appends, and refused files."""

from __future__ import annotations

import numpy as np
import pytest

from mris.errors import BadParameter, BundleInvalid
from mris.index.maps import MapStore, MapsWriter, prepend_maps


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
