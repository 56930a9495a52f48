"""The project's one tolerance rule, and the plain implementations it needs.

A backend's result passes when its largest error against the float64
reference is at most twice the largest error of a *plain* implementation in
the same dtype (the reference's own code run in that dtype), plus a floor of a
few units in the last place of the result's magnitude:

    max|actual - expected| <= 2 * max|plain - expected| + 4 * eps(dtype) * scale

`scale` is the magnitude of the terms summed into the result (`moe_term_scale`,
`dense_term_scale`; max|expected| when not given). It matters where the plain
error is zero, as for float64 inputs, whose plain run *is* the reference: a
result much smaller than its terms (cancellation) still carries the rounding
of those terms, a few eps of their size, not of its own.

This is the flash-attention rule: it scales with what the dtype can do at this
shape and never needs a hand-tuned atol per test. Routing is taken as given
(the tested backend's expert choices), because near-ties may legitimately
pick different experts in float32 than in float64; routing agreement is tested
separately, on tokens with a clear margin.

Arrays may be NumPy or anything with `.get()` (CuPy); they are brought to the host.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import reference
from .api import capacity
from .types import MoEConfig, MoEWeights, Routing

ERROR_MULTIPLE = 2.0
FLOOR_ULPS = 4.0


def to_host(a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


def forward_with_experts(x, weights: MoEWeights, cfg: MoEConfig, experts, dtype) -> np.ndarray:
    """moe_forward computed by the reference's code in `dtype`, with the expert
    choices fixed to `experts` (T, K); routing weights are recomputed in `dtype`."""
    dtype = np.dtype(dtype)
    x = to_host(x).astype(dtype)
    router, w1, w2 = (to_host(a).astype(dtype) for a in (weights.router, weights.w1, weights.w2))
    w3 = None if weights.w3 is None else to_host(weights.w3).astype(dtype)
    experts = to_host(experts).astype(np.int64)

    probs = reference.softmax(x @ router)
    routing_weights = np.take_along_axis(probs, experts, axis=1)
    if cfg.renormalize:
        routing_weights = routing_weights / routing_weights.sum(axis=1, keepdims=True)
    plan = reference.dispatch(experts, cfg.n_experts, capacity(cfg, x.shape[0]))
    rows = reference.permute(x, plan)
    expert_out = reference.expert_mlp(rows, plan.offsets, w1, w2, w3, cfg.activation)
    return reference.combine(expert_out, routing_weights, plan.row)


def plain_moe_forward(x, weights: MoEWeights, cfg: MoEConfig, routing: Routing) -> np.ndarray:
    """A plain implementation in x's dtype, routed like `routing`."""
    return forward_with_experts(x, weights, cfg, routing.experts, to_host(x).dtype)


def expected_moe_forward(x, weights: MoEWeights, cfg: MoEConfig, routing: Routing) -> np.ndarray:
    """The float64 reference, routed like `routing`."""
    return forward_with_experts(x, weights, cfg, routing.experts, np.float64)


def plain_dense_mlp(x, w1, w2, w3=None, activation: str = "relu") -> np.ndarray:
    """The dense MLP by the reference's code in x's dtype."""
    x = to_host(x)
    arrays = [None if a is None else to_host(a).astype(x.dtype) for a in (w1, w2, w3)]
    return reference.mlp(x, *arrays, activation)


def expected_dense_mlp(x, w1, w2, w3=None, activation: str = "relu") -> np.ndarray:
    arrays = [None if a is None else to_host(a).astype(np.float64) for a in (x, w1, w2, w3)]
    return reference.mlp(arrays[0], *arrays[1:], activation)


def _hidden_term_scale(x, w1, w3, activation):
    """An upper bound on |hidden| built from absolute values: |act(v)| <= |v| for
    relu, gelu and silu, so |x| @ |w1| (times |x| @ |w3| for swiglu) bounds it."""
    hidden = np.abs(x) @ np.abs(w1)
    if activation == "swiglu":
        hidden = hidden * (np.abs(x) @ np.abs(w3))
    return hidden


def dense_term_scale(x, w1, w2, w3=None, activation: str = "relu") -> float:
    """The size of the terms summed into dense_mlp's output (see the module docstring)."""
    x, w1, w2 = (to_host(a).astype(np.float64) for a in (x, w1, w2))
    w3 = None if w3 is None else to_host(w3).astype(np.float64)
    if x.size == 0:
        return 0.0
    return float(np.max(_hidden_term_scale(x, w1, w3, activation) @ np.abs(w2)))


def moe_term_scale(x, weights: MoEWeights, cfg: MoEConfig, experts) -> float:
    """The size of the terms summed into moe_forward's output, routed by `experts`
    (routing weights are at most 1, so they are left out of the bound)."""
    x = to_host(x).astype(np.float64)
    w1, w2 = (to_host(a).astype(np.float64) for a in (weights.w1, weights.w2))
    w3 = None if weights.w3 is None else to_host(weights.w3).astype(np.float64)
    experts = to_host(experts)
    if x.size == 0:
        return 0.0
    scale = 0.0
    for e in np.unique(experts):
        tokens = np.nonzero((experts == e).any(axis=1))[0]
        gate = None if w3 is None else w3[e]
        terms = _hidden_term_scale(x[tokens], w1[e], gate, cfg.activation) @ np.abs(w2[e])
        scale = max(scale, float(np.max(terms)) * experts.shape[1])
    return scale


def error_bound(expected, plain, dtype, scale: Optional[float] = None) -> float:
    """The largest error the rule allows a `dtype` result at this case."""
    expected = to_host(expected).astype(np.float64)
    plain = to_host(plain).astype(np.float64)
    if expected.size == 0:
        return 0.0
    plain_error = float(np.max(np.abs(plain - expected)))
    if scale is None:
        scale = float(np.max(np.abs(expected)))
    floor = FLOOR_ULPS * float(np.finfo(dtype).eps) * scale
    return ERROR_MULTIPLE * plain_error + floor


def assert_close_to_reference(actual, expected, plain, *, name: str = "result",
                              dtype: Optional[Any] = None, scale: Optional[float] = None) -> None:
    """Fail with the measured numbers when `actual` breaks the tolerance rule."""
    actual = to_host(actual)
    dtype = np.dtype(dtype if dtype is not None else actual.dtype)
    expected64 = to_host(expected).astype(np.float64)
    if actual.shape != expected64.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != expected {expected64.shape}")
    if actual.size == 0:
        return
    error = float(np.max(np.abs(actual.astype(np.float64) - expected64)))
    bound = error_bound(expected64, plain, dtype, scale)
    if not error <= bound:  # also fails on NaN
        raise AssertionError(
            f"{name}: max error {error:.3e} against the float64 reference exceeds the bound {bound:.3e} "
            f"({ERROR_MULTIPLE:g} x the plain {dtype} implementation's error + floor)"
        )
