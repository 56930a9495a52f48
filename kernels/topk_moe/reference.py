"""The reference backend: the contract written as plainly as NumPy allows.

This file is the specification. It favours clarity over speed (loops over
tokens and assignments are fine) and computes in whatever float dtype it is
handed; the public functions in `topk_moe` hand it float64, so reference
results are float64. `topk_moe.testing` runs the same code on float32 inputs to
learn how much error a plain low-precision implementation makes.

Letters: T tokens, D model width, F expert hidden width, E experts, K experts
per token, C capacity, N kept assignments.

A worked example (E = 3 experts, K = 2, T = 3 tokens, capacity C = 2)::

    experts = [[2, 0],     token 0: first choice expert 2, second expert 0
               [2, 1],     token 1: 2, then 1
               [2, 0]]     token 2: 2, then 0

    Assignments in j-major order (all first choices, then all second choices):
        (t0, j0)->2, (t1, j0)->2, (t2, j0)->2, (t0, j1)->0, (t1, j1)->1, (t2, j1)->0
    Expert 2 keeps its first C = 2 arrivals, tokens 0 and 1; (t2, j0) is
    dropped even though token 2's second choice (expert 0) is kept.
        counts  = [2, 1, 2]          offsets = [0, 2, 3, 5]
        token   = [0, 2 | 1 | 0, 1]  (rows of expert 0, then 1, then 2)
        row     = [[3, 0], [4, 2], [-1, 1]]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.special import erf, expit

from .types import DispatchPlan, Routing

name = "reference"
float_dtypes = None  # any float dtype; the public API converts to float64


def to_compute(a: np.ndarray) -> np.ndarray:
    """The reference computes in float64 whatever it is given."""
    return np.asarray(a, dtype=np.float64)


def to_index(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def all_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum so exp cannot overflow."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def route(x: np.ndarray, router: np.ndarray, k: int, renormalize: bool) -> Routing:
    """Top-k routing. x (T, D) @ router (D, E) -> logits (T, E)."""
    logits = x @ router
    probs = softmax(logits)
    n_tokens = x.shape[0]
    experts = np.empty((n_tokens, k), dtype=np.int32)
    weights = np.empty((n_tokens, k), dtype=probs.dtype)
    for t in range(n_tokens):
        # A stable sort of the negated logits keeps equal logits in index
        # order, so on a tie the smaller expert index comes first.
        chosen = np.argsort(-logits[t], kind="stable")[:k]
        experts[t] = chosen
        weights[t] = probs[t, chosen]
        if renormalize:
            weights[t] = weights[t] / weights[t].sum()
    return Routing(experts=experts, weights=weights, probs=probs)


def dispatch(experts: np.ndarray, n_experts: int, capacity: Optional[int]) -> DispatchPlan:
    """Group assignments by expert, j-major, keeping the first `capacity` of each."""
    n_tokens, k = experts.shape
    arrivals = [[] for _ in range(n_experts)]  # the kept (t, j) of each expert, in order
    for j in range(k):  # j-major: every first choice before any second choice
        for t in range(n_tokens):
            e = int(experts[t, j])
            if capacity is None or len(arrivals[e]) < capacity:
                arrivals[e].append((t, j))

    counts = np.array([len(a) for a in arrivals], dtype=np.int64)
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    token = np.empty(int(offsets[-1]), dtype=np.int64)
    row = np.full((n_tokens, k), -1, dtype=np.int64)
    for e in range(n_experts):
        for i, (t, j) in enumerate(arrivals[e]):
            token[offsets[e] + i] = t
            row[t, j] = offsets[e] + i
    return DispatchPlan(counts=counts, offsets=offsets, token=token, row=row)


def activate(h: np.ndarray, activation: str, gate: Optional[np.ndarray] = None) -> np.ndarray:
    """relu, exact-erf gelu, or swiglu's silu(h) * gate."""
    if activation == "relu":
        return np.maximum(h, 0)
    if activation == "gelu":
        return 0.5 * h * (1 + erf(h / np.sqrt(h.dtype.type(2))))
    if activation == "swiglu":
        return h * expit(h) * gate  # silu(h) = h * sigmoid(h)
    raise ValueError(f"activation: unknown {activation!r}")


def mlp(v: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: Optional[np.ndarray], activation: str) -> np.ndarray:
    """One expert (or the dense MLP): act(v @ w1) @ w2, or (silu(v @ w1) * (v @ w3)) @ w2."""
    gate = v @ w3 if activation == "swiglu" else None
    return activate(v @ w1, activation, gate) @ w2


def permute(x: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    """Rows of the expert batch: row i holds token plan.token[i]."""
    return x[plan.token]


def expert_mlp(rows, offsets, w1, w2, w3, activation) -> np.ndarray:
    """Expert e transforms its rows offsets[e]:offsets[e+1]."""
    out = np.zeros((rows.shape[0], w2.shape[2]), dtype=rows.dtype)
    for e in range(w1.shape[0]):
        start, stop = int(offsets[e]), int(offsets[e + 1])
        gate_weights = w3[e] if w3 is not None else None
        out[start:stop] = mlp(rows[start:stop], w1[e], w2[e], gate_weights, activation)
    return out


def combine(expert_out: np.ndarray, weights: np.ndarray, row: np.ndarray) -> np.ndarray:
    """y[t] = sum over kept j, in j order, of weights[t, j] * expert_out[row[t, j]]."""
    n_tokens, k = row.shape
    y = np.zeros((n_tokens, expert_out.shape[1]), dtype=expert_out.dtype)
    for t in range(n_tokens):
        for j in range(k):
            if row[t, j] >= 0:  # a dropped assignment adds nothing
                y[t] += weights[t, j] * expert_out[row[t, j]]
    return y


def moe_forward(x, router, w1, w2, w3, activation, k, renormalize, capacity):
    """The whole layer, straight from the contract's formula, token by token.

    It does not go through permute/expert_mlp/combine, so it checks them:
    y[t] = sum over kept j of weights[t, j] * expert_{experts[t, j]}(x[t]).
    """
    routing = route(x, router, k, renormalize)
    plan = dispatch(routing.experts, router.shape[1], capacity)
    y = np.zeros((x.shape[0], w2.shape[2]), dtype=x.dtype)
    for t in range(x.shape[0]):
        for j in range(k):
            if plan.row[t, j] < 0:
                continue
            e = routing.experts[t, j]
            gate_weights = w3[e] if w3 is not None else None
            y[t] += routing.weights[t, j] * mlp(x[t], w1[e], w2[e], gate_weights, activation)
    return y, routing, plan


def dense_mlp(x, w1, w2, w3, activation) -> np.ndarray:
    return mlp(x, w1, w2, w3, activation)
