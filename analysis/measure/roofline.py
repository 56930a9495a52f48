"""FLOP and byte formulas, and the machine ceilings they are divided by.

A time means little alone; beside ``FLOPs / measured GEMM rate`` and
``bytes / measured bandwidth`` it says how far from the hardware's limit a
kernel is. Every formula here is named, so a figure can say which one it used.

FLOPs count multiply-adds in the GEMMs as 2 each and nothing else: the
activation, softmax, top-k and the weighted sum are O(T·F) or O(T·E) and
vanish beside the O(T·D·F) GEMMs at every shape the study uses.

Bytes are the compulsory traffic of each stage run as its own kernel(s):
every input read once, every output written once. Per stage
(``stage_costs``), with ``s`` the float itemsize, ``N`` kept assignments and
``U`` experts that received at least one row (``G`` = 2 for swiglu's w1 and
w3, else 1; ``experts`` are int32, plan arrays int64):

    router        read x T·D·s, router D·E·s; write probs T·E·s,
                  weights T·K·s, experts T·K·4                   FLOPs 2·T·D·E
    dispatch      read experts T·K·4; write token N·8, row T·K·8,
                  counts and offsets (2E+1)·8                    FLOPs 0
    permute       read x T·D·s, token N·8; write rows N·D·s      FLOPs 0
    expert_gemm1  read rows N·D·s, G·U·D·F·s of weights;
                  write hidden N·F·s                             FLOPs 2·N·D·F·G
    expert_gemm2  read hidden N·F·s, U·F·D·s of w2;
                  write out N·D·s                                FLOPs 2·N·F·D
    combine       read out N·D·s, weights T·K·s, row T·K·8;
                  write y T·D·s                                  FLOPs 0

``expert_mlp`` is GEMM 1 + activation + GEMM 2 (the backends run them as one
call). A stage's roofline time is max(FLOPs / GEMM rate, bytes / copy
bandwidth); the layer's is the sum over its stages, since each stage's
intermediates pass through memory. Ceilings are measured in the same run as
the numbers divided by them: a large device-to-device (or, on the CPU,
memory-to-memory) copy counting bytes read plus written, and the GEMM library's
rate for the dtype (cuBLAS through CuPy; NumPy's BLAS on the CPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy

from analysis.measure.timing import time_function

#: Stages of one MoE layer, in execution order.
STAGES = ("router", "dispatch", "permute", "expert_gemm1", "expert_gemm2", "combine")
#: The stages as the backends expose them: the two expert GEMMs are one call.
TIMED_STAGES = ("router", "dispatch", "permute", "expert_mlp", "combine")
INDEX_BYTES = 8  # plan arrays are int64
EXPERT_INDEX_BYTES = 4  # experts is int32

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


# ---------------------------------------------------------------- per stage


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and compulsory bytes of one piece of work, and the formula's name."""

    flops: int
    bytes: int
    formula: str

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, f"{self.formula} + {other.formula}")


def _gate_factor(activation: str) -> int:
    """Weight matrices GEMM 1 reads: 2 for swiglu (w1 and w3), else 1."""
    return gemms_per_mlp(activation) - 1


def stage_costs(T: int, D: int, F: int, E: int, K: int, activation: str, itemsize: int,
                kept_assignments: int | None = None, experts_used: int | None = None) -> dict:
    """``{stage: Cost}`` for every stage in ``STAGES`` plus ``expert_mlp``
    (GEMM 1 + GEMM 2) and ``end_to_end`` (their sum), from the formulas in the
    module docstring. ``kept_assignments`` is N (default T·K, dropless);
    ``experts_used`` is U (default min(E, N))."""
    s = itemsize
    N = T * K if kept_assignments is None else kept_assignments
    U = min(E, N) if experts_used is None else experts_used
    G = _gate_factor(activation)
    costs = {
        "router": Cost(router_flops(T, D, E),
                       s * (T * D + D * E + T * E + T * K) + EXPERT_INDEX_BYTES * T * K, "router"),
        "dispatch": Cost(0, EXPERT_INDEX_BYTES * T * K + INDEX_BYTES * (N + T * K + 2 * E + 1), "dispatch"),
        "permute": Cost(0, s * (T * D + N * D) + INDEX_BYTES * N, "permute"),
        "expert_gemm1": Cost(2 * N * D * F * G, s * (N * D + G * U * D * F + N * F), "expert_gemm1"),
        "expert_gemm2": Cost(2 * N * F * D, s * (N * F + U * F * D + N * D), "expert_gemm2"),
        "combine": Cost(0, s * (N * D + T * K + T * D) + INDEX_BYTES * T * K, "combine"),
    }
    costs["expert_mlp"] = Cost(costs["expert_gemm1"].flops + costs["expert_gemm2"].flops,
                               costs["expert_gemm1"].bytes + costs["expert_gemm2"].bytes, "expert_mlp")
    costs["end_to_end"] = Cost(sum(costs[stage].flops for stage in STAGES),
                               sum(costs[stage].bytes for stage in STAGES), "sum of stages")
    return costs


def dense_costs(T: int, D: int, width: int, activation: str, itemsize: int) -> dict:
    """``{"gemm1", "gemm2", "end_to_end": Cost}`` of a dense MLP of hidden
    width ``width``: GEMM 1 reads x and G weight matrices and writes the
    hidden (T, width); GEMM 2 reads it and w2 and writes y."""
    s = itemsize
    G = _gate_factor(activation)
    gemm1 = Cost(2 * T * D * width * G, s * (T * D + G * D * width + T * width), "dense_gemm1")
    gemm2 = Cost(2 * T * width * D, s * (T * width + width * D + T * D), "dense_gemm2")
    return {"gemm1": gemm1, "gemm2": gemm2,
            "end_to_end": Cost(gemm1.flops + gemm2.flops, gemm1.bytes + gemm2.bytes, "dense")}


def roofline_seconds(cost: Cost, flop_per_s: float, bytes_per_s: float) -> float:
    """The floor under a kernel's time: the larger of FLOPs over the GEMM rate
    and bytes over the copy bandwidth."""
    return max(cost.flops / flop_per_s, cost.bytes / bytes_per_s)


def bound(cost: Cost, flop_per_s: float, bytes_per_s: float) -> str:
    """"compute" when the FLOP term of the roofline is the larger, else "memory"."""
    return "compute" if cost.flops / flop_per_s > cost.bytes / bytes_per_s else "memory"


def pipeline_roofline_seconds(costs: list, flop_per_s: float, bytes_per_s: float) -> float:
    """The floor of several kernels run one after another: the sum of theirs."""
    return sum(roofline_seconds(cost, flop_per_s, bytes_per_s) for cost in costs)


# ---------------------------------------------------------------- ceilings


def copy_bandwidth(device: str = "cpu", nbytes: int | None = None, *, warmup: int = 2,
                   repeats: int = 10) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written.

    ``device="cpu"``: ``numpy.copyto`` of ``nbytes`` (default 256 MiB).
    ``device="cuda"``: a device-to-device ``cudaMemcpyAsync`` of ``nbytes``
    (default 1 GiB), timed with CUDA events.
    """
    if device == "cpu":
        nbytes = 256 * 2**20 if nbytes is None else int(nbytes)
        source = numpy.full(nbytes, 7, dtype=numpy.uint8)
        destination = numpy.full(nbytes, 1, dtype=numpy.uint8)  # touched, so no first-touch faults
        timing = time_function(lambda: numpy.copyto(destination, source), warmup=warmup, repeats=repeats)
        return 2 * nbytes / timing.median_s
    if device != "cuda":
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    cupy = _cupy()
    nbytes = 2**30 if nbytes is None else int(nbytes)
    source = cupy.full(nbytes, 7, dtype=cupy.uint8)
    destination = cupy.empty(nbytes, dtype=cupy.uint8)
    timing = time_function(lambda: destination.data.copy_from_device_async(source.data, nbytes),
                           warmup=warmup, repeats=repeats, device="cuda")
    return 2 * nbytes / timing.median_s


def gemm_rate(device: str = "cpu", dtype=numpy.float32, n: int | None = None, *, warmup: int = 2,
              repeats: int = 10) -> float:
    """FLOP/s of an ``n x n x n`` matrix product in ``dtype`` on random data.

    ``device="cpu"``: ``sgemm_rate`` (NumPy's BLAS; default n = 2048).
    ``device="cuda"``: ``cupy.matmul``, i.e. cuBLAS, the library the dense
    baseline calls (default n = 8192), timed with CUDA events.
    """
    if device == "cpu":
        return sgemm_rate(n=2048 if n is None else n, dtype=dtype, warmup=warmup, repeats=repeats)
    if device != "cuda":
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    cupy = _cupy()
    n = 8192 if n is None else int(n)
    generator = cupy.random.RandomState(0)
    a = generator.standard_normal((n, n), dtype=cupy.float32).astype(dtype)
    b = generator.standard_normal((n, n), dtype=cupy.float32).astype(dtype)
    product = cupy.empty((n, n), dtype=dtype)
    timing = time_function(lambda: cupy.matmul(a, b, out=product), warmup=warmup, repeats=repeats,
                           device="cuda")
    return 2 * n**3 / timing.median_s


def _cupy():
    if importlib.util.find_spec("cupy") is None:
        raise RuntimeError("device='cuda' needs CuPy, which is not installed")
    import cupy  # noqa: PLC0415 - never imported unless a GPU ceiling is asked for

    return cupy
