"""mris.imageops.resize: shapes, dtype, anti-aliasing, no ringing, sub-pixel box."""

from __future__ import annotations

import numpy as np
import pytest

from mris.imageops import resize


def test_shape_dtype_and_identity():
    image = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = resize(image, (3, 4))
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, image)
    assert resize(image, (6, 2)).shape == (6, 2)


def test_downscaling_is_anti_aliased():
    checker = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    small = resize(checker, (32, 32))
    np.testing.assert_allclose(small, 0.5, atol=0.01)  # aliasing would give 0s and 1s


def test_no_overshoot():
    step = np.zeros((64, 64), dtype=np.float32)
    step[:, 32:] = 1.0
    for shape in ((16, 16), (200, 200), (37, 91)):
        out = resize(step, shape)
        assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


def test_box_resamples_a_sub_rectangle():
    ramp = np.tile(np.arange(100, dtype=np.float32), (10, 1))
    out = resize(ramp, (10, 10), box=(20.0, 0.0, 30.0, 10.0))
    np.testing.assert_allclose(out[0], np.arange(20, 30), atol=0.51)


def test_bad_input():
    with pytest.raises(ValueError):
        resize(np.zeros((2, 2, 2), dtype=np.float32), (1, 1))
    with pytest.raises(ValueError):
        resize(np.zeros((2, 2), dtype=np.float32), (0, 1))
