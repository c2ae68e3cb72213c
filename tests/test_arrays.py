"""The one row normalisation and the one softmax every stage uses."""

import numpy as np
import pytest

from fiftyone_nola.core.arrays import l2_normalize, softmax


def test_l2_normalize_rows_zero_and_nan():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0]])
    kept = l2_normalize(x)
    np.testing.assert_allclose(kept[0], [0.6, 0.8])
    assert kept.dtype == np.float32 and np.array_equal(kept[1], [0.0, 0.0])
    assert np.isnan(kept[2, 0])  # a NaN row is not made finite
    missing = l2_normalize(x, zero_rows="nan")
    assert np.isnan(missing[1]).all() and np.isnan(missing[2]).any()
    assert x[0, 0] == 3.0  # a copy: the caller's array is untouched
    crops = l2_normalize(np.ones((2, 3, 4)))  # last axis of any rank
    np.testing.assert_allclose(np.linalg.norm(crops, axis=-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        l2_normalize(x, zero_rows="drop")


def test_softmax_last_axis_stable_and_nan_rows():
    p = softmax(np.array([[1e4, 1e4 - 1.0, -1e4], [np.nan, 0.0, 0.0]]))
    np.testing.assert_allclose(p[0].sum(), 1.0, rtol=1e-6)
    assert p[0, 0] > p[0, 1] > p[0, 2] and np.isnan(p[1]).all()
    assert softmax(np.zeros((2, 3, 5))).shape == (2, 3, 5)
