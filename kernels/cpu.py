"""The fast CPU baseline: vectorised NumPy and BLAS in the input's dtype.

Same contract as `reference.py`, without Python loops over tokens: the router
is one GEMM and two arg-maxes, dispatch is a stable counting sort, each expert
is one BLAS GEMM per matrix on its contiguous block of rows, and combine is K
gathers (no `np.add.at`, whose scatter is slow and whose order is not ours to
choose). float32 and float64.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.special import erf, expit

from .types import DispatchPlan, Routing

name = "cpu"
float_dtypes = (np.dtype(np.float32), np.dtype(np.float64))


def to_compute(a: np.ndarray) -> np.ndarray:
    """The CPU baseline computes in the input's own dtype (checked by the caller)."""
    return np.asarray(a)


def to_index(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def all_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def route(x: np.ndarray, router: np.ndarray, k: int, renormalize: bool) -> Routing:
    logits = x @ router  # (T, E), accumulated by BLAS in the input dtype
    probs = logits - logits.max(axis=1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=1, keepdims=True)

    # argmax returns the first maximum, so a tie goes to the smaller index;
    # masking the winner and taking argmax again gives the runner-up with the
    # same rule. For K <= 2 this beats a sort.
    first = np.argmax(logits, axis=1)
    if k == 1:
        experts = first[:, None]
    else:
        masked = logits.copy()
        masked[np.arange(logits.shape[0]), first] = -np.inf
        experts = np.stack([first, np.argmax(masked, axis=1)], axis=1)
    experts = experts.astype(np.int32)

    weights = np.take_along_axis(probs, experts, axis=1)
    if renormalize:
        weights /= weights.sum(axis=1, keepdims=True)
    return Routing(experts=experts, weights=weights, probs=probs)


def dispatch(experts: np.ndarray, n_experts: int, capacity: Optional[int]) -> DispatchPlan:
    n_tokens, k = experts.shape
    # Assignment a = j * T + t, so a flat j-major list sorted stably by expert
    # keeps each expert's arrivals in the contract's order.
    assignment_expert = np.ascontiguousarray(experts.T).reshape(-1).astype(np.int64)
    order = np.argsort(assignment_expert, kind="stable")
    sorted_expert = assignment_expert[order]

    arrivals = np.bincount(assignment_expert, minlength=n_experts).astype(np.int64)
    first_arrival = np.concatenate(([0], np.cumsum(arrivals)[:-1]))
    arrival_rank = np.arange(order.size, dtype=np.int64) - first_arrival[sorted_expert]
    if capacity is None:
        kept = np.ones(order.size, dtype=bool)
        counts = arrivals
    else:
        kept = arrival_rank < capacity
        counts = np.minimum(arrivals, capacity)

    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Kept assignments, still sorted by (expert, arrival), are exactly rows 0..N-1.
    kept_assignment = order[kept]
    token = kept_assignment % n_tokens if n_tokens else kept_assignment
    row_of_assignment = np.full(order.size, -1, dtype=np.int64)
    row_of_assignment[kept_assignment] = np.arange(kept_assignment.size, dtype=np.int64)
    row = np.ascontiguousarray(row_of_assignment.reshape(k, n_tokens).T)
    return DispatchPlan(counts=counts, offsets=offsets, token=token.astype(np.int64), row=row)


#: Rows per GEMM block. Each block's hidden activations (ROW_BLOCK x F, twice
#: for swiglu) are made, activated and consumed by the second GEMM while they
#: are still in cache; a whole large batch's hidden would stream through DRAM
#: three times. 512 rows keep BLAS at full speed (measured with bench_cpu).
ROW_BLOCK = 512


def mlp_into(v, w1, w2, w3, activation: str, out: np.ndarray) -> None:
    """out = expert(v), one block of rows at a time (see ROW_BLOCK)."""
    for start in range(0, v.shape[0], ROW_BLOCK):
        stop = min(start + ROW_BLOCK, v.shape[0])
        _mlp_block_into(v[start:stop], w1, w2, w3, activation, out[start:stop])


def _mlp_block_into(v, w1, w2, w3, activation: str, out: np.ndarray) -> None:
    """out = expert(v), with the activation applied in place on the hidden block."""
    hidden = v @ w1
    if activation == "relu":
        np.maximum(hidden, 0, out=hidden)
    elif activation == "gelu":
        scaled = hidden * hidden.dtype.type(1 / np.sqrt(2))
        erf(scaled, out=scaled)
        scaled += 1
        hidden *= scaled
        hidden *= hidden.dtype.type(0.5)
    else:  # swiglu: silu(v @ w1) * (v @ w3)
        gate = v @ w3
        hidden *= expit(hidden)
        hidden *= gate
    np.matmul(hidden, w2, out=out)


def permute(x: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    return np.take(x, plan.token, axis=0)


def expert_mlp(rows, offsets, w1, w2, w3, activation) -> np.ndarray:
    out = np.empty((rows.shape[0], w2.shape[2]), dtype=rows.dtype)
    for e in range(w1.shape[0]):
        start, stop = int(offsets[e]), int(offsets[e + 1])
        if stop > start:
            gate_weights = w3[e] if w3 is not None else None
            mlp_into(rows[start:stop], w1[e], w2[e], gate_weights, activation, out[start:stop])
    return out


def combine(expert_out: np.ndarray, weights: np.ndarray, row: np.ndarray) -> np.ndarray:
    n_tokens, k = row.shape
    y = np.zeros((n_tokens, expert_out.shape[1]), dtype=expert_out.dtype)
    for j in range(k):  # in j order, so the sum is the same whatever the batch
        rows_j = row[:, j]
        kept = rows_j >= 0
        if kept.all():
            contribution = np.take(expert_out, rows_j, axis=0)
            contribution *= weights[:, j, None]
            y += contribution
        elif kept.any():
            contribution = np.take(expert_out, rows_j[kept], axis=0)
            contribution *= weights[kept, j, None]
            y[kept] += contribution
    return y


def dense_mlp(x, w1, w2, w3, activation) -> np.ndarray:
    out = np.empty((x.shape[0], w2.shape[1]), dtype=x.dtype)
    mlp_into(x, w1, w2, w3, activation, out)
    return out
