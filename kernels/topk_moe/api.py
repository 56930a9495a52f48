"""The public functions of the contract (see book/contract.md).

Each function checks its arguments once, here, for every backend (shapes,
widths, k, activation, dtypes, finiteness), then hands plain arrays to the
backend module chosen by `backends.resolve`. The backend modules assume valid
input and hold only the computation.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import numpy as np

from . import checks
from .backends import resolve
from .types import DispatchPlan, MoEConfig, MoEOutput, MoEWeights, Routing


def _float_inputs(impl, arrays: dict) -> list:
    """Check every float input's dtype for this backend and convert it to the
    backend's compute dtype. Backends that compute in the input's dtype need all
    inputs in one dtype: the first argument's."""
    first_name, first = next(iter(arrays.items()))
    first_dtype = checks.check_float_dtype(first_name, first, impl.float_dtypes, impl.name)
    for name, a in arrays.items():
        if a is not None:
            checks.check_float_dtype(name, a, impl.float_dtypes, impl.name)
    if impl.float_dtypes is not None:
        rest = {name: a for name, a in arrays.items() if name != first_name}
        checks.check_same_dtype(first_name, first_dtype, rest)
    return [None if a is None else impl.to_compute(a) for a in arrays.values()]


def _check_finite(impl, arrays: dict) -> None:
    for name, a in arrays.items():
        if not impl.all_finite(a):
            raise ValueError(f"{name}: expected finite values, got non-finite entries (NaN or infinity)")


def _finite_check_on_device(impl, check_finite: Any) -> bool:
    """Whether the backend checks x and router for NaN and infinity itself
    (the cuda backend: a flag raised by its router kernel, read back once);
    only such a backend may be told to skip the check (check_finite=False,
    for CUDA graph capture and timing)."""
    if not isinstance(check_finite, (bool, np.bool_)):
        raise TypeError(f"check_finite: expected a bool, got {check_finite!r}")
    on_device = bool(getattr(impl, "checks_finite_on_device", False))
    if not check_finite and not on_device:
        raise ValueError(
            f"check_finite: expected True for backend {impl.name!r} (only the 'cuda' backend "
            f"may skip the finiteness check), got False"
        )
    return on_device


def _route(impl, x, router, k: int, renormalize: bool, check_finite: bool, on_device: bool) -> Routing:
    if on_device:
        return impl.route(x, router, k, renormalize, check_finite=bool(check_finite))
    return impl.route(x, router, k, renormalize)


def _check_weights(weights: MoEWeights, cfg: MoEConfig) -> None:
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg: expected a topk_moe.MoEConfig, got {type(cfg).__name__}")
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected a topk_moe.MoEWeights, got {type(weights).__name__}")
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    checks.check_shape("router", weights.router, (D, E), "(D, E)")
    checks.check_shape("w1", weights.w1, (E, D, F), "(E, D, F)")
    checks.check_shape("w2", weights.w2, (E, F, D), "(E, F, D)")
    checks.check_gate(cfg.activation, weights.w3)
    if weights.w3 is not None:
        checks.check_shape("w3", weights.w3, (E, D, F), "(E, D, F)")


def capacity(cfg: MoEConfig, n_tokens: int) -> Optional[int]:
    """Kept assignments per expert: ceil(capacity_factor * T * K / E), or None (dropless).

    Evaluated in floating point left to right, exactly as written, so every
    caller that writes the formula the same way gets the same number.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral) or n_tokens < 0:
        raise ValueError(f"n_tokens: expected a non-negative integer, got {n_tokens!r}")
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * int(n_tokens) * cfg.top_k / cfg.n_experts)


def init_weights(cfg: MoEConfig, *, seed: int = 0, dtype: Any = np.float32) -> MoEWeights:
    """Random weights for `cfg`, reproducible from `seed`.

    Entries are normal with standard deviation 1/sqrt(fan-in) (router and
    w1, w3: 1/sqrt(D); w2: 1/sqrt(F)), drawn in float64 and then cast, so
    the same seed gives the same weights in every dtype up to rounding.
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg: expected a topk_moe.MoEConfig, got {type(cfg).__name__}")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    rng = np.random.default_rng(seed)
    router = rng.standard_normal((D, E)) / math.sqrt(D)
    w1 = rng.standard_normal((E, D, F)) / math.sqrt(D)
    w2 = rng.standard_normal((E, F, D)) / math.sqrt(F)
    w3 = rng.standard_normal((E, D, F)) / math.sqrt(D) if cfg.has_gate else None
    return MoEWeights(
        router=router.astype(dtype),
        w1=w1.astype(dtype),
        w2=w2.astype(dtype),
        w3=None if w3 is None else w3.astype(dtype),
    )


def route(x, router, k: int, *, renormalize: bool = True, backend: Optional[str] = None,
          check_finite: bool = True) -> Routing:
    """Top-k routing: softmax(x @ router) and each token's k best experts.

    x (T, D), router (D, E) -> Routing(experts (T, k) int32, weights (T, k), probs (T, E)).
    Ties go to the smaller expert index; with `renormalize` the k weights sum to 1.
    NaN or infinity in x or router: ValueError. `check_finite=False` skips that
    check (and its wait for the device); only the "cuda" backend accepts it.
    """
    impl = resolve(backend)
    on_device = _finite_check_on_device(impl, check_finite)
    (T, D) = checks.check_rank("x", x, 2, "(T, D)")
    (router_rows, E) = checks.check_rank("router", router, 2, "(D, E)")
    checks.check_dim("router", "D rows", router_rows, D, "x's width")
    k = checks.check_k(k, E)
    x, router = _float_inputs(impl, {"x": x, "router": router})
    if not on_device:
        _check_finite(impl, {"x": x, "router": router})
    return _route(impl, x, router, k, bool(renormalize), check_finite, on_device)


def dispatch(experts, n_experts: int, *, capacity: Optional[int] = None,
             backend: Optional[str] = None) -> DispatchPlan:
    """Group the (token, choice) assignments by expert, j-major, keeping at most
    `capacity` per expert (None: keep all). See DispatchPlan for the fields."""
    impl = resolve(backend)
    n_experts = checks.check_n_experts(n_experts)
    (T, K) = checks.check_rank("experts", experts, 2, "(T, K)")
    if K not in (1, 2):
        raise ValueError(f"experts: expected K = 1 or 2 columns (T, K), got {K}")
    checks.check_index_dtype("experts", experts)
    capacity = checks.check_capacity(capacity)
    experts = impl.to_index(experts)
    if T > 0:
        low, high = int(experts.min()), int(experts.max())
        if low < 0 or high >= n_experts:
            raise ValueError(
                f"experts: expected expert indices in [0, {n_experts}) for n_experts={n_experts}, "
                f"got values from {low} to {high}"
            )
    return impl.dispatch(experts, n_experts, capacity)


def _check_plan(plan: DispatchPlan, n_experts: Optional[int] = None) -> None:
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan: expected a topk_moe.DispatchPlan, got {type(plan).__name__}")
    if n_experts is not None:
        checks.check_shape("plan.offsets", plan.offsets, (n_experts + 1,), "(E+1,)")


def permute(x, plan: DispatchPlan, *, backend: Optional[str] = None):
    """Gather tokens into expert order: row i of the result is x[plan.token[i]]. -> (N, D)"""
    impl = resolve(backend)
    checks.check_rank("x", x, 2, "(T, D)")
    _check_plan(plan)
    (x,) = _float_inputs(impl, {"x": x})
    return impl.permute(x, plan)


def expert_mlp(rows, plan: DispatchPlan, w1, w2, w3=None, *, activation: str = "swiglu",
               backend: Optional[str] = None):
    """Apply expert e to its rows plan.offsets[e]:plan.offsets[e+1]. rows (N, D) -> (N, D)."""
    impl = resolve(backend)
    activation = checks.check_activation(activation)
    (N, D) = checks.check_rank("rows", rows, 2, "(N, D)")
    (E, w1_rows, F) = checks.check_rank("w1", w1, 3, "(E, D, F)")
    checks.check_dim("w1", "D", w1_rows, D, "the width of rows")
    checks.check_shape("w2", w2, (E, F, D), "(E, F, D)")
    checks.check_gate(activation, w3)
    if w3 is not None:
        checks.check_shape("w3", w3, (E, D, F), "(E, D, F)")
    _check_plan(plan, E)
    checks.check_dim("rows", "N rows", N, plan.n_kept, "the plan's kept assignments")
    rows, w1, w2, w3 = _float_inputs(impl, {"rows": rows, "w1": w1, "w2": w2, "w3": w3})
    return impl.expert_mlp(rows, plan.offsets, w1, w2, w3, activation)


def combine(expert_out, routing: Routing, plan: DispatchPlan, *, backend: Optional[str] = None):
    """y[t] = sum over kept j, in j order, of routing.weights[t, j] * expert_out[plan.row[t, j]]."""
    impl = resolve(backend)
    (N, D) = checks.check_rank("expert_out", expert_out, 2, "(N, D)")
    _check_plan(plan)
    checks.check_dim("expert_out", "N rows", N, plan.n_kept, "the plan's kept assignments")
    checks.check_shape("routing.weights", routing.weights, checks.shape_of(plan.row), "(T, K)")
    expert_out, weights = _float_inputs(impl, {"expert_out": expert_out, "routing.weights": routing.weights})
    return impl.combine(expert_out, weights, plan.row)


def moe_forward(x, weights: MoEWeights, cfg: MoEConfig, *, backend: Optional[str] = None,
                check_finite: bool = True) -> MoEOutput:
    """The whole MoE layer: route, dispatch (with cfg's capacity), expert MLPs, combine.

    y[t] = sum over kept j of routing.weights[t, j] * expert_{experts[t, j]}(x[t]);
    a token whose assignments were all dropped gets y[t] = 0.
    `check_finite=False` (the "cuda" backend only) skips the NaN/infinity check
    of x and router, so that a dropless layer never waits for the device.
    """
    impl = resolve(backend)
    on_device = _finite_check_on_device(impl, check_finite)
    _check_weights(weights, cfg)
    (T, D) = checks.check_rank("x", x, 2, "(T, D)")
    checks.check_dim("x", "D columns", D, cfg.d_model, "cfg.d_model")
    x, router, w1, w2, w3 = _float_inputs(
        impl, {"x": x, "router": weights.router, "w1": weights.w1, "w2": weights.w2, "w3": weights.w3}
    )
    if not on_device:
        _check_finite(impl, {"x": x, "router": router})
    expert_capacity = capacity(cfg, T)
    if hasattr(impl, "moe_forward"):  # the reference writes the formula out directly
        y, routing, plan = impl.moe_forward(
            x, router, w1, w2, w3, cfg.activation, cfg.top_k, cfg.renormalize, expert_capacity
        )
        return MoEOutput(y=y, routing=routing, plan=plan)
    routing = _route(impl, x, router, cfg.top_k, cfg.renormalize, check_finite, on_device)
    plan = impl.dispatch(routing.experts, cfg.n_experts, expert_capacity)
    rows = impl.permute(x, plan)
    if getattr(impl, "chooses_kernels_by_rows", False):
        # Top-k picks k different experts, so no expert gets more than T rows: the
        # bound the CUDA launcher needs under graph capture, where it cannot read counts.
        expert_out = impl.expert_mlp(rows, plan.offsets, w1, w2, w3, cfg.activation, max_expert_rows=T)
    else:
        expert_out = impl.expert_mlp(rows, plan.offsets, w1, w2, w3, cfg.activation)
    y = impl.combine(expert_out, routing.weights, plan.row)
    return MoEOutput(y=y, routing=routing, plan=plan)


def dense_mlp(x, w1, w2, w3=None, *, activation: str = "relu", backend: Optional[str] = None):
    """The dense baseline: act(x @ w1) @ w2, or (silu(x @ w1) * (x @ w3)) @ w2 for swiglu.

    x (T, D), w1 and w3 (D, F), w2 (F, D) -> (T, D).
    """
    impl = resolve(backend)
    activation = checks.check_activation(activation)
    (T, D) = checks.check_rank("x", x, 2, "(T, D)")
    (w1_rows, F) = checks.check_rank("w1", w1, 2, "(D, F)")
    checks.check_dim("w1", "D rows", w1_rows, D, "x's width")
    checks.check_shape("w2", w2, (F, D), "(F, D)")
    checks.check_gate(activation, w3)
    if w3 is not None:
        checks.check_shape("w3", w3, (D, F), "(D, F)")
    x, w1, w2, w3 = _float_inputs(impl, {"x": x, "w1": w1, "w2": w2, "w3": w3})
    _check_finite(impl, {"x": x})
    return impl.dense_mlp(x, w1, w2, w3, activation)
