"""The cpu backend's fast activations: float32 erf (a rational approximation)
within its stated error, silu through exp at its limits, float64 unchanged."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import erf, expit

import kernels.cpu as cpu


def test_float32_erf_is_within_its_stated_error():
    x = np.linspace(-10, 10, 2_000_001).astype(np.float32)
    approximated = x.copy()
    cpu._erf_into(approximated)
    error = np.abs(approximated.astype(np.float64) - erf(x.astype(np.float64)))
    assert error.max() <= 4.3e-7
    assert approximated[np.abs(x) >= 4].tolist() == np.sign(x[np.abs(x) >= 4]).tolist()  # exactly +-1
    assert approximated[x == 0].tolist() == [0.0]


def test_float64_erf_is_scipys():
    x = np.linspace(-6, 6, 10_001)
    computed = x.copy()
    cpu._erf_into(computed)
    np.testing.assert_array_equal(computed, erf(x))


def test_swiglu_gives_silu_times_gate_at_its_limits_without_warnings():
    hidden = np.array([-1e4, -200, -88, -1, 0, 1, 88, 200, 1e4], dtype=np.float32)
    gate = np.full_like(hidden, 3)
    expected = hidden.astype(np.float64) * expit(hidden.astype(np.float64)) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning from exp(-h) would fail here
        cpu._activate(hidden, gate, "swiglu")
    np.testing.assert_allclose(hidden, expected, rtol=1e-6, atol=1e-30)
    assert np.isfinite(hidden).all()
