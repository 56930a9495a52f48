"""The cpu backend's fast activations: float32 GELU (a rational approximation
of erf) within its stated error, silu through exp at its limits, float64
through scipy's erf."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.special import erf, expit

import topk_moe.cpu as cpu


def exact_gelu(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.float64)
    return 0.5 * h * (1 + erf(h / math.sqrt(2)))


def test_float32_gelu_is_within_its_stated_error():
    h = np.linspace(-12, 12, 2_000_001).astype(np.float32)
    computed = h.copy()
    cpu._activate(computed, None, "gelu")
    error = np.abs(computed.astype(np.float64) - exact_gelu(h)) / np.maximum(1, np.abs(h))
    assert error.max() <= 3.1e-7
    assert computed[h >= cpu.GELU_CLIP].tolist() == h[h >= cpu.GELU_CLIP].tolist()  # Phi(h) is 1 in float32
    assert computed[h == 0].tolist() == [0.0]


def test_gelu_polynomials_are_the_erf_rational_rewritten():
    """0.5 erf(s) from Eigen's rational in s and from the rewritten one in u = 2 s^2 agree (float64)."""
    s = np.linspace(-4, 4, 1001)
    numerator = np.polyval(cpu.ERF_NUMERATOR, s * s)
    denominator = np.polyval(cpu.ERF_DENOMINATOR, s * s)
    c = s * math.sqrt(2)
    rewritten = c * np.polyval((1.0,) + cpu.GELU_NUMERATOR, c * c) / np.polyval(cpu.GELU_DENOMINATOR, c * c)
    np.testing.assert_allclose(rewritten, 0.5 * s * numerator / denominator, rtol=1e-12, atol=1e-15)


def test_float64_gelu_uses_scipys_erf():
    h = np.linspace(-6, 6, 10_001)
    computed = h.copy()
    cpu._activate(computed, None, "gelu")
    np.testing.assert_allclose(computed, exact_gelu(h), rtol=1e-11, atol=1e-300)  # float64 rounding only


def test_swiglu_gives_silu_times_gate_at_its_limits_without_warnings():
    hidden = np.array([-1e4, -200, -88, -1, 0, 1, 88, 200, 1e4], dtype=np.float32)
    gate = np.full_like(hidden, 3)
    expected = hidden.astype(np.float64) * expit(hidden.astype(np.float64)) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning from exp(-h) would fail here
        cpu._activate(hidden, gate, "swiglu")
    np.testing.assert_allclose(hidden, expected, rtol=1e-6, atol=1e-30)
    assert np.isfinite(hidden).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_is_max_of_h_and_zero(dtype):
    """The clip to [0, inf] the backend uses for relu gives max(h, 0) everywhere
    (infinities and NaN included) except the sign of a zero."""
    special = np.array([-0.0, 0.0, -1.0, 2.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, -3e38], dtype=dtype)
    hidden = np.concatenate([special, np.random.default_rng(0).standard_normal(990).astype(dtype)]).reshape(10, 100)
    expected = np.maximum(hidden, 0)
    computed = hidden.copy()
    cpu._activate(computed, None, "relu")
    np.testing.assert_array_equal(computed, expected)  # NaN equals NaN here; -0 equals +0
    assert computed.dtype == dtype and (np.signbit(computed) == (hidden == 0) & np.signbit(hidden)).all()
