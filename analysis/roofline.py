"""FLOP and byte formulas, and the machine ceilings they are divided by.

A time means little alone; beside ``FLOPs / measured GEMM rate`` and
``bytes / measured bandwidth`` it says how far from the hardware's limit a
kernel is. Every formula here is named, so a figure can say which one it used.

FLOPs count multiply-adds in the GEMMs as 2 each and nothing else: the
activation, softmax, top-k and the weighted sum are O(T·F) or O(T·E) and
vanish beside the O(T·D·F) GEMMs at every shape the study uses.
"""

from __future__ import annotations

import numpy

from analysis.timing import time_function

#: Weight matrices (GEMMs) per expert or dense MLP, by activation:
#: swiglu has gate (w1), up (w3) and down (w2); relu and gelu have w1 and w2.
GEMMS_PER_MLP = {"swiglu": 3, "relu": 2, "gelu": 2}


def gemms_per_mlp(activation: str) -> int:
    """Number of ``D x F`` weight matrices one expert (or dense MLP) multiplies by."""
    try:
        return GEMMS_PER_MLP[activation]
    except KeyError:
        raise ValueError(f"activation: expected one of {sorted(GEMMS_PER_MLP)}, got {activation!r}") from None


def router_flops(T: int, D: int, E: int) -> int:
    """``x @ router``: a ``(T, D) x (D, E)`` GEMM."""
    return 2 * T * D * E


def moe_flops(T: int, D: int, F: int, E: int, K: int, activation: str,
              kept_assignments: int | None = None) -> int:
    """FLOPs of one MoE layer forward: router plus the expert GEMMs.

    Each kept assignment (a token row sent to one expert) costs ``2·D·F`` per
    GEMM. ``kept_assignments`` is ``N`` from the dispatch plan; without it,
    every assignment is kept (dropless): ``N = T·K``.
    """
    assignments = T * K if kept_assignments is None else kept_assignments
    return 2 * assignments * D * F * gemms_per_mlp(activation) + router_flops(T, D, E)


def dense_flops(T: int, D: int, F: int, activation: str) -> int:
    """FLOPs of a dense MLP of hidden width ``F`` on ``T`` tokens."""
    return 2 * T * D * F * gemms_per_mlp(activation)


def dense_min_bytes(T: int, D: int, F: int, activation: str, itemsize: int) -> int:
    """Compulsory memory traffic of a dense MLP: ``x`` read, ``y`` written and
    every weight read once (intermediates assumed to stay in cache)."""
    return itemsize * (2 * T * D + gemms_per_mlp(activation) * D * F)


def moe_min_bytes(T: int, D: int, F: int, E: int, K: int, activation: str, itemsize: int,
                  experts_used: int | None = None) -> int:
    """Compulsory memory traffic of an MoE layer: ``x`` read, ``y`` written, the
    router read, and the weights of every expert that received a token read
    once. ``experts_used`` defaults to ``min(E, T·K)``, every expert that could
    have been chosen; at decode (small ``T``) this is what makes MoE cheap."""
    used = min(E, T * K) if experts_used is None else experts_used
    return itemsize * (2 * T * D + D * E + used * gemms_per_mlp(activation) * D * F)


def sgemm_rate(n: int = 2048, dtype=numpy.float32, *, warmup: int = 2, repeats: int = 10) -> float:
    """This machine's GEMM rate in FLOP/s: NumPy ``matmul`` of two ``n x n``
    matrices of ``dtype``, median time, ``2·n³`` FLOPs.

    It is the CPU's ceiling as the CPU backend can reach it (NumPy's BLAS on
    the threads it is allowed), which is the fair one to compare against.
    Measure it in the same run as the numbers it is compared with.
    """
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    product = numpy.empty((n, n), dtype=dtype)
    timing = time_function(lambda: numpy.matmul(a, b, out=product), warmup=warmup, repeats=repeats)
    return 2 * n**3 / timing.median_s
