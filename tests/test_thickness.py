"""mris.thickness: loading, validation, encoder inputs."""

from __future__ import annotations

import numpy as np
import pytest

from mris.constants import PreprocessConfig
from mris.errors import InvalidThicknessMap
from mris.thickness import combined_input, load_thickness_map, map_to_input

CONFIG = PreprocessConfig(encoder_px=32)


def _map(value: float = 3.0, size: int = 64) -> np.ndarray:
    thickness = np.full((size, size), np.nan, dtype=np.float32)
    thickness[16:48, 8:56] = value
    return thickness


def test_load_round_trip(tmp_path):
    path = tmp_path / "FC_2d_thickness.npy"
    np.save(path, _map().astype(np.float64))
    loaded = load_thickness_map(path)
    assert loaded.dtype == np.float32 and loaded.shape == (64, 64)
    assert np.isnan(loaded[0, 0]) and loaded[20, 20] == 3.0


@pytest.mark.parametrize(
    "array, why",
    [
        (np.zeros((4, 4, 2), dtype=np.float32), "2-D"),
        (np.zeros((8, 8), dtype=np.int32), "floating"),
        (np.full((8, 8), np.nan, dtype=np.float32), "NaN everywhere"),
        (np.where(np.eye(8) > 0, np.inf, 1.0).astype(np.float32), "infinite"),
    ],
)
def test_invalid_maps(tmp_path, array, why):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(InvalidThicknessMap, match=why):
        load_thickness_map(path)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(InvalidThicknessMap, match="does not exist"):
        load_thickness_map(tmp_path / "nope.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InvalidThicknessMap, match="readable"):
        load_thickness_map(tmp_path / "junk.npy")


def test_map_to_input_nan_zero_scale_resize():
    encoded = map_to_input(_map(3.0), CONFIG)
    assert encoded.shape == (32, 32) and encoded.dtype == np.float32
    assert np.isfinite(encoded).all()
    assert encoded[0, 0] == 0.0  # NaN -> 0
    assert encoded[16, 16] == pytest.approx(1.0)  # 3 mm / 3.0, inside the cartilage
    assert encoded.min() >= 0.0 and encoded.max() <= 1.0 + 1e-6  # no ringing


def test_combined_stacks_fc_over_tc():
    fc, tc = _map(3.0), _map(1.5)
    combined = combined_input(fc, tc, CONFIG)
    assert combined.shape == (64, 32)
    np.testing.assert_array_equal(combined[:32], map_to_input(fc, CONFIG))
    np.testing.assert_array_equal(combined[32:], map_to_input(tc, CONFIG))
