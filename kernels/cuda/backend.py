"""The CUDA backend: the contract on CuPy arrays, computed by the raw CUDA
kernels of this folder (router.cu, dispatch.cu, combine.cu, activation.cu,
expert_mlp.cu) and, for the dense baseline, cuBLAS.

Same module interface as ``kernels.cpu``; the public functions in
``kernels.api`` check the arguments once and call these. Each launcher checks
nothing more, allocates, launches, returns (CuPy arrays, on the current
stream).

Dtypes: float32 and float16 (CuPy has no bfloat16). All arithmetic is float32
(float16 is widened on load and rounded once on store); results come back in
the input's dtype, so a float16 layer gives float16 ``probs``, ``weights`` and
``y``, each rounded once from a float32 value. ``experts`` is int32 and every
plan array int64.

Non-finite input: the router kernel raises a device flag when a logit is not
finite, which happens exactly when x or the router holds NaN or infinity (or
when a float32 logit overflows); ``route`` reads the flag back (one
synchronisation) and raises ValueError, unless ``check_finite=False``. The
public API therefore skips its own check for this backend
(``checks_finite_on_device``). With ``check_finite=False`` and a dropless
plan, ``moe_forward`` never waits for the device, so it can be captured in a
CUDA graph. A plan with a capacity reads N (``offsets[E]``) back once to size
``token``, unless the capacity is at least T * K.

Limits of this version: the router takes E <= 1024 (E logits per token live
in registers), dispatch E <= 12288 (a counter per expert per warp in shared
memory); beyond them a ValueError says so.
"""

from __future__ import annotations

import functools
from typing import Optional

import cupy
import numpy as np

from ..types import DispatchPlan, Routing
from . import launch_config as config
from .loader import get_kernel

name = "cuda"
float_dtypes = (np.dtype(np.float32), np.dtype(np.float16))

#: ``route`` checks x and router for NaN and infinity on the device (and takes
#: ``check_finite``); ``kernels.api`` leaves that check to it.
checks_finite_on_device = True

_FLOAT16 = np.dtype(np.float16)
_NONFINITE = (
    "x, router: expected finite values, got non-finite entries (NaN or infinity) in x or router, "
    "or float32 logits that overflow (found by the cuda router kernel)"
)


def to_compute(a) -> cupy.ndarray:
    """A C-contiguous CuPy array (copied to the device when given NumPy)."""
    return cupy.ascontiguousarray(cupy.asarray(a))


def to_index(a) -> cupy.ndarray:
    """int64 on the device, so the caller's range check sees the true values."""
    return cupy.asarray(a).astype(cupy.int64, copy=False)


def all_finite(a) -> bool:
    return bool(cupy.isfinite(a).all())


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id: int) -> int:
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def _grid(n_items: int, items_per_block: int) -> int:
    """Blocks for a grid-stride kernel: enough for every item, at most
    BLOCKS_PER_SM per multiprocessor."""
    limit = config.BLOCKS_PER_SM * _multiprocessors(cupy.cuda.Device().id)
    return max(1, min(-(-n_items // items_per_block), limit))


# ---------------------------------------------------------------------------
# route


def _router_kernel(k: int, dtype: np.dtype, defines: dict):
    if dtype == _FLOAT16:
        if k == 1:
            return get_kernel("router.cu", "router_top1_f16", **defines)
        return get_kernel("router.cu", "router_top2_f16", **defines)
    if k == 1:
        return get_kernel("router.cu", "router_top1_f32", **defines)
    return get_kernel("router.cu", "router_top2_f32", **defines)


def route(x, router, k: int, renormalize: bool, *, check_finite: bool = True) -> Routing:
    """Logits, softmax and top-k in one kernel (router.cu). x (T, D), router (D, E).

    probs (T, E) and weights (T, k) come back in x's dtype, computed in float32;
    without ``renormalize`` a weight is bitwise its entry of probs.
    """
    n_tokens, d_model = x.shape
    n_experts = router.shape[1]
    defines = config.router_defines(n_experts)
    experts = cupy.empty((n_tokens, k), dtype=cupy.int32)
    weights = cupy.empty((n_tokens, k), dtype=x.dtype)
    probs = cupy.empty((n_tokens, n_experts), dtype=x.dtype)
    if n_tokens == 0:  # no kernel reads the router, so check it here
        if check_finite and not all_finite(router):
            raise ValueError(_NONFINITE)
        return Routing(experts=experts, weights=weights, probs=probs)

    nonfinite = cupy.zeros(1, dtype=cupy.int32)
    blocks = -(-n_tokens // defines["ROUTER_TOKENS"])
    _router_kernel(k, x.dtype, defines)(
        (blocks,), (config.ROUTER_WARPS * config.WARP,),
        (x, router, np.int64(n_tokens), np.int64(d_model), np.int32(bool(renormalize)),
         experts, weights, probs, nonfinite),
    )
    if check_finite and int(nonfinite.get()[0]) != 0:
        raise ValueError(_NONFINITE)
    return Routing(experts=experts, weights=weights, probs=probs)


# ---------------------------------------------------------------------------
# dispatch


def dispatch(experts, n_experts: int, capacity: Optional[int]) -> DispatchPlan:
    """The plan by a stable counting sort on the device (dispatch.cu).

    Dropless (and capacity >= T * K): no host synchronisation, N = T * K.
    Otherwise N = offsets[E] is read back once to size ``token``.
    """
    experts = cupy.ascontiguousarray(experts, dtype=cupy.int32)
    n_tokens, k = experts.shape
    warps = config.dispatch_warps_per_block(n_experts)
    defines = config.dispatch_defines()
    n_assignments = n_tokens * k
    n_segments = -(-n_assignments // config.DISPATCH_SEGMENT)
    segment_blocks = -(-n_segments // warps)
    shared_bytes = warps * n_experts * 4
    capacity_arg = np.int64(-1 if capacity is None else capacity)

    counts = cupy.empty(n_experts, dtype=cupy.int64)
    offsets = cupy.empty(n_experts + 1, dtype=cupy.int64)
    row = cupy.empty((n_tokens, k), dtype=cupy.int64)
    segment_counts = cupy.empty(n_experts * n_segments, dtype=cupy.int64)  # (E, segments)

    if n_segments > 0:
        get_kernel("dispatch.cu", "dispatch_count_segments", **defines)(
            (segment_blocks,), (warps * config.WARP,),
            (experts, np.int64(n_tokens), np.int32(k), np.int32(n_experts), np.int64(n_segments),
             segment_counts),
            shared_mem=shared_bytes,
        )
    get_kernel("dispatch.cu", "dispatch_scan_segments", **defines)(
        (n_experts,), (config.SCAN_THREADS,),
        (segment_counts, np.int64(n_segments), capacity_arg, counts),
    )
    get_kernel("dispatch.cu", "dispatch_offsets", **defines)(
        (1,), (config.SCAN_THREADS,), (counts, np.int32(n_experts), offsets),
    )

    if capacity is None or capacity >= n_assignments:
        n_kept = n_assignments  # nothing can be dropped: no need to ask the device
    else:
        n_kept = int(offsets[n_experts].get())
    token = cupy.empty(n_kept, dtype=cupy.int64)
    if n_segments > 0:
        get_kernel("dispatch.cu", "dispatch_scatter", **defines)(
            (segment_blocks,), (warps * config.WARP,),
            (experts, np.int64(n_tokens), np.int32(k), np.int32(n_experts), np.int64(n_segments),
             segment_counts, offsets, capacity_arg, token, row),
            shared_mem=shared_bytes,
        )
    return DispatchPlan(counts=counts, offsets=offsets, token=token, row=row)


# ---------------------------------------------------------------------------
# permute, expert MLPs, combine


def _index_array(a) -> cupy.ndarray:
    return cupy.ascontiguousarray(cupy.asarray(a, dtype=cupy.int64))


def _permute_kernel(width: int):
    if width == 16:
        return get_kernel("combine.cu", "permute_rows_16")
    if width == 8:
        return get_kernel("combine.cu", "permute_rows_8")
    if width == 4:
        return get_kernel("combine.cu", "permute_rows_4")
    return get_kernel("combine.cu", "permute_rows_2")


def permute(x, plan: DispatchPlan) -> cupy.ndarray:
    """rows[i] = x[plan.token[i]], copied in the widest aligned vectors (combine.cu)."""
    token = _index_array(plan.token)
    n_rows = token.shape[0]
    d_model = x.shape[1]
    rows = cupy.empty((n_rows, d_model), dtype=x.dtype)
    if n_rows == 0 or d_model == 0:
        return rows
    row_bytes = d_model * x.itemsize
    width = config.widest_access(row_bytes, x.data.ptr, rows.data.ptr)
    _permute_kernel(width)(
        (_grid(n_rows, config.ROW_WARPS),), (config.ROW_WARPS * config.WARP,),
        (x, token, rows, np.int64(n_rows), np.int64(row_bytes // width)),
    )
    return rows


def expert_mlp(rows, offsets, w1, w2, w3, activation: str) -> cupy.ndarray:
    """Every expert on its rows offsets[e]:offsets[e+1] (expert_mlp.cu, grouped GEMMs)."""
    from .expert_mlp import grouped_mlp  # noqa: PLC0415 - its own module, loaded when first used

    return grouped_mlp(rows, _index_array(offsets), w1, w2, w3, activation)


def _combine_kernel(dtype: np.dtype, vector: bool):
    if dtype == _FLOAT16:
        if vector:
            return get_kernel("combine.cu", "combine_f16_vector")
        return get_kernel("combine.cu", "combine_f16_scalar")
    if vector:
        return get_kernel("combine.cu", "combine_f32_vector")
    return get_kernel("combine.cu", "combine_f32_scalar")


def combine(expert_out, weights, row) -> cupy.ndarray:
    """y[t] = sum over kept j, in j order, of weights[t, j] * expert_out[row[t, j]] (combine.cu)."""
    row = _index_array(row)
    n_tokens, k = row.shape
    d_model = expert_out.shape[1]
    y = cupy.empty((n_tokens, d_model), dtype=expert_out.dtype)
    if n_tokens == 0 or d_model == 0:
        return y
    elements_per_vector = 16 // expert_out.itemsize
    vector = (
        d_model % elements_per_vector == 0
        and expert_out.data.ptr % 16 == 0
        and y.data.ptr % 16 == 0
    )
    _combine_kernel(expert_out.dtype, vector)(
        (_grid(n_tokens, config.ROW_WARPS),), (config.ROW_WARPS * config.WARP,),
        (expert_out, weights, row, np.int64(n_tokens), np.int32(k), np.int64(d_model), y),
    )
    return y


# ---------------------------------------------------------------------------
# the dense baseline


def _activate_in_place(hidden, gate, activation: str) -> None:
    n = hidden.size
    if n == 0:
        return
    grid = ((_grid(n, config.ELEMENTWISE_THREADS),), (config.ELEMENTWISE_THREADS,))
    half = hidden.dtype == _FLOAT16
    if activation == "relu":
        kernel = get_kernel("activation.cu", "activate_relu_f16" if half else "activate_relu_f32")
        kernel(*grid, (hidden, np.int64(n)))
    elif activation == "gelu":
        kernel = get_kernel("activation.cu", "activate_gelu_f16" if half else "activate_gelu_f32")
        kernel(*grid, (hidden, np.int64(n)))
    else:
        kernel = get_kernel("activation.cu", "activate_swiglu_f16" if half else "activate_swiglu_f32")
        kernel(*grid, (hidden, gate, np.int64(n)))


def dense_mlp(x, w1, w2, w3, activation: str) -> cupy.ndarray:
    """act(x @ w1) @ w2 or (silu(x @ w1) * (x @ w3)) @ w2: the GEMMs by cuBLAS
    (cupy.matmul; float16 accumulates in float32 there), the activation by
    activation.cu in place on the fresh hidden array."""
    hidden = cupy.matmul(x, w1)
    gate = cupy.matmul(x, w3) if activation == "swiglu" else None
    _activate_in_place(hidden, gate, activation)
    return cupy.matmul(hidden, w2)
