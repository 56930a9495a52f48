"""The CPU baseline against dense MLPs and PyTorch on this CPU: ``python -m analysis.measure.bench_cpu``.

For each activation, each token count T and each k, on the same inputs, it times

- our MoE layer, ``topk_moe.moe_forward(backend="cpu")``;
- our dense MLP (``topk_moe.dense_mlp(backend="cpu")``) of width K·F, the same
  active FLOPs as the MoE's experts, and of width E·F, the same parameters;
- the PyTorch eager MoE a user would write, the Hugging Face loop
  (``peers.hf_eager_moe``), and the grouped-GEMM layer (``peers.grouped_mm_moe``)
  where the installed PyTorch has ``torch._grouped_mm`` on the CPU;
- PyTorch's dense MLP of width K·F (``peers.torch_dense_mlp``);

and, in the same run, two ceilings: the SGEMM rate (the better of NumPy's
multi-threaded matmul and one single-threaded matmul per worker at once, the
two ways our kernels can use the cores) and the bandwidth of a large copy,
each measured at the start and at the end of the run, the higher kept. It
prints the ratios, writes ``bench-cpu`` records (``analysis.records``, one run
per call) and judges the four targets of the CPU baseline (``goal_report``).

Processes. NumPy's OpenBLAS threads and PyTorch's OpenMP threads slow each
other down when both are used in one process, so the NumPy implementations run
in one worker process and the PyTorch ones in another (both started fresh with
``spawn``), and the run alternates between them, (activation, T, k) by
(activation, T, k), with a pause (``pause_s``) at each switch so that the
other side's threads have gone to sleep. Each worker builds the inputs from
the same seeds, so both time the same tokens and weights.

Rounds. Machine noise between one moment and the next (other tenants of a
shared host, frequency) is larger here than the spread of repeated calls, so
the run measures every (activation, T) ``rounds`` times over, each round
timing every implementation once, within seconds of each other. A ratio is
taken within a round (paired), and the table gives its geometric mean over the
rounds with a 95% interval (Student's t on the log ratios); the targets are
judged on the means, and say when an interval reaches across a target.

Threads. By default every core BLAS would use: the workers start with the
environment as it is. ``--threads N`` sets OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS and MKL_NUM_THREADS to N for both workers. Each record holds
the thread count its implementation ran with.

Nothing wrong is timed: before its timing, each implementation's output on the
first input set is checked against the float64 reference on up to 64 token
rows (our MoE by the project's one tolerance rule, ``sweep_cells.check_moe_output``;
the others by relative error, ``FLOAT32_ERROR_LIMIT``); a failure stops the run.

Inputs rotate (``analysis.measure.timing``): each timed call gets its own
tokens and its own copy of the weights, with enough copies that the bytes one
call touches, counted over all copies, are twice the last-level cache. For the
MoE only the experts a call routes to are touched, so decode gets many copies:
its weights come from memory, as they would in a model.

Dimension letters as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token, N kept assignments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Optional

import numpy
from tqdm import tqdm

import topk_moe
import topk_moe.cpu
from analysis import intervals, records
from analysis.measure import peers, roofline, sweep_cells, timing

RECORD_KIND = "bench-cpu"

#: The targets the CPU baseline is held to (issue 12), each judged on one run.
#: MoE time / the PyTorch eager loop's, for T >= PEER_TOKENS, every activation and k.
PEER_TOKENS = 256
GOAL_MAX_RATIO_TO_EAGER = 0.9
#: MoE time / our dense MLP of equal active FLOPs, and the MoE's FLOP/s as a
#: fraction of the SGEMM rate, for T >= LARGE_TOKENS.
LARGE_TOKENS = 4096
GOAL_MAX_RATIO_TO_DENSE_ACTIVE = 1.10
GOAL_MIN_FRACTION_OF_SGEMM = 0.75
#: Decode (T <= DECODE_TOKENS): MoE time / the time to read the touched
#: experts' weights once at the copy bandwidth.
DECODE_TOKENS = 16
GOAL_MAX_DECODE_OVER_WEIGHT_READ = 1.3

#: Largest relative error (max |y - y_ref| / max |y_ref|) against the float64
#: reference accepted from a float32 implementation that the tolerance rule
#: does not cover (our dense MLP, the PyTorch layers). Float32 rounding over
#: D = 512 and F = 1024 gives about 1e-6.
FLOAT32_ERROR_LIMIT = 1e-4

#: (implementation, backend) of everything the bench times; "torch" backends run in the PyTorch worker.
MOE_CPU = ("moe", "cpu")
DENSE_CPU = ("dense", "cpu")
TORCH_EAGER = ("moe", "torch-eager")
#: The grid's explanation of the dense gap at T >= LARGE_TOKENS (``measure_gemm_rows``).
GEMM_ROWS = ("gemm-by-rows", "cpu")
#: The decode floor's measurement (``measure_weight_read``).
WEIGHT_READ = ("weight-read", "cpu")
#: The grid's explanation of the PyTorch loop's lead at small D (``measure_activation``).
ACTIVATION_CPU = ("activation", "cpu")
ACTIVATION_TORCH = ("activation", "torch")
TORCH_GROUPED = ("moe", "torch-grouped-mm")
DENSE_TORCH = ("dense", "torch")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything that decides what the benchmark measures; recorded in ``params``."""

    d_model: int
    d_ff: int
    n_experts: int
    tokens: tuple[int, ...]
    top_ks: tuple[int, ...]
    activations: tuple[str, ...]
    dtype: str
    #: The timing helper's budget: a measurement takes about this long, with
    #: at least ``min_repeats`` and at most ``max_repeats`` timed calls.
    seconds_per_measurement: float
    min_repeats: int
    max_repeats: int
    #: SGEMM is measured on n x n matrices; the copy on this many bytes.
    sgemm_n: int
    copy_bytes: int
    #: Seconds of quiet whenever the run switches between the NumPy and the PyTorch worker.
    pause_s: float
    #: BLAS and OpenMP threads of both workers; None: as the environment leaves them.
    threads: Optional[int] = None
    #: Whether to time the PyTorch implementations (needs the torch extra).
    torch_peers: bool = True
    seed: int = 0
    #: Rounds: every (activation, T) is measured this many times over, each
    #: round timing every implementation once, so the ratios pair a round's
    #: times (taken within seconds of each other) and their spread over the
    #: rounds gives an interval. Machine noise between moments is the larger error here.
    rounds: int = 1


PRESETS = {
    "full": BenchConfig(
        d_model=512, d_ff=1024, n_experts=8,
        tokens=(1, 4, 16, 64, 256, 1024, 4096, 16384), top_ks=(1, 2),
        activations=("relu", "gelu", "swiglu"), dtype="float32",
        seconds_per_measurement=0.2, min_repeats=2, max_repeats=10,
        sgemm_n=2048, copy_bytes=256 * 2**20, pause_s=0.3, rounds=5,
    ),
    # Small shapes that finish in seconds: for tests and a first look.
    "quick": BenchConfig(
        d_model=64, d_ff=128, n_experts=4,
        tokens=(1, 16, 256), top_ks=(1, 2),
        activations=("swiglu",), dtype="float32",
        seconds_per_measurement=0.02, min_repeats=2, max_repeats=2,
        sgemm_n=256, copy_bytes=8 * 2**20, pause_s=0.0, rounds=2,
    ),
}


def check_config(config: BenchConfig) -> None:
    """ValueError, naming the field, for a configuration the bench can't run."""
    if not config.tokens or any(T < 1 for T in config.tokens):
        raise ValueError(f"tokens: expected positive token counts, got {list(config.tokens)}")
    if not config.top_ks or any(k not in (1, 2) for k in config.top_ks):
        raise ValueError(f"top_ks: expected k values of 1 or 2, got {list(config.top_ks)}")
    if any(k > config.n_experts for k in config.top_ks):
        raise ValueError(f"top_ks: expected k <= n_experts = {config.n_experts}, got {list(config.top_ks)}")
    unknown = [a for a in config.activations if a not in ("relu", "gelu", "swiglu")]
    if not config.activations or unknown:
        raise ValueError(f"activations: expected some of relu, gelu, swiglu, got {list(config.activations)}")
    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected float32 or float64, got {config.dtype!r}")
    if config.min_repeats < 1 or config.max_repeats < config.min_repeats:
        raise ValueError(f"repeats: expected 1 <= min_repeats <= max_repeats, got "
                         f"{config.min_repeats} and {config.max_repeats}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads: expected at least 1, got {config.threads}")
    if config.rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {config.rounds}")


# ---------------------------------------------------------------- inputs (built alike in both workers)


def token_sets(T: int, D: int, dtype: numpy.dtype, count: int, seed: int) -> list[numpy.ndarray]:
    """``count`` independent random ``(T, D)`` token batches, reproducible from
    ``seed`` and ``T`` (so every implementation sees the same first batches)."""
    rng = numpy.random.default_rng([seed, T])
    return [rng.standard_normal((T, D), dtype=numpy.float64).astype(dtype) for _ in range(count)]


def layer_config(config: BenchConfig, activation: str, K: int) -> topk_moe.MoEConfig:
    return topk_moe.MoEConfig(config.d_model, config.d_ff, config.n_experts, K, activation=activation)


def expert_bytes(config: BenchConfig, activation: str) -> int:
    """Bytes of one expert's weights (w1, w2, and w3 for swiglu)."""
    return roofline.gemms_per_mlp(activation) * config.d_model * config.d_ff * numpy.dtype(config.dtype).itemsize


#: At most this many input sets (tiny test shapes would otherwise ask for thousands).
MAX_ROTATION_SETS = 32
#: And at most as many copies of the whole layer's weights as this many bytes
#: hold (each worker holds its own): the grid's largest layers (E = 64,
#: D = 1024, swiglu: 2.8 GB a copy) get one copy, which a call routing to
#: many experts reads from memory anyway. The one-shape run (48 MB a copy) is not capped.
MAX_ROTATION_WEIGHT_BYTES = 3 * 2**30


def moe_rotation_count(config: BenchConfig, activation: str, T: int, K: int) -> int:
    """Input sets for the MoE at (T, K): a call touches its tokens and at most
    min(E, T·K) experts, so decode, which touches few, gets many copies."""
    touched = min(config.n_experts, T * K) * expert_bytes(config, activation)
    needed = timing.sets_to_exceed_cache(T * config.d_model * numpy.dtype(config.dtype).itemsize + touched)
    layer_bytes = config.n_experts * expert_bytes(config, activation)
    return max(1, min(needed, MAX_ROTATION_SETS, MAX_ROTATION_WEIGHT_BYTES // layer_bytes))


def dense_rotation_count(config: BenchConfig, activation: str, T: int, width: int) -> int:
    itemsize = numpy.dtype(config.dtype).itemsize
    weights = roofline.gemms_per_mlp(activation) * config.d_model * width * itemsize
    return min(timing.sets_to_exceed_cache(T * config.d_model * itemsize + weights), MAX_ROTATION_SETS)


class InputCache:
    """A worker's inputs: token batches for the current (activation, T), and
    weight copies for the current activation, kept while the run stays there
    (weights do not depend on T). The first sets are the same whatever
    ``count`` is asked for; the layer's weights do not depend on k."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.activation: Optional[str] = None
        self.T: Optional[int] = None
        self.tokens: list = []
        self.moe_weights: list = []
        self.dense: dict = {}
        #: Derived inputs (PyTorch layouts) by name, for the current activation.
        self.derived: dict = {}

    def _at(self, activation: str, T: int) -> None:
        if self.activation != activation:
            self.activation, self.moe_weights, self.dense, self.derived = activation, [], {}, {}
            self.T, self.tokens = None, []
        if self.T != T:
            self.T, self.tokens = T, []

    def token_sets(self, activation: str, T: int, count: int) -> list:
        self._at(activation, T)
        if len(self.tokens) < count:
            config = self.config
            self.tokens = token_sets(T, config.d_model, numpy.dtype(config.dtype), count, config.seed)
        return self.tokens[:count]

    def moe_sets(self, activation: str, T: int, count: int) -> list[tuple]:
        """[(x, topk_moe.MoEWeights)] * count: the layer's weights (seed
        ``config.seed``) and copies of them in fresh memory."""
        tokens = self.token_sets(activation, T, count)
        if not self.moe_weights:
            cfg = layer_config(self.config, activation, 1)
            self.moe_weights = [topk_moe.init_weights(cfg, seed=self.config.seed, dtype=self.config.dtype)]
        while len(self.moe_weights) < count:
            self.moe_weights.append(copy_weights(self.moe_weights[0]))
        return list(zip(tokens, self.moe_weights[:count]))

    def dense_sets(self, activation: str, T: int, width: int, count: int) -> list[tuple]:
        """[(x, w1, w2, w3)] * count for the dense MLP of hidden width ``width``."""
        tokens = self.token_sets(activation, T, count)
        weights = self.dense.setdefault(width, [])
        if not weights:
            weights.append(dense_weights(self.config.d_model, width, activation, numpy.dtype(self.config.dtype),
                                         self.config.seed))
        while len(weights) < count:
            weights.append(tuple(None if w is None else w.copy() for w in weights[0]))
        return [(x, *w) for x, w in zip(tokens, weights[:count])]

    def derived_list(self, name: str, count: int, make: Callable[[int], object]) -> list:
        """``[make(0), make(1), ...]`` (``count`` items), kept under ``name`` for the current activation."""
        items = self.derived.setdefault(name, [])
        while len(items) < count:
            items.append(make(len(items)))
        return items[:count]


def copy_weights(weights: topk_moe.MoEWeights) -> topk_moe.MoEWeights:
    """The same weights in fresh memory."""
    def copy(array):
        return None if array is None else array.copy()

    return topk_moe.MoEWeights(router=copy(weights.router), w1=copy(weights.w1), w2=copy(weights.w2),
                              w3=copy(weights.w3))


def dense_weights(D: int, width: int, activation: str, dtype: numpy.dtype, seed: int):
    """(w1, w2, w3) of a dense MLP of hidden width ``width``, drawn like one
    expert (``topk_moe.init_weights`` with one expert), so scales match the MoE."""
    single_expert = topk_moe.init_weights(topk_moe.MoEConfig(D, width, 1, 1, activation=activation),
                                         seed=seed, dtype=dtype)
    w3 = None if single_expert.w3 is None else single_expert.w3[0]
    return single_expert.w1[0], single_expert.w2[0], w3


# ---------------------------------------------------------------- measurements (run inside a worker)


def budget(config: BenchConfig) -> timing.Budget:
    """The config's time budget per measurement, for ``timing.time_within_budget``."""
    return timing.Budget(seconds_per_measurement=config.seconds_per_measurement,
                         min_repeats=config.min_repeats, max_repeats=config.max_repeats)


def check_rows_against(name: str, y, expected: numpy.ndarray, rows: numpy.ndarray) -> float:
    """The relative error of ``y[rows]`` against ``expected`` (the reference on
    those rows); ValidationError above FLOAT32_ERROR_LIMIT (NaN included)."""
    error = peers.relative_error(y[rows] if not hasattr(y, "numpy") else y.numpy()[rows], expected)
    if not error <= FLOAT32_ERROR_LIMIT:
        raise sweep_cells.ValidationError(
            f"{name}: relative error {error:.2e} against the float64 reference on {len(rows)} rows "
            f"exceeds {FLOAT32_ERROR_LIMIT:g}; not timed")
    return error


def moe_reference_rows(x, weights, cfg) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(rows, reference y on those rows): the float64 reference on up to 64
    spread rows. The layer is dropless, so a row's output depends on that row alone."""
    T = x.shape[0]
    rows = sweep_cells.validation_rows(T, roofline.moe_flops(1, cfg.d_model, cfg.d_ff, cfg.n_experts,
                                                             cfg.top_k, cfg.activation))
    return rows, topk_moe.moe_forward(x[rows], weights, cfg, backend="reference").y


def output_digest(y: numpy.ndarray) -> bytes:
    """A digest of an output's bytes: equal digests, the same bits."""
    return hashlib.blake2b(numpy.ascontiguousarray(y).tobytes(), digest_size=16).digest()


def measure_moe(config: BenchConfig, activation: str, T: int, K: int, inputs: InputCache) -> dict:
    """Our MoE (``backend="cpu"``) at (activation, T, K), checked by the tolerance rule first."""
    cfg = layer_config(config, activation, K)
    count = moe_rotation_count(config, activation, T, K)
    sets = inputs.moe_sets(activation, T, count)
    first = topk_moe.moe_forward(*sets[0], cfg, backend="cpu")
    # Nothing wrong is timed: the project's one tolerance rule against the
    # float64 reference, routed the same way; it raises, and the run stops.
    # Checked in the first round; the backend gives the same bits on the same
    # inputs, so later rounds reuse the check (the reference of a grid layer
    # of E = 64 large experts takes seconds).
    key = ("moe-check", T, K)
    if key not in inputs.derived:
        inputs.derived[key] = (output_digest(first.y), sweep_cells.check_moe_output(
            *sets[0], cfg, first, name=f"cpu moe_forward {activation} T={T} k={K}"))
    checked_digest, checked = inputs.derived[key]
    if output_digest(first.y) != checked_digest:
        raise sweep_cells.ValidationError(f"cpu moe_forward {activation} T={T} k={K}: the output on the same "
                                          "inputs differs from the checked one; not timed")
    # The experts each input set routes to: the weights a call must read (decode's floor).
    touched = [numpy.unique(topk_moe.route(x, w.router, K, backend="cpu").experts).size for x, w in sets]
    measured = timing.time_within_budget(lambda x, w: topk_moe.moe_forward(x, w, cfg, backend="cpu"), sets,
                                         budget(config))
    kept = int(first.plan.offsets[-1])
    return {"timing": measured.as_dict(), "rotation_sets": count, "threads": topk_moe.cpu.threads(),
            "flops": roofline.moe_flops(T, config.d_model, config.d_ff, config.n_experts, K, activation,
                                        kept_assignments=kept),
            "kept_assignments": kept,
            "touched_weight_bytes": float(numpy.mean(touched)) * expert_bytes(config, activation), **checked}


def measure_dense(config: BenchConfig, activation: str, T: int, width: int, inputs: InputCache) -> dict:
    """Our dense MLP of hidden width ``width`` at T tokens."""
    count = dense_rotation_count(config, activation, T, width)
    sets = inputs.dense_sets(activation, T, width, count)

    def dense(x, w1, w2, w3):
        return topk_moe.dense_mlp(x, w1, w2, w3, activation=activation, backend="cpu")

    x, w1, w2, w3 = sets[0]
    rows = sweep_cells.validation_rows(T, roofline.dense_flops(1, config.d_model, width, activation))
    expected = topk_moe.dense_mlp(x[rows], w1, w2, w3, activation=activation, backend="reference")
    error = check_rows_against(f"cpu dense_mlp width {width} {activation} T={T}", dense(*sets[0]), expected, rows)
    measured = timing.time_within_budget(dense, sets, budget(config))
    return {"timing": measured.as_dict(), "rotation_sets": count, "threads": topk_moe.cpu.threads(),
            "flops": roofline.dense_flops(T, config.d_model, width, activation),
            "validated_rows": int(len(rows)), "relative_error_vs_reference": error}


def measure_torch_moe(config: BenchConfig, backend: str, activation: str, T: int, K: int,
                      inputs: InputCache) -> dict:
    """The PyTorch eager loop (``backend="torch-eager"``) or the grouped-GEMM
    layer (``"torch-grouped-mm"``) on the MoE's inputs, float32."""
    import torch  # noqa: PLC0415 - only the PyTorch worker imports torch

    cfg = layer_config(config, activation, K)
    count = moe_rotation_count(config, activation, T, K)
    sets = inputs.moe_sets(activation, T, count)
    if backend == "torch-eager":
        function = peers.hf_eager_moe
        layers = [peers.torch_layer(w, cfg) for _, w in sets]  # shares the arrays' memory
    elif backend == "torch-grouped-mm":
        function = peers.grouped_mm_moe
        # A copy in the grouped layout, made once per weight set and activation (k is set per call).
        grouped = inputs.derived_list("grouped", count, lambda index: peers.grouped_layer(
            peers.torch_layer(sets[index][1], cfg), "float32"))
        layers = [dataclasses.replace(layer, top_k=K) for layer in grouped]
    else:
        raise ValueError(f"backend: expected 'torch-eager' or 'torch-grouped-mm', got {backend!r}")
    args_sets = [(peers.as_torch(x), layer) for (x, _), layer in zip(sets, layers)]
    # The reference rows once per (T, K): the same inputs every round.
    reference_key = ("moe-reference", T, K)
    if reference_key not in inputs.derived:
        inputs.derived[reference_key] = moe_reference_rows(*sets[0], cfg)
    rows, expected = inputs.derived[reference_key]
    with torch.inference_mode():
        error = check_rows_against(f"{backend} {activation} T={T} k={K}", function(*args_sets[0]), expected, rows)
        measured = timing.time_within_budget(function, args_sets, budget(config))
    return {"timing": measured.as_dict(), "rotation_sets": count, "threads": torch.get_num_threads(),
            "flops": roofline.moe_flops(T, config.d_model, config.d_ff, config.n_experts, K, activation),
            "validated_rows": int(len(rows)), "relative_error_vs_reference": error}


def measure_torch_dense(config: BenchConfig, activation: str, T: int, width: int, inputs: InputCache) -> dict:
    """PyTorch's dense MLP of hidden width ``width`` on our dense MLP's inputs."""
    import torch  # noqa: PLC0415 - only the PyTorch worker imports torch

    count = dense_rotation_count(config, activation, T, width)
    sets = inputs.dense_sets(activation, T, width, count)
    args_sets = [tuple(None if a is None else peers.as_torch(a) for a in arguments) for arguments in sets]

    def dense(x, w1, w2, w3):
        return peers.torch_dense_mlp(x, w1, w2, w3, activation)

    x, w1, w2, w3 = sets[0]
    rows = sweep_cells.validation_rows(T, roofline.dense_flops(1, config.d_model, width, activation))
    expected = topk_moe.dense_mlp(x[rows], w1, w2, w3, activation=activation, backend="reference")
    with torch.inference_mode():
        error = check_rows_against(f"torch dense width {width} {activation} T={T}", dense(*args_sets[0]),
                                   expected, rows)
        measured = timing.time_within_budget(dense, args_sets, budget(config))
    return {"timing": measured.as_dict(), "rotation_sets": count, "threads": torch.get_num_threads(),
            "flops": roofline.dense_flops(T, config.d_model, width, activation),
            "validated_rows": int(len(rows)), "relative_error_vs_reference": error}


def measure_ceilings(config: BenchConfig) -> dict:
    """This machine's SGEMM rate and copy bandwidth, as our kernels can reach them.

    SGEMM: the better of NumPy's ``matmul`` of two n x n matrices on BLAS's
    threads (``roofline.sgemm_rate``) and ``topk_moe.cpu.threads()`` single-
    threaded n x n products at once, one per worker thread, as the cpu backend
    runs its blocks. Copy: ``roofline.copy_bandwidth`` (bytes read plus written).
    """
    dtype = numpy.dtype(config.dtype)
    multithreaded = roofline.sgemm_rate(n=config.sgemm_n, dtype=dtype)
    workers = topk_moe.cpu.threads()
    per_worker = concurrent_sgemm_rate(config.sgemm_n, dtype, workers)
    return {"sgemm_flop_per_s": max(multithreaded, per_worker), "sgemm_blas_threads_flop_per_s": multithreaded,
            "sgemm_one_per_worker_flop_per_s": per_worker, "threads": workers,
            "copy_bytes_per_s": roofline.copy_bandwidth("cpu", config.copy_bytes),
            "few_row_read_bytes_per_s": few_row_read_rates(config.d_model, config.d_ff, dtype)}


#: Row counts of the few-row products whose weight-read rate the ceilings include.
FEW_ROWS = (1, 4, 16)


def few_row_read_rates(D: int, F: int, dtype: numpy.dtype, rows_counts: tuple = FEW_ROWS) -> dict:
    """{n: bytes of weights per second} for NumPy's ``(n, D) @ (D, F)`` on one
    BLAS thread with the (D, F) weights coming from memory (copies rotated past
    the last-level cache): the products a decode step makes, one per expert
    and GEMM. The weights' bytes over the time, to set beside the copy bandwidth."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    rng = numpy.random.default_rng(0)
    weight = rng.standard_normal((D, F)).astype(dtype)
    copies = [weight] + [weight.copy() for _ in range(timing.sets_to_exceed_cache(weight.nbytes) - 1)]
    rates = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for n in rows_counts:
            rows = rng.standard_normal((n, D)).astype(dtype)
            out = numpy.empty((n, F), dtype=dtype)
            measured = timing.time_function(lambda w: numpy.matmul(rows, w, out=out),
                                            args_sets=[(w,) for w in copies], warmup=len(copies), repeats=40)
            rates[n] = weight.nbytes / measured.median_s
    return rates


def concurrent_sgemm_rate(n: int, dtype: numpy.dtype, workers: int, repeats: int = 5) -> float:
    """FLOP/s of ``workers`` single-threaded n x n matmuls run at once on
    ``workers`` threads (BLAS pinned to one thread): median over ``repeats`` rounds."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    rng = numpy.random.default_rng(0)
    operands = [(rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype),
                 numpy.empty((n, n), dtype=dtype)) for _ in range(workers)]

    def product(a, b, out):
        numpy.matmul(a, b, out=out)

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        def round_of_products():
            list(pool.map(lambda operand: product(*operand), operands))

        measured = timing.time_function(round_of_products, warmup=1, repeats=repeats)
    return workers * 2 * n**3 / measured.median_s


# ---------------------------------------------------------------- the worker processes


def _serve(connection, config: BenchConfig) -> None:
    """A worker's loop: receive (function name, arguments), reply ("ok", result)
    or ("error", traceback text); stop on None."""
    inputs = InputCache(config)
    functions = {"measure_moe": measure_moe, "measure_dense": measure_dense,
                 "measure_torch_moe": measure_torch_moe, "measure_torch_dense": measure_torch_dense,
                 "measure_ceilings": measure_ceilings, "measure_weight_read": measure_weight_read,
                 "measure_fixed_cost": measure_fixed_cost, "measure_gemm_rows": measure_gemm_rows,
                 "measure_activation": measure_activation}
    while True:
        request = connection.recv()
        if request is None:
            return
        name, arguments, point = request
        if point is not None and point != inputs.config:  # a grid point: its own shapes, its own inputs
            inputs = InputCache(point)
        try:
            function = functions[name]
            result = function(inputs.config) if name == "measure_ceilings" else \
                function(inputs.config, *arguments, inputs)
            connection.send(("ok", result))
        except Exception:  # reported to the driver, which stops the run
            connection.send(("error", traceback.format_exc()))


class Worker:
    """One worker process (started with ``spawn``: a fresh interpreter, no
    thread pools inherited) and the pipe the driver talks to it through."""

    def __init__(self, label: str, config: BenchConfig):
        self.label = label
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        with thread_environment(config.threads):
            self.process = context.Process(target=_serve, args=(child_end, config), name=f"bench-cpu-{label}",
                                           daemon=True)
            self.process.start()
        child_end.close()

    def call(self, name: str, *arguments, point: Optional[BenchConfig] = None) -> dict:
        """``name(config, *arguments, inputs)`` in the worker; ``point``: the
        configuration to use from now on (a grid point), else the last one."""
        self.connection.send((name, arguments, point))
        status, result = self.connection.recv()
        if status == "error":
            raise RuntimeError(f"the {self.label} worker failed in {name}{arguments}:\n{result}")
        return result

    def close(self) -> None:
        try:
            self.connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()


class thread_environment:
    """Within the block, the BLAS and OpenMP thread variables say ``threads``
    (None: unchanged), so that a process started then reads them at start-up."""

    def __init__(self, threads: Optional[int]):
        self.threads = threads
        self.saved: dict = {}

    def __enter__(self):
        if self.threads is not None:
            for variable in records.THREAD_VARIABLES:
                self.saved[variable] = os.environ.get(variable)
                os.environ[variable] = str(self.threads)
        return self

    def __exit__(self, *exception):
        for variable, value in self.saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        return False


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class BenchResult:
    """The run's ceilings, its measurements (record-shaped dicts) and one table row per (activation, T, k)."""

    config: BenchConfig
    ceilings: dict
    measurements: list[dict]
    rows: list[dict]
    torch_note: Optional[str] = None


def torch_reasons(config: BenchConfig) -> tuple[Optional[str], Optional[str]]:
    """(why PyTorch is not timed, why torch._grouped_mm is not timed), None where it is."""
    if not config.torch_peers:
        return "left out (--no-torch)", "left out (--no-torch)"
    reason = peers.torch_unavailable_reason("cpu")
    if reason is not None:
        return reason, reason
    return None, peers.grouped_mm_unavailable_reason("cpu")


def run_bench(config: BenchConfig, *, progress: bool = True) -> BenchResult:
    """Measure the ceilings, then every (activation, T, k), alternating between the workers."""
    check_config(config)
    torch_reason, grouped_reason = torch_reasons(config)
    per_k = [MOE_CPU, DENSE_CPU] + ([] if torch_reason else [TORCH_EAGER, DENSE_TORCH]) + \
        ([] if grouped_reason else [TORCH_GROUPED])
    total = 2 + config.rounds * len(config.activations) * len(config.tokens) * (len(config.top_ks) * len(per_k) + 1)
    numpy_worker = Worker("NumPy", config)
    torch_worker = None if torch_reason else Worker("PyTorch", config)
    timed: list[tuple] = []  # (implementation, worker result, params), made into records once the ceilings are known
    last_worker = [None]

    def on(worker: Worker, name: str, *arguments) -> dict:
        if last_worker[0] is not None and last_worker[0] is not worker:
            time.sleep(config.pause_s)  # the other process's threads go quiet first
        last_worker[0] = worker
        return worker.call(name, *arguments)

    try:
        with tqdm(total=total, desc="bench-cpu", unit="measurement", disable=not progress) as bar:
            bar.set_postfix_str("ceilings")
            first_ceilings = on(numpy_worker, "measure_ceilings")
            bar.update()

            def add(implementation: tuple, result: dict, round_: int, **params) -> None:
                timed.append((implementation, result, {"round_": round_, **params}))
                bar.update()

            for activation in config.activations:
                for T in config.tokens:
                    for round_ in range(config.rounds):
                        where = f"{activation} T={T} round {round_ + 1}/{config.rounds}"
                        for K in config.top_ks:
                            width = K * config.d_ff
                            bar.set_postfix_str(f"{where} k={K}")
                            add(MOE_CPU, on(numpy_worker, "measure_moe", activation, T, K), round_,
                                activation=activation, tokens=T, top_k=K)
                            add(DENSE_CPU, on(numpy_worker, "measure_dense", activation, T, width), round_,
                                activation=activation, tokens=T, width=width,
                                compared_as=f"equal active FLOPs, k={K}")
                            if torch_worker is None:
                                continue
                            add(TORCH_EAGER, on(torch_worker, "measure_torch_moe", "torch-eager", activation, T, K),
                                round_, activation=activation, tokens=T, top_k=K)
                            if grouped_reason is None:
                                add(TORCH_GROUPED, on(torch_worker, "measure_torch_moe", "torch-grouped-mm",
                                                      activation, T, K), round_, activation=activation, tokens=T,
                                    top_k=K)
                            add(DENSE_TORCH, on(torch_worker, "measure_torch_dense", activation, T, width), round_,
                                activation=activation, tokens=T, width=width,
                                compared_as=f"equal active FLOPs, k={K}")
                        width = config.n_experts * config.d_ff
                        bar.set_postfix_str(f"{where} dense E*F")
                        add(DENSE_CPU, on(numpy_worker, "measure_dense", activation, T, width), round_,
                            activation=activation, tokens=T, width=width, compared_as="equal parameters")
            bar.set_postfix_str("ceilings again")
            last_ceilings = on(numpy_worker, "measure_ceilings")
            bar.update()
    finally:
        numpy_worker.close()
        if torch_worker is not None:
            torch_worker.close()
    note = None if torch_reason is None and grouped_reason is None else \
        f"PyTorch: {torch_reason or 'timed'}; torch._grouped_mm: {grouped_reason or 'timed'}"
    ceilings = best_ceilings(first_ceilings, last_ceilings)
    measurements = [as_record(implementation, result, ceilings, config, **params)
                    for implementation, result, params in timed]
    return BenchResult(config, ceilings, measurements, table_rows(measurements, ceilings), note)


def best_ceilings(first: dict, last: dict) -> dict:
    """The ceilings measured at the start and at the end of the run, the
    higher of each: on a machine others share, the quieter moment is the
    closer to what the hardware can do, and the ratios against it the stricter."""
    few_rows = "few_row_read_bytes_per_s"
    best = {key: max(first[key], last[key]) for key in first if key.endswith("_per_s") and key != few_rows}
    best[few_rows] = {n: max(first[few_rows][n], last[few_rows][n]) for n in first[few_rows]}
    best["sgemm_flop_per_s"] = max(best["sgemm_blas_threads_flop_per_s"], best["sgemm_one_per_worker_flop_per_s"])
    return {**best, "threads": first["threads"], "measured": [first, last]}


def as_record(implementation: tuple, result: dict, ceilings: dict, config: BenchConfig, *, activation: str,
              tokens: int, round_: int = 0, top_k: Optional[int] = None, width: Optional[int] = None,
              compared_as: Optional[str] = None) -> dict:
    """One worker result as a tidy ``bench-cpu`` record (``round``: which of the run's rounds timed it)."""
    name, backend = implementation
    measured = timing.Timing(**result["timing"])
    params = {"tokens": tokens, "d_model": config.d_model, "activation": activation, "dtype": config.dtype,
              "seed": config.seed}
    if name == "moe":
        params.update(d_ff=config.d_ff, n_experts=config.n_experts, top_k=top_k, capacity_factor=None)
    else:
        params.update(d_ff=width)
    extra = {key: value for key, value in result.items() if key not in ("timing", "flops", "rotation_sets")}
    if compared_as is not None:
        extra["compared_as"] = compared_as
    return {
        "implementation": name, "backend": backend, "measurement": "forward-time", "round": round_,
        **measured.as_dict(),
        "flops": result["flops"],
        "flop_per_s": result["flops"] / measured.median_s,
        "fraction_of_sgemm": result["flops"] / measured.median_s / ceilings["sgemm_flop_per_s"],
        "sgemm_flop_per_s": ceilings["sgemm_flop_per_s"],
        "copy_bytes_per_s": ceilings["copy_bytes_per_s"],
        "rotation_sets": result["rotation_sets"],
        **extra,
        "params": params,
    }


def ceiling_records(result: BenchResult) -> list[dict]:
    ceilings, config = result.ceilings, result.config
    return [
        {"implementation": "numpy-matmul", "backend": "cpu", "measurement": "sgemm-rate",
         "flop_per_s": ceilings["sgemm_flop_per_s"],
         "blas_threads_flop_per_s": ceilings["sgemm_blas_threads_flop_per_s"],
         "one_per_worker_flop_per_s": ceilings["sgemm_one_per_worker_flop_per_s"],
         "flop_per_s_at_start_and_end": [m["sgemm_flop_per_s"] for m in ceilings.get("measured", [])],
         "threads": ceilings["threads"], "params": {"n": config.sgemm_n, "dtype": config.dtype}},
        {"implementation": "numpy-copyto", "backend": "cpu", "measurement": "copy-bandwidth",
         "bytes_per_s": ceilings["copy_bytes_per_s"],
         "bytes_per_s_at_start_and_end": [m["copy_bytes_per_s"] for m in ceilings.get("measured", [])],
         "params": {"bytes": config.copy_bytes}},
        *({"implementation": "numpy-matmul", "backend": "cpu", "measurement": "few-row-read-rate",
           "bytes_per_s": ceilings["few_row_read_bytes_per_s"][n], "threads": 1,
           "bytes_per_s_at_start_and_end": [m["few_row_read_bytes_per_s"][n] for m in ceilings.get("measured", [])],
           "params": {"rows": n, "d_model": config.d_model, "d_ff": config.d_ff, "dtype": config.dtype}}
          for n in sorted(ceilings["few_row_read_bytes_per_s"])),
    ]


def to_records(result: BenchResult) -> list[dict]:
    """The ceilings, then one record per measurement."""
    return [*ceiling_records(result), *result.measurements]


# ---------------------------------------------------------------- the table


#: A table row's ratios: (field, the time it divides the MoE's time by), and the
#: MoE's and the PyTorch loop's shares of the SGEMM rate; each with ``<field>_interval``.
RATIOS = (("moe_over_dense_active", "dense_active_s"), ("moe_over_dense_params", "dense_params_s"),
          ("moe_over_torch_eager", "torch_eager_s"), ("moe_over_torch_grouped", "torch_grouped_s"),
          ("moe_over_torch_dense", "torch_dense_s"), ("moe_over_weight_read", "weight_read_s"))
RATIO_FIELDS = tuple(field for field, _ in RATIOS) + ("moe_fraction_of_sgemm", "torch_eager_fraction_of_sgemm")
TIME_FIELDS = ("moe_s",) + tuple(baseline for _, baseline in RATIOS)


def table_rows(measurements: list[dict], ceilings: dict) -> list[dict]:
    """One row per (activation, T, k) with a timed MoE. Each round of the run
    gives the MoE's time over each other time *of that round* (below 1, the MoE
    is faster); the row holds each time's median over the rounds and each
    ratio's geometric mean over the rounds with its 95% interval
    (``<ratio>_interval``: Student's t on the log ratios, None with one
    round). A baseline that was not timed gives None."""
    by_round: dict = {}
    for record in measurements:
        by_round.setdefault(record.get("round", 0), []).append(record)
    grouped: dict = {}
    for round_ in sorted(by_round):
        for row in _round_rows(by_round[round_], ceilings):
            grouped.setdefault((row["activation"], row["tokens"], row["top_k"]), []).append(row)
    rows = [_over_rounds(rows) for rows in grouped.values()]
    return sorted(rows, key=lambda row: (row["activation"], row["top_k"], row["tokens"]))


def _round_rows(measurements: list[dict], ceilings: dict) -> list[dict]:
    """The rows of one round: its times and the ratios between them."""
    def key(record):
        params = record["params"]
        return (record["implementation"], record["backend"], params["activation"], params["tokens"],
                params.get("top_k") if record["implementation"] == "moe" else params["d_ff"])

    found = {key(record): record for record in measurements}
    rows = []
    for record in measurements:
        if (record["implementation"], record["backend"]) != MOE_CPU:
            continue
        params = record["params"]
        activation, T, K, F, E = (params["activation"], params["tokens"], params["top_k"], params["d_ff"],
                                  params["n_experts"])

        def seconds(implementation, backend, last):
            other = found.get((implementation, backend, activation, T, last))
            return None if other is None else other["median_s"]

        moe_s = record["median_s"]
        row = {
            "activation": activation, "tokens": T, "top_k": K, "threads": record.get("threads"),
            "moe_s": moe_s,
            "dense_active_s": seconds("dense", "cpu", K * F),
            "dense_params_s": seconds("dense", "cpu", E * F),
            "torch_eager_s": seconds("moe", "torch-eager", K),
            "torch_grouped_s": seconds("moe", "torch-grouped-mm", K),
            "torch_dense_s": seconds("dense", "torch", K * F),
            "moe_fraction_of_sgemm": record["flops"] / moe_s / ceilings["sgemm_flop_per_s"],
            # Decode only: at larger T the MoE is compute-bound and this ratio says nothing.
            "weight_read_s": (record["touched_weight_bytes"] / ceilings["copy_bytes_per_s"]
                              if T <= DECODE_TOKENS else None),
        }
        for name, baseline in RATIOS:
            row[name] = None if row[baseline] is None else moe_s / row[baseline]
        # Where both are bound by the GEMMs, the loop's own share of SGEMM sets
        # how far below its time the MoE can get.
        eager = found.get(("moe", "torch-eager", activation, T, K))
        row["torch_eager_fraction_of_sgemm"] = (None if eager is None else
                                                eager["flops"] / eager["median_s"] / ceilings["sgemm_flop_per_s"])
        rows.append(row)
    return rows


def _over_rounds(rows: list[dict]) -> dict:
    """One (activation, T, k)'s rows of every round as one row (see ``table_rows``)."""
    first = rows[0]
    merged = {name: first[name] for name in ("activation", "tokens", "top_k", "threads")}
    merged["rounds"] = len(rows)
    for name in TIME_FIELDS:
        values = [row[name] for row in rows]
        merged[name] = None if None in values else float(numpy.median(values))
    for name in RATIO_FIELDS:
        values = [row[name] for row in rows]
        merged[name], merged[f"{name}_interval"] = (None, None) if None in values else geometric_mean_interval(values)
    return merged


def geometric_mean_interval(ratios: list[float]) -> tuple[float, Optional[list]]:
    """(geometric mean, [low, high]) of positive ratios: the mean of their logs
    and its 95% interval (``intervals.t_interval``), mapped back; the interval
    is None for one ratio."""
    logs = numpy.log(numpy.asarray(ratios, dtype=numpy.float64))
    if logs.size < 2:
        return float(numpy.exp(logs.mean())), None
    mean, _, half = intervals.t_interval(logs)
    return float(numpy.exp(mean)), [float(numpy.exp(mean - half)), float(numpy.exp(mean + half))]


def ceilings_from_records(found: list[dict]) -> dict:
    """The ceilings of one run's records, as ``measure_ceilings`` returned them."""
    sgemm = [record for record in found if record.get("measurement") == "sgemm-rate"]
    copy = [record for record in found if record.get("measurement") == "copy-bandwidth"]
    if not sgemm or not copy:
        raise ValueError("records: expected the run's sgemm-rate and copy-bandwidth records, found "
                         f"{len(sgemm)} and {len(copy)}")
    few_rows = {record["params"]["rows"]: record["bytes_per_s"] for record in found
                if record.get("measurement") == "few-row-read-rate"}
    return {"sgemm_flop_per_s": sgemm[0]["flop_per_s"],
            "sgemm_blas_threads_flop_per_s": sgemm[0].get("blas_threads_flop_per_s"),
            "sgemm_one_per_worker_flop_per_s": sgemm[0].get("one_per_worker_flop_per_s"),
            "threads": sgemm[0].get("threads"), "copy_bytes_per_s": copy[0]["bytes_per_s"],
            "few_row_read_bytes_per_s": few_rows}


def rows_from_records(found: list[dict]) -> tuple[list[dict], dict]:
    """(table rows, ceilings) of one run's ``bench-cpu`` records, rebuilt with
    ``table_rows`` exactly as ``run_bench`` built them: how a chapter shows a committed run."""
    ceilings = ceilings_from_records(found)
    return table_rows([record for record in found if record.get("measurement") == "forward-time"], ceilings), \
        ceilings


#: The printed table's columns: (header, row field, kind).
TABLE_COLUMNS = (
    ("act", "activation", "text"), ("T", "tokens", "text"), ("k", "top_k", "text"),
    ("moe ms", "moe_s", "ms"), ("/dense K*F", "moe_over_dense_active", "ratio"),
    ("/dense E*F", "moe_over_dense_params", "ratio"), ("/torch loop", "moe_over_torch_eager", "ratio"),
    ("/grouped_mm", "moe_over_torch_grouped", "ratio"), ("/torch dense", "moe_over_torch_dense", "ratio"),
    ("/weight read", "moe_over_weight_read", "ratio"), ("% SGEMM", "moe_fraction_of_sgemm", "percent"),
    ("loop % SGEMM", "torch_eager_fraction_of_sgemm", "percent"),
)


def format_table(rows: list[dict]) -> str:
    """The ratio table ``main`` prints: MoE time and MoE time over each other
    time, each ratio as its geometric mean over the rounds ± the larger side
    of its 95% interval."""
    return "\n".join(_aligned(rows, TABLE_COLUMNS))


def _aligned(rows: list[dict], columns: tuple) -> list[str]:
    """The lines of a right-aligned text table of ``rows`` under ``columns``
    ((header, field, kind): kind "text", "ms", "percent" or a ratio), a rule under the header."""
    def cell(row, field, kind):
        value = row[field]
        if value is None:
            return "-"
        if kind == "text":
            return str(value)
        if kind == "ms":
            return f"{value * 1e3:.3g}"
        return ratio_text(row, field, percent=kind == "percent")

    lines = [tuple(header for header, _, _ in columns)]
    lines += [tuple(cell(row, field, kind) for _, field, kind in columns) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(columns))]
    text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return text


def ratio_text(row: dict, field: str, *, percent: bool = False, sign: str = "±") -> str:
    """A row's ratio as text: "0.93±0.04" (the geometric mean ± the larger side
    of its 95% interval; "0.93" with one round), or "93±2" as a percentage."""
    value = row[field]
    scale, digits = (100, 0) if percent else (1, 2)
    interval = row.get(f"{field}_interval")
    spread = "" if interval is None else f"{sign}{scale * max(interval[1] - value, value - interval[0]):.{digits}f}"
    return f"{scale * value:.{digits}f}{spread}"


@dataclasses.dataclass(frozen=True)
class Goal:
    """One target judged on one run: the worst value among the rows it covers
    (each row's geometric mean over the rounds), with that row's 95% interval."""

    name: str
    threshold: float
    worst: Optional[float]  # None: no row covered (not judged)
    where: str  # the row of the worst value
    met: Optional[bool]
    interval: Optional[list] = None  # [low, high] of the worst row; None with one round

    @property
    def within_noise(self) -> bool:
        """Whether the worst row's interval reaches across the threshold."""
        return self.interval is not None and self.interval[0] <= self.threshold <= self.interval[1]

    def line(self) -> str:
        if self.met is None:
            return f"{self.name}: not judged ({self.where})"
        verdict = "MET" if self.met else "NOT MET"
        if self.within_noise:
            verdict += " (its 95% interval reaches across the target)"
        interval = "" if self.interval is None else f" [95% interval {self.interval[0]:.3g} to {self.interval[1]:.3g}]"
        return f"{self.name}: worst {self.worst:.3g}{interval} at {self.where} -> {verdict}"


def goals(rows: list[dict]) -> list[Goal]:
    """The four targets of the CPU baseline, each judged on every row it covers."""
    def judge(name, field, covers, threshold, at_most, why_not):
        covered = [row for row in rows if covers(row) and row[field] is not None]
        if not covered:
            return Goal(name, threshold, None, why_not, None)
        pick = max if at_most else min
        worst = pick(covered, key=lambda row: row[field])
        value = worst[field]
        where = f"{worst['activation']} T={worst['tokens']} k={worst['top_k']}"
        return Goal(name, threshold, value, where, value <= threshold if at_most else value >= threshold,
                    worst.get(f"{field}_interval"))

    return [
        judge(f"MoE / PyTorch eager loop <= {GOAL_MAX_RATIO_TO_EAGER} for T >= {PEER_TOKENS}",
              "moe_over_torch_eager", lambda row: row["tokens"] >= PEER_TOKENS, GOAL_MAX_RATIO_TO_EAGER, True,
              f"no PyTorch loop timed at T >= {PEER_TOKENS}"),
        judge(f"MoE / our dense at equal active FLOPs <= {GOAL_MAX_RATIO_TO_DENSE_ACTIVE} for T >= {LARGE_TOKENS}",
              "moe_over_dense_active", lambda row: row["tokens"] >= LARGE_TOKENS, GOAL_MAX_RATIO_TO_DENSE_ACTIVE,
              True, f"no T >= {LARGE_TOKENS} in this run"),
        judge(f"MoE fraction of the SGEMM rate >= {GOAL_MIN_FRACTION_OF_SGEMM} for T >= {LARGE_TOKENS}",
              "moe_fraction_of_sgemm", lambda row: row["tokens"] >= LARGE_TOKENS, GOAL_MIN_FRACTION_OF_SGEMM,
              False, f"no T >= {LARGE_TOKENS} in this run"),
        judge(f"decode: MoE / reading the touched weights at copy bandwidth <= {GOAL_MAX_DECODE_OVER_WEIGHT_READ}"
              f" for T <= {DECODE_TOKENS}", "moe_over_weight_read", lambda row: row["tokens"] <= DECODE_TOKENS,
              GOAL_MAX_DECODE_OVER_WEIGHT_READ, True, f"no T <= {DECODE_TOKENS} in this run"),
    ]


def goal_report(rows: list[dict]) -> list[str]:
    """The targets as ``main`` prints them, one line each."""
    return [goal.line() for goal in goals(rows)]


# ---------------------------------------------------------------- the shape grid (issue 24)


#: The grid's record kind: its own file, apart from the one-shape run's ``bench-cpu`` records.
GRID_KIND = "bench-cpu-grid"
#: The axes the grid samples (F is D times the ratio, rounded).
GRID_AXES = {
    "d_model": (256, 384, 512, 1024),
    "ff_ratio": (2.0, 3.5),
    "n_experts": (8, 16, 64),
    "tokens": (1, 16, 256, 4096),
    "activation": ("relu", "gelu", "swiglu"),
    "top_k": (1, 2),
}
GRID_POINTS = 30
#: The first seed (counting from 0) whose 30 points are all distinct and hold
#: every (T, activation), (T, k) and (T, E) pair at least once, so that each
#: target's rows (chosen by T) see every activation, k and E.
GRID_SEED = 2
#: The grid's targets (issue 24), each judged on the geometric means over the rounds.
GRID_GOAL_MEDIAN_TO_EAGER = 0.9  # median over the T >= PEER_TOKENS points
GRID_GOAL_WORST_TO_EAGER = 1.0  # worst of them
GRID_GOAL_DECODE_OVER_FLOOR = 1.5  # T <= DECODE_TOKENS: MoE time / reading the touched weights at the GEMV rate

#: The grid run's timing (the shapes come from each point). Five rounds of 30
#: points, so that a 95% interval over the rounds (a t interval with 4 degrees
#: of freedom, not 2) can tell a target met from one missed: three rounds
#: took 7 minutes on 2 idle cores, five are expected to take about 15.
GRID_EXPECTED_MINUTES = 15
GRID_PRESET = dataclasses.replace(
    PRESETS["full"], tokens=(), top_ks=(), activations=(), seconds_per_measurement=0.2, min_repeats=2,
    max_repeats=10, rounds=5)


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One shape of the grid: the layer and the call."""

    d_model: int
    d_ff: int
    n_experts: int
    tokens: int
    activation: str
    top_k: int

    def config(self, base: BenchConfig) -> BenchConfig:
        """``base`` (timing, seeds, threads) at this point's shape."""
        return dataclasses.replace(base, d_model=self.d_model, d_ff=self.d_ff, n_experts=self.n_experts,
                                   tokens=(self.tokens,), top_ks=(self.top_k,), activations=(self.activation,))

    def label(self) -> str:
        return (f"{self.activation} T={self.tokens} k={self.top_k} D={self.d_model} F={self.d_ff} "
                f"E={self.n_experts}")


def grid_points(count: int = GRID_POINTS, seed: int = GRID_SEED) -> list[GridPoint]:
    """``count`` points of ``GRID_AXES`` by a Latin hypercube with a fixed seed:
    along every axis, the points' strata are a random permutation of 0..count-1,
    stratum s taking level s * levels // count, so each level appears
    count / levels times (give or take one) and the axes vary independently.
    Sorted by (T, D, F, E, activation, k) so tables read in order."""
    if count < 1:
        raise ValueError(f"count: expected at least 1 grid point, got {count}")
    rng = numpy.random.default_rng(seed)
    columns = {axis: [levels[stratum * len(levels) // count] for stratum in rng.permutation(count)]
               for axis, levels in GRID_AXES.items()}
    points = {GridPoint(d_model=D, d_ff=int(round(D * ratio)), n_experts=E, tokens=T, activation=activation,
                        top_k=K)
              for D, ratio, E, T, activation, K in zip(*columns.values())}
    return sorted(points, key=lambda p: (p.tokens, p.d_model, p.d_ff, p.n_experts, p.activation, p.top_k))


def decode_product_rows(T: int, K: int, n_experts: int) -> int:
    """The rows each touched expert's products have at a decode point, about:
    T K assignments over the min(E, T K) experts they can reach at most."""
    return max(1, round(T * K / min(n_experts, T * K)))


def measure_weight_read(config: BenchConfig, T: int, K: int, inputs: "InputCache") -> dict:
    """The one-row GEMV rate at the config's (D, F) on one BLAS thread, the
    weights coming from memory (``few_row_read_rates``): decode's floor. And,
    where an expert's products have more rows at this T and K
    (``decode_product_rows``), the rate for that many rows: what the floor
    leaves out, since NumPy's BLAS reads the weights at another rate for a
    product of several rows (a GEMM, which packs them) than for one row."""
    rows = decode_product_rows(T, K, config.n_experts)
    rates = few_row_read_rates(config.d_model, config.d_ff, numpy.dtype(config.dtype), tuple(sorted({1, rows})))
    return {"bytes_per_s": rates[1], "threads": 1, "product_rows": rows, "product_rows_bytes_per_s": rates[rows]}


def measure_gemm_rows(config: BenchConfig, T: int, K: int, inputs: "InputCache") -> dict:
    """Why a layer of many small experts trails the dense MLP at equal active
    FLOPs: one BLAS thread's FLOP rate for an MLP's two products, (n, D) @ (D, F)
    then (n, F) @ (F, D), at n = an expert's mean rows (T K / E) and at n =
    the rows of one of the dense MLP's blocks (``topk_moe.cpu._block_rows``),
    the weights coming from memory (copies rotated past the last-level cache),
    as both layers read them. Their ratio is the slowdown the GEMMs alone
    bring, whatever the Python around them costs."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    D, F, E = config.d_model, config.d_ff, config.n_experts
    dtype = numpy.dtype(config.dtype)
    rng = numpy.random.default_rng(config.seed)
    first = rng.standard_normal((D, F)).astype(dtype)
    second = rng.standard_normal((F, D)).astype(dtype)
    sets = timing.sets_to_exceed_cache(first.nbytes + second.nbytes)
    weights = [(first, second)] + [(first.copy(), second.copy()) for _ in range(sets - 1)]
    rows = {"expert_rows": max(1, round(T * K / E)), "dense_rows": topk_moe.cpu._block_rows(T)}
    result = {"threads": 1, **rows}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, n in rows.items():
            x = rng.standard_normal((n, D)).astype(dtype)
            hidden = numpy.empty((n, F), dtype=dtype)
            out = numpy.empty((n, D), dtype=dtype)

            def mlp_products(w1, w2):
                numpy.matmul(x, w1, out=hidden)
                numpy.matmul(hidden, w2, out=out)

            measured = timing.time_function(mlp_products, args_sets=weights, warmup=len(weights),
                                            repeats=max(10, 2 * len(weights)))
            result[name.replace("rows", "flop_per_s")] = 4 * n * D * F / measured.median_s
    return result


def measure_activation(config: BenchConfig, T: int, K: int, activation: str, library: str,
                       inputs: "InputCache") -> dict:
    """Why the PyTorch loop can beat our layer at small D: one thread's time to
    activate one expert's hidden rows (T K / E rows of width F, the rows the
    eager loop activates per expert and about those of one of our blocks),
    ``library`` "numpy" (``topk_moe.cpu._activate``, in place) or "torch"
    (the eager loop's ``peers.activate``) in its own worker. The rows are
    copied in from the same random values before each call, untimed."""
    rows = max(1, round(T * K / config.n_experts))
    rng = numpy.random.default_rng(config.seed)
    source = rng.standard_normal((rows, config.d_ff)).astype(config.dtype)
    gate = rng.standard_normal((rows, config.d_ff)).astype(config.dtype) if activation == "swiglu" else None
    work = numpy.empty_like(source)

    def refill():
        numpy.copyto(work, source)

    if library == "numpy":
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        with threadpool_limits(limits=1, user_api="blas"):
            measured = timing.time_function(lambda: topk_moe.cpu._activate(work, gate, activation), setup=refill,
                                            warmup=3, repeats=20)
        return {"median_s": measured.median_s, "rows": rows, "threads": 1}
    if library != "torch":
        raise ValueError(f"library: expected 'numpy' or 'torch', got {library!r}")
    import torch  # noqa: PLC0415 - only the PyTorch worker imports torch

    hidden, torch_gate = peers.as_torch(work), None if gate is None else peers.as_torch(gate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            measured = timing.time_function(lambda: peers.activate(hidden, torch_gate, activation), setup=refill,
                                            warmup=3, repeats=20)
    finally:
        torch.set_num_threads(threads)
    return {"median_s": measured.median_s, "rows": rows, "threads": 1}


#: The steps of a T = 1 call, in the order it makes them (see ``measure_fixed_cost``).
FIXED_COST_STEPS = ("checks", "blas pinning", "routing", "plan", "gather and store", "expert MLPs", "the rest")


def measure_fixed_cost(config: BenchConfig, activation: str, K: int, inputs: "InputCache",
                       repeats: int = 400) -> dict:
    """Where the time of one T = 1 call goes, step by step, with hot caches
    (the weights of the experts it touches stay in cache: this is the cost a
    call pays besides reading them). Each step timed apart, its median over
    ``repeats`` calls:

    - the whole call, ``topk_moe.moe_forward(backend="cpu")``, and the
      backend's own ``topk_moe.cpu.moe_forward``: the API's argument checks
      (shapes, dtypes, the finite check) are the difference;
    - BLAS pinning: entering and leaving ``cpu._pinned_blas``;
    - routing (``cpu._route``) and the plan (``cpu.dispatch``);
    - gather and store: the output and per-row weights (``cpu._TokenSums``),
      the gather of the token's row and the weighted store into y;
    - expert MLPs: the touched experts' GEMVs and activation alone;
    - the rest: the backend's time less its measured steps (building and
      running the tasks, the Python between them).
    """
    cpu = topk_moe.cpu
    cfg = layer_config(config, activation, K)
    x, weights = inputs.moe_sets(activation, 1, 1)[0]
    router, w1, w2, w3 = weights.router, weights.w1, weights.w2, weights.w3

    def median_s(function) -> float:
        return timing.time_function(function, warmup=20, repeats=repeats).median_s

    def backend():
        return cpu.moe_forward(x, router, w1, w2, w3, activation, K, cfg.renormalize, None)

    def pinning():
        with cpu._pinned_blas():
            pass

    whole = median_s(lambda: topk_moe.moe_forward(x, weights, cfg, backend="cpu"))
    backend_s = median_s(backend)
    with cpu._pinned_blas() as workers:
        routing = cpu._route(x, router, K, cfg.renormalize, workers)
        plan = cpu.dispatch(routing.experts, cfg.n_experts, None)
        bounds = plan.offsets.tolist()
        touched = [e for e in range(cfg.n_experts) if bounds[e] < bounds[e + 1]]
        rows = numpy.take(x, plan.token, axis=0)

        def gather_and_store():
            sums = cpu._TokenSums(plan, routing.weights, 1, x.shape[1])
            for e in touched:
                out = sums.buffer(bounds[e], bounds[e + 1])
                cpu._rows(x, plan.token, bounds[e], bounds[e + 1], cpu._scratch.get("rows", out.shape, x.dtype))
                sums.store(bounds[e], bounds[e + 1], out)

        def expert_mlps():
            out = cpu._scratch.get("fixed-cost-out", (1, x.shape[1]), x.dtype)
            for e in touched:
                cpu._mlp_into(rows[bounds[e]:bounds[e + 1]], w1[e], w2[e], None if w3 is None else w3[e],
                              activation, out)

        steps = {"routing": median_s(lambda: cpu._route(x, router, K, cfg.renormalize, workers)),
                 "plan": median_s(lambda: cpu.dispatch(routing.experts, cfg.n_experts, None)),
                 "gather and store": median_s(gather_and_store),
                 "expert MLPs": median_s(expert_mlps)}
    steps["blas pinning"] = median_s(pinning)
    steps["checks"] = whole - backend_s
    steps["the rest"] = backend_s - sum(steps[name] for name in ("blas pinning", "routing", "plan",
                                                                 "gather and store", "expert MLPs"))
    return {"whole_s": whole, "backend_s": backend_s, "steps_s": {name: steps[name] for name in FIXED_COST_STEPS},
            "experts_touched": len(touched), "threads": cpu.threads()}


def run_grid(base: BenchConfig, points: list[GridPoint], *, progress: bool = True) -> "GridResult":
    """Every grid point ``base.rounds`` times over, its rounds one after the
    other as the one-shape run does (so each worker builds a point's weights
    once: the largest layers take seconds to draw and copy): our MoE, our dense MLP
    at equal active FLOPs, the PyTorch eager loop, and for decode points the
    one-row weight-read rate at the point's (D, F); then the fixed cost of a
    T = 1 call at the one-shape bench's layer (``base``'s shape), k = 1 and 2.
    The ceilings are measured at the start and end as in ``run_bench``."""
    check_config(dataclasses.replace(base, tokens=(1,), top_ks=(1,), activations=("relu",)))
    torch_reason, _ = torch_reasons(base)
    per_point = 2 + (0 if torch_reason else 1)
    total = 2 + base.rounds * sum(per_point + (p.tokens <= DECODE_TOKENS) + (p.tokens >= LARGE_TOKENS)
                                  + (0 if torch_reason else 2 * (p.tokens >= PEER_TOKENS))
                                  for p in points) + 2 * base.rounds
    shape = dataclasses.replace(base, tokens=(1,), top_ks=(1, 2), activations=("gelu",))
    numpy_worker = Worker("NumPy", base)
    torch_worker = None if torch_reason else Worker("PyTorch", base)
    timed: list[dict] = []
    fixed: list[dict] = []
    last_worker = [None]

    def on(worker: Worker, name: str, *arguments, point: BenchConfig) -> dict:
        if last_worker[0] is not None and last_worker[0] is not worker:
            time.sleep(base.pause_s)
        last_worker[0] = worker
        return worker.call(name, *arguments, point=point)

    try:
        with tqdm(total=total, desc="bench-cpu grid", unit="measurement", disable=not progress) as bar:
            first_ceilings = on(numpy_worker, "measure_ceilings", point=shape)
            bar.update()
            for index, point in enumerate(points):
                config = point.config(base)
                for round_ in range(base.rounds):
                    bar.set_postfix_str(f"round {round_ + 1}/{base.rounds} {point.label()}")
                    T, K, activation = point.tokens, point.top_k, point.activation
                    common = {"grid_point": index, "round": round_, "point": dataclasses.asdict(point)}
                    timed.append({"implementation": MOE_CPU, **common,
                                  "result": on(numpy_worker, "measure_moe", activation, T, K, point=config)})
                    timed.append({"implementation": DENSE_CPU, **common, "result": on(
                        numpy_worker, "measure_dense", activation, T, K * point.d_ff, point=config)})
                    bar.update(2)
                    if T <= DECODE_TOKENS:
                        timed.append({"implementation": WEIGHT_READ, **common,
                                      "result": on(numpy_worker, "measure_weight_read", T, K, point=config)})
                        bar.update()
                    if T >= LARGE_TOKENS:
                        timed.append({"implementation": GEMM_ROWS, **common,
                                      "result": on(numpy_worker, "measure_gemm_rows", T, K, point=config)})
                        bar.update()
                    if torch_worker is not None:
                        timed.append({"implementation": TORCH_EAGER, **common, "result": on(
                            torch_worker, "measure_torch_moe", "torch-eager", activation, T, K, point=config)})
                        bar.update()
                    if torch_worker is not None and T >= PEER_TOKENS:
                        for implementation, worker, library in ((ACTIVATION_CPU, numpy_worker, "numpy"),
                                                                (ACTIVATION_TORCH, torch_worker, "torch")):
                            timed.append({"implementation": implementation, **common, "result": on(
                                worker, "measure_activation", T, K, activation, library, point=config)})
                        bar.update(2)
            for round_ in range(base.rounds):
                for K in (1, 2):
                    bar.set_postfix_str(f"round {round_ + 1}/{base.rounds} fixed cost at T = 1, k = {K}")
                    fixed.append({"round": round_, "top_k": K,
                                  "result": on(numpy_worker, "measure_fixed_cost", "gelu", K, point=shape)})
                    bar.update()
            last_ceilings = on(numpy_worker, "measure_ceilings", point=shape)
            bar.update()
    finally:
        numpy_worker.close()
        if torch_worker is not None:
            torch_worker.close()
    ceilings = best_ceilings(first_ceilings, last_ceilings)
    measurements = [grid_record(entry, base) for entry in timed]
    fixed_records = [fixed_cost_record(entry, shape) for entry in fixed]
    return GridResult(shape, points, ceilings, measurements, fixed_records,
                      None if torch_reason is None else f"PyTorch: {torch_reason}")


@dataclasses.dataclass
class GridResult:
    """A grid run: ``config`` is the one shape its ceilings and fixed-cost breakdown were measured at."""

    config: BenchConfig
    points: list
    ceilings: dict
    measurements: list[dict]
    fixed_cost: list[dict]
    torch_note: Optional[str] = None


def grid_record(entry: dict, base: BenchConfig) -> dict:
    """One grid measurement as a tidy ``bench-cpu-grid`` record."""
    name, backend = entry["implementation"]
    result, point = entry["result"], entry["point"]
    params = {"tokens": point["tokens"], "d_model": point["d_model"], "d_ff": point["d_ff"],
              "n_experts": point["n_experts"], "top_k": point["top_k"], "activation": point["activation"],
              "dtype": base.dtype, "seed": base.seed, "capacity_factor": None}
    record = {"implementation": name, "backend": backend, "grid_point": entry["grid_point"], "round": entry["round"],
              "threads": result["threads"], "params": params}
    if name == "weight-read":
        return {**record, "measurement": "one-row-read-rate", "bytes_per_s": result["bytes_per_s"],
                "product_rows": result["product_rows"], "product_rows_bytes_per_s": result["product_rows_bytes_per_s"]}
    if name == "activation":
        return {**record, "measurement": "activation-time", "median_s": result["median_s"], "rows": result["rows"]}
    if (name, backend) == GEMM_ROWS:
        return {**record, "measurement": "gemm-rate-by-rows",
                **{key: result[key] for key in ("expert_rows", "dense_rows", "expert_flop_per_s", "dense_flop_per_s")}}
    extra = {key: value for key, value in result.items() if key not in ("timing", "flops", "rotation_sets", "threads")}
    if name == "dense":
        extra["dense_d_ff"] = point["top_k"] * point["d_ff"]
        extra["compared_as"] = "equal active FLOPs"
    return {**record, "measurement": "forward-time", **timing.Timing(**result["timing"]).as_dict(),
            "flops": result["flops"], "rotation_sets": result["rotation_sets"], **extra}


def fixed_cost_record(entry: dict, shape: BenchConfig) -> dict:
    result = entry["result"]
    return {"implementation": "moe", "backend": "cpu", "measurement": "fixed-cost", "round": entry["round"],
            "whole_s": result["whole_s"], "backend_s": result["backend_s"], "steps_s": result["steps_s"],
            "experts_touched": result["experts_touched"], "threads": result["threads"],
            "params": {"tokens": 1, "d_model": shape.d_model, "d_ff": shape.d_ff, "n_experts": shape.n_experts,
                       "top_k": entry["top_k"], "activation": "gelu", "dtype": shape.dtype}}


def grid_to_records(result: GridResult) -> list[dict]:
    """The ceilings (as the one-shape run writes them), the grid's measurements, the fixed-cost breakdown."""
    shape_result = BenchResult(result.config, result.ceilings, [], [])
    return [*ceiling_records(shape_result), *result.measurements, *result.fixed_cost]


#: A grid row's ratios: (field, the time it divides the MoE's by).
GRID_RATIOS = (("moe_over_torch_eager", "torch_eager_s"), ("moe_over_dense_active", "dense_active_s"),
               ("moe_over_weight_floor", "weight_floor_s"))


def grid_rows(found: list[dict]) -> list[dict]:
    """One row per grid point: its shape, the MoE's time (median over the
    rounds) and each ratio's geometric mean over the rounds with its 95%
    interval (``<ratio>_interval``) and its per-round values
    (``<ratio>_rounds``, in round order). A ratio is taken within a round. The
    decode floor (T <= DECODE_TOKENS): the touched experts' weight bytes over
    the one-row GEMV rate measured at the point's (D, F) in the same round."""
    by_point: dict = {}
    for record in found:
        if "grid_point" in record:
            by_point.setdefault(record["grid_point"], {}).setdefault(record["round"], {})[
                (record["implementation"], record["backend"])] = record
    rows = []
    for index in sorted(by_point):
        rounds = [by_point[index][round_] for round_ in sorted(by_point[index])]
        moe = [measured.get(MOE_CPU) for measured in rounds]
        if None in moe:
            continue
        params = moe[0]["params"]
        row = {"grid_point": index, **{key: params[key] for key in ("tokens", "d_model", "d_ff", "n_experts",
                                                                     "top_k", "activation")},
               "rounds": len(rounds), "moe_s": float(numpy.median([m["median_s"] for m in moe]))}
        for field, _ in GRID_RATIOS:
            ratios = []
            for measured, moe_record in zip(rounds, moe):
                other = grid_baseline_s(field, measured, moe_record)
                ratios.append(None if other is None else moe_record["median_s"] / other)
            if None in ratios:
                row[field], row[f"{field}_interval"], row[f"{field}_rounds"] = None, None, None
            else:
                row[field], row[f"{field}_interval"] = geometric_mean_interval(ratios)
                row[f"{field}_rounds"] = ratios
        row.update(decode_rows_slowdown(rounds))
        row.update(gemm_rows_slowdown(rounds))
        row.update(activation_over_torch(rounds))
        rows.append(row)
    return rows


def _ratio_over_rounds(rounds: list[dict], field: str, ratio: Callable[[dict], Optional[float]],
                       shown: Callable[[dict], dict]) -> dict:
    """One of the grid's explanations of its targets: ``ratio`` of each
    round's records (None where the round lacks the measurement) as a
    geometric mean over the rounds with its 95% interval, under ``field`` and
    ``<field>_interval``, beside ``shown`` of the first round's records; {}
    unless every round has it."""
    ratios = [ratio(measured) for measured in rounds]
    if not ratios or None in ratios:
        return {}
    value, interval = geometric_mean_interval(ratios)
    return {**shown(rounds[0]), field: value, f"{field}_interval": interval}


def decode_rows_slowdown(rounds: list[dict]) -> dict:
    """A decode point's weight-read records: the rows of each touched expert's
    products and how much slower one thread's BLAS reads the weights for that
    many rows than for one (the one-row rate over that rate); {} where the
    point has none (or its records predate the measurement)."""
    def ratio(measured):
        read = measured.get(WEIGHT_READ)
        return None if read is None or "product_rows" not in read else \
            read["bytes_per_s"] / read["product_rows_bytes_per_s"]

    return _ratio_over_rounds(rounds, "decode_rows_slowdown", ratio,
                              lambda first: {"decode_product_rows": first[WEIGHT_READ]["product_rows"]})


def gemm_rows_slowdown(rounds: list[dict]) -> dict:
    """A T >= LARGE_TOKENS grid point's ``measure_gemm_rows``: the mean rows
    per expert, the dense block's rows, and the GEMMs' slowdown (rate at the
    dense block's rows over rate at an expert's); {} where the point has none."""
    def ratio(measured):
        rates = measured.get(GEMM_ROWS)
        return None if rates is None else rates["dense_flop_per_s"] / rates["expert_flop_per_s"]

    return _ratio_over_rounds(rounds, "gemm_rows_slowdown", ratio, lambda first: {
        "expert_rows": first[GEMM_ROWS]["expert_rows"], "dense_rows": first[GEMM_ROWS]["dense_rows"]})


def activation_over_torch(rounds: list[dict]) -> dict:
    """A T >= PEER_TOKENS grid point's ``measure_activation``: our activation's
    time over PyTorch's on one expert's rows, one thread each; {} where the
    point has none."""
    def ratio(measured):
        ours, theirs = measured.get(ACTIVATION_CPU), measured.get(ACTIVATION_TORCH)
        return None if ours is None or theirs is None else ours["median_s"] / theirs["median_s"]

    return _ratio_over_rounds(rounds, "activation_over_torch", ratio,
                              lambda first: {"activation_rows": first[ACTIVATION_CPU]["rows"]})


def grid_baseline_s(field: str, measured: dict, moe_record: dict) -> Optional[float]:
    """The time a grid ratio divides the MoE's time by, in one round (None: not measured)."""
    if field == "moe_over_torch_eager":
        other = measured.get(TORCH_EAGER)
        return None if other is None else other["median_s"]
    if field == "moe_over_dense_active":
        other = measured.get(DENSE_CPU)
        return None if other is None else other["median_s"]
    read = measured.get(WEIGHT_READ)
    return None if read is None else moe_record["touched_weight_bytes"] / read["bytes_per_s"]


def grid_goals(rows: list[dict]) -> list[Goal]:
    """The grid's targets (issue 24): the PyTorch loop at the median and at
    the worst of the T >= PEER_TOKENS points, our dense at equal active FLOPs
    for T >= LARGE_TOKENS, decode against the weight-read floor. The median's
    interval: the median over the points within each round, its geometric
    mean and 95% interval over the rounds."""
    def where(row):
        return f"{row['activation']} T={row['tokens']} k={row['top_k']} D={row['d_model']} F={row['d_ff']} " \
               f"E={row['n_experts']}"

    def worst(name, field, covers, threshold, why_not):
        covered = [row for row in rows if covers(row) and row[field] is not None]
        if not covered:
            return Goal(name, threshold, None, why_not, None)
        row = max(covered, key=lambda row: row[field])
        return Goal(name, threshold, row[field], where(row), row[field] <= threshold, row[f"{field}_interval"])

    def median(name, field, covers, threshold, why_not):
        covered = [row for row in rows if covers(row) and row[field] is not None]
        if not covered:
            return Goal(name, threshold, None, why_not, None)
        per_round = [float(numpy.median(values)) for values in zip(*(row[f"{field}_rounds"] for row in covered))]
        value, interval = geometric_mean_interval(per_round)
        return Goal(name, threshold, value, f"median of {len(covered)} points", value <= threshold, interval)

    def large(row):
        return row["tokens"] >= PEER_TOKENS

    return [
        median(f"MoE / PyTorch eager loop <= {GRID_GOAL_MEDIAN_TO_EAGER} at the median, T >= {PEER_TOKENS}",
               "moe_over_torch_eager", large, GRID_GOAL_MEDIAN_TO_EAGER,
               f"no PyTorch loop timed at T >= {PEER_TOKENS}"),
        worst(f"MoE / PyTorch eager loop <= {GRID_GOAL_WORST_TO_EAGER} at the worst, T >= {PEER_TOKENS}",
              "moe_over_torch_eager", large, GRID_GOAL_WORST_TO_EAGER, f"no PyTorch loop timed at T >= {PEER_TOKENS}"),
        worst(f"MoE / our dense at equal active FLOPs <= {GOAL_MAX_RATIO_TO_DENSE_ACTIVE} for T >= {LARGE_TOKENS}",
              "moe_over_dense_active", lambda row: row["tokens"] >= LARGE_TOKENS, GOAL_MAX_RATIO_TO_DENSE_ACTIVE,
              f"no T >= {LARGE_TOKENS} point in this run"),
        worst(f"decode: MoE / reading the touched weights at the one-row GEMV rate <= {GRID_GOAL_DECODE_OVER_FLOOR}"
              f" for T <= {DECODE_TOKENS}", "moe_over_weight_floor", lambda row: row["tokens"] <= DECODE_TOKENS,
              GRID_GOAL_DECODE_OVER_FLOOR, f"no T <= {DECODE_TOKENS} point in this run"),
    ]


def fixed_cost_rows(found: list[dict]) -> list[dict]:
    """Per k, each step of a T = 1 call: its median over the rounds, in microseconds, and its share of the whole call."""
    by_k: dict = {}
    for record in found:
        if record.get("measurement") == "fixed-cost":
            by_k.setdefault(record["params"]["top_k"], []).append(record)
    rows = []
    for K in sorted(by_k):
        params = by_k[K][0]["params"]
        shape = f"D={params['d_model']} F={params['d_ff']} E={params['n_experts']} {params['activation']}"
        whole = float(numpy.median([r["whole_s"] for r in by_k[K]]))
        for step in FIXED_COST_STEPS:
            seconds = float(numpy.median([r["steps_s"][step] for r in by_k[K]]))
            rows.append({"top_k": K, "shape": shape, "step": step, "us": seconds * 1e6, "share": seconds / whole})
        rows.append({"top_k": K, "shape": shape, "step": "whole call", "us": whole * 1e6, "share": 1.0})
    return rows


#: The printed grid table's columns: (header, row field, kind).
GRID_COLUMNS = (
    ("#", "grid_point", "text"), ("act", "activation", "text"), ("T", "tokens", "text"), ("k", "top_k", "text"),
    ("D", "d_model", "text"), ("F", "d_ff", "text"), ("E", "n_experts", "text"), ("moe ms", "moe_s", "ms"),
    ("/torch loop", "moe_over_torch_eager", "ratio"), ("/dense K*F", "moe_over_dense_active", "ratio"),
    ("/weight floor", "moe_over_weight_floor", "ratio"),
)


def format_grid(rows: list[dict], fixed: list[dict]) -> str:
    """The grid table and the fixed-cost breakdown as ``main --grid`` prints them."""
    text = _aligned(rows, GRID_COLUMNS)
    several = [row for row in rows if row.get("decode_product_rows", 1) > 1]
    if several:
        text.append("\nThe decode floor's read (one thread, weights from memory): the one-row rate over the rate "
                    "for an expert's rows:")
    for row in several:
        text.append(f"  #{row['grid_point']:<2} {row['decode_product_rows']:>3} rows: "
                    f"{ratio_text(row, 'decode_rows_slowdown')}  (MoE / floor: {ratio_text(row, 'moe_over_weight_floor')})")
    large = [row for row in rows if row.get("gemm_rows_slowdown") is not None]
    if large:
        text.append("\nThe GEMMs alone (one thread, weights from memory): FLOP rate at a dense block's rows over "
                    "the rate at an expert's mean rows:")
    for row in large:
        text.append(f"  #{row['grid_point']:<2} {row['expert_rows']:>5} rows per expert, dense blocks of "
                    f"{row['dense_rows']}: {ratio_text(row, 'gemm_rows_slowdown')}  "
                    f"(MoE / dense: {ratio_text(row, 'moe_over_dense_active')})")
    compared = [row for row in rows if row.get("activation_over_torch") is not None]
    if compared:
        text.append("\nThe activation alone (one thread each, an expert's rows): our time over PyTorch's:")
    for row in compared:
        text.append(f"  #{row['grid_point']:<2} {row['activation']:<6} {row['activation_rows']:>5} rows of "
                    f"{row['d_ff']}: {ratio_text(row, 'activation_over_torch')}  "
                    f"(MoE / PyTorch loop: {ratio_text(row, 'moe_over_torch_eager')})")
    text.append("\nFixed cost of a T = 1 call by step (hot caches), median over the rounds:")
    for row in fixed:
        text.append(f"  {row['shape']} k={row['top_k']}  {row['step']:<17} {row['us']:8.1f} us  "
                    f"{100 * row['share']:5.1f}%")
    return "\n".join(text)


def main_grid(base: BenchConfig, arguments: argparse.Namespace) -> int:
    """``--grid``: the shape grid, its targets and the fixed-cost breakdown."""
    points = grid_points(arguments.grid_points)
    provenance = records.provenance("cpu")
    print(f"Device: {provenance['device']} ({provenance['cpu_count']} CPUs), BLAS: {provenance['blas']}, "
          f"PyTorch: {provenance['torch']}; threads: {base.threads or 'as the environment leaves them'}")
    print(f"Grid: {len(points)} points (Latin hypercube, seed {GRID_SEED}), {base.rounds} round(s); the full "
          f"run's expected duration on 2 idle cores is about {GRID_EXPECTED_MINUTES} minutes")
    started = time.perf_counter()
    with thread_environment(base.threads):
        result = run_grid(base, points)
        path = None if arguments.no_write else records.write_records(
            GRID_KIND, grid_to_records(result), device_kind="cpu", results_dir=arguments.results_dir)
    if result.torch_note:
        print(result.torch_note)
    rows = grid_rows(result.measurements)
    print(f"Wall time {time.perf_counter() - started:.0f} s. Each ratio: MoE time over the other's in the same "
          f"round, geometric mean over the rounds" + (" ± the larger side of its 95% interval" if base.rounds > 1
                                                      else ""))
    print(format_grid(rows, fixed_cost_rows(result.fixed_cost)))
    print()
    for goal in grid_goals(rows):
        print(goal.line())
    if path is not None:
        print(f"\nRecords appended to {path}")
    return 0


# ---------------------------------------------------------------- command line


def parse_config(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    full = PRESETS["full"]  # the defaults the help names
    parser = argparse.ArgumentParser(
        prog="python -m analysis.measure.bench_cpu",
        description="Time our MoE (kernels cpu backend) against our dense MLPs and PyTorch's MoE and dense "
                    "layers on this CPU; print ratios and write bench-cpu records.")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats (seconds); explicit options still win")
    parser.add_argument("--d-model", type=int, help=f"D (full: {full.d_model})")
    parser.add_argument("--d-ff", type=int, help=f"F, each expert's hidden width (full: {full.d_ff})")
    parser.add_argument("--n-experts", type=int, help=f"E (full: {full.n_experts})")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts T (full: {' '.join(map(str, full.tokens))})")
    parser.add_argument("--k", type=int, nargs="+", dest="top_ks", help=f"experts per token (full: {' '.join(map(str, full.top_ks))})")
    parser.add_argument("--activations", nargs="+", choices=("relu", "gelu", "swiglu"),
                        help=f"activations (full: {' '.join(full.activations)})")
    parser.add_argument("--dtype", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int,
                        help="BLAS and OpenMP threads of both workers (default: as the environment leaves them, "
                             "every core BLAS would use)")
    parser.add_argument("--seconds-per-measurement", type=float,
                        help=f"time one measurement may take; sets the repeats (full: {full.seconds_per_measurement})")
    parser.add_argument("--min-repeats", type=int, help=f"timed calls per measurement, at least (full: {full.min_repeats})")
    parser.add_argument("--max-repeats", type=int, help=f"timed calls per measurement, at most (full: {full.max_repeats})")
    parser.add_argument("--pause", type=float, dest="pause_s",
                        help=f"seconds of quiet when switching between the NumPy and PyTorch workers (full: {full.pause_s})")
    parser.add_argument("--rounds", type=int,
                        help="times every implementation is measured at each (activation, T); the ratios pair "
                             f"a round's times and their spread gives a 95%% interval (full: {full.rounds})")
    parser.add_argument("--no-torch", action="store_true", help="time only the NumPy implementations")
    parser.add_argument("--grid", action="store_true",
                        help=f"the shape grid instead of one shape: {GRID_POINTS} points (D, F/D, E, T, activation, "
                             f"k) by a fixed-seed Latin hypercube, {GRID_PRESET.rounds} rounds, the fixed cost at "
                             f"T = 1 by step; writes {GRID_KIND} records (--tokens, --k, --activations, --d-model, "
                             "--d-ff and --n-experts do not apply; --quick: quick timing)")
    parser.add_argument("--grid-points", type=int, default=GRID_POINTS,
                        help=f"grid points to sample (default {GRID_POINTS}; fewer for a trial)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-write", action="store_true", help="print only; write no records")
    parser.add_argument("--results-dir", help="results folder (default: $MOE_RESULTS_DIR or <repo>/results)")
    arguments = parser.parse_args(argv)

    if arguments.grid:
        given = [name for name in ("tokens", "top_ks", "activations", "d_model", "d_ff", "n_experts")
                 if getattr(arguments, name) is not None]
        if given:
            parser.error(f"--grid: the grid sets the shapes; drop {', '.join(given)}")
        if arguments.grid_points < 1:
            parser.error(f"--grid-points: expected at least 1, got {arguments.grid_points}")
    preset = PRESETS["quick" if arguments.quick else "full"]
    if arguments.grid and not arguments.quick:
        preset = GRID_PRESET
    overrides = {field: getattr(arguments, field)
                 for field in ("d_model", "d_ff", "n_experts", "dtype", "threads", "seconds_per_measurement",
                               "min_repeats", "max_repeats", "pause_s", "seed", "rounds")
                 if getattr(arguments, field) is not None}
    for field, value in (("tokens", arguments.tokens), ("top_ks", arguments.top_ks),
                         ("activations", arguments.activations)):
        if value is not None:
            overrides[field] = tuple(value)
    if arguments.no_torch:
        overrides["torch_peers"] = False
    if "max_repeats" in overrides and "min_repeats" not in overrides:
        overrides["min_repeats"] = min(preset.min_repeats, overrides["max_repeats"])
    config = dataclasses.replace(preset, **overrides)
    try:
        check_config(dataclasses.replace(config, tokens=(1,), top_ks=(1,), activations=("relu",))
                     if arguments.grid else config)
    except ValueError as error:
        parser.error(str(error))
    return config, arguments


def main(argv: list[str] | None = None) -> int:
    config, arguments = parse_config(argv)
    if arguments.grid:
        return main_grid(config, arguments)
    provenance = records.provenance("cpu")
    print(f"Device: {provenance['device']} ({provenance['cpu_count']} CPUs), BLAS: {provenance['blas']}, "
          f"PyTorch: {provenance['torch']}, last-level cache {timing.last_level_cache_bytes() // 2**20} MiB, "
          f"threads: {config.threads or 'as the environment leaves them'}")
    print(f"MoE: D={config.d_model} F={config.d_ff} E={config.n_experts} {config.dtype}, "
          f"{' '.join(config.activations)}; NumPy and PyTorch each in its own worker process")

    started = time.perf_counter()
    # The workers read the thread variables at start-up; set, they stay set
    # until the records are written, whose provenance shows them.
    with thread_environment(config.threads):
        result = run_bench(config)
        path = None if arguments.no_write else records.write_records(
            RECORD_KIND, to_records(result), device_kind="cpu", results_dir=arguments.results_dir)
    ceilings = result.ceilings

    print(f"\nCeilings, the higher of start and end of the run. "
          f"SGEMM ({config.sgemm_n}x{config.sgemm_n} {config.dtype}, {ceilings['threads']} threads): "
          f"{ceilings['sgemm_flop_per_s'] / 1e9:.1f} GFLOP/s (NumPy matmul on BLAS threads "
          f"{ceilings['sgemm_blas_threads_flop_per_s'] / 1e9:.1f}, one product per worker "
          f"{ceilings['sgemm_one_per_worker_flop_per_s'] / 1e9:.1f}); copy: "
          f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read plus written). Weights read by an "
          f"(n, {config.d_model}) @ ({config.d_model}, {config.d_ff}) product on one thread: "
          + ", ".join(f"n = {n} {rate / 1e9:.1f} GB/s" for n, rate in sorted(ceilings["few_row_read_bytes_per_s"].items())))
    if result.torch_note:
        print(result.torch_note)
    threads = sorted({m["threads"] for m in result.measurements if m["backend"] == "cpu"})
    torch_threads = sorted({m["threads"] for m in result.measurements if m["backend"] != "cpu"})
    print(f"Threads: our kernels {threads}, PyTorch {torch_threads or '-'}. Times: medians over {config.rounds} "
          f"round(s). Each ratio: MoE time over the other's in the same round (below 1: the MoE is faster), its "
          f"geometric mean over the rounds" + (" ± the larger side of its 95% interval" if config.rounds > 1 else "")
          + f". Wall time {time.perf_counter() - started:.0f} s.")
    print(format_table(result.rows))
    print()
    for line in goal_report(result.rows):
        print(line)

    if path is not None:
        print(f"\nRecords appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
