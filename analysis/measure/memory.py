"""What k costs in memory: the bytes of every intermediate of the MoE layer, as a
formula, and the peak measured on a backend.

    python -m analysis.measure.memory [--preset cpu] [--tokens 1 64 512 4096] [--results-dir DIR]

The layer's intermediates, with s the bytes of one element of the input dtype,
N the kept assignments (T k without a capacity) and every index int64 except
``experts`` (int32), as the contract fixes them:

    stage       array        shape    bytes
    route       probs        (T, E)   T E s
                experts      (T, K)   4 T K
                weights      (T, K)   T K s
    dispatch    counts       (E,)     8 E
                offsets      (E+1,)   8 (E + 1)
                token        (N,)     8 N
                row          (T, K)   8 T K
    permute     rows         (N, D)   N D s
    expert MLPs hidden       (N, F)   N F s   (and a gate of N F s for swiglu)
                expert_out   (N, D)   N D s
    combine     y            (T, D)   T D s

The dense MLP of hidden width F' (K F at equal active FLOPs, E F at equal
parameters) has ``hidden`` (T, F') (and its gate) and ``y`` (T, D).

A layer run stage by stage (``topk_moe.moe_forward`` on the CUDA backend) holds
routing, plan, rows and expert_out until it returns, so its peak of named
arrays is all of them plus the larger of the transient hidden activations
(live during the expert MLPs) and y (``peak_bytes``); the CUDA backend makes
the whole hidden (N, F) and activates and combines inside its kernels. The
CPU backend fuses permute and combine into its expert tasks (each gathers its
own rows of x, so the permuted batch never exists whole, and adds its
weighted output rows straight into y) and runs each expert on blocks of rows
in per-thread scratch buffers, so less hidden exists at once, but each worker
thread keeps its buffers, sized to the largest block it ran, after the call
(``cpu_scratch_bytes`` gives one worker's after a block of a given size);
``cpu_temporaries`` bounds what its stage-by-stage activation and combine add. Whatever the implementation,
the arrays the layer returns (routing, plan and y: ``held_bytes``) are a
floor under its peak.

``measure_peak`` reads the peak of the layer's first call in a fresh Python
process (one per measurement), so that every buffer the call needs is
counted, the backend's own included: the CPU backend keeps each worker
thread's scratch buffers (a block's rows, hidden activations, gate, output and
activation work) for the life of the thread, so a call after the first finds
them made and its peak shows little more than the output. Before the measured
call the process runs the layer once on an empty batch, which loads what is
loaded once (BLAS's thread controls, lazy imports) but makes no scratch. On the
``cpu`` backend the peak is read with ``tracemalloc`` (NumPy reports its array
buffers to it, from every thread; BLAS's private work space and the threads'
stacks are not seen); on ``cuda`` from CuPy's memory pool (all cached blocks
freed first, so the pool's size after the call is its high-water mark, rounded
up to CuPy's allocation granularity; there the call is measured after a full
warm-up call, which compiles the kernels). The same process then measures
later calls too (``repeat_peak_bytes``): what a call adds once the scratch
exists. The ``run`` below writes ``memory`` records with the formula beside
each measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import sys
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Sequence

import numpy

INDEX_BYTES = 8  # plan arrays are int64
EXPERT_INDEX_BYTES = 4  # routing.experts is int32
DTYPES = ("float16", "float32", "float64")
RECORD_KIND = "memory"


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One MoE layer at one batch: T tokens of width D, E experts of hidden width F, top-k."""

    T: int
    D: int
    F: int
    E: int
    k: int
    dtype: str = "float32"
    activation: str = "swiglu"
    #: N, the kept assignments; None: T k (dropless).
    n_kept: Optional[int] = None

    def __post_init__(self):
        validate(self)

    @property
    def N(self) -> int:
        return self.T * self.k if self.n_kept is None else self.n_kept

    @property
    def element_bytes(self) -> int:
        return numpy.dtype(self.dtype).itemsize


def validate(shape: LayerShape) -> None:
    """One clear sentence per bad field (ValueError)."""
    for name in ("T", "D", "F", "E"):
        value = getattr(shape, name)
        if not isinstance(value, (int, numpy.integer)) or isinstance(value, bool) or value < (0 if name == "T" else 1):
            smallest = 0 if name == "T" else 1
            raise ValueError(f"{name}: expected an integer >= {smallest}, got {value!r}")
    if shape.k not in (1, 2):
        raise ValueError(f"k: expected 1 or 2, got {shape.k!r}")
    if shape.k > shape.E:
        raise ValueError(f"k: expected at most E = {shape.E}, got {shape.k}")
    if shape.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {shape.dtype!r}")
    if shape.activation not in ("relu", "gelu", "swiglu"):
        raise ValueError(f"activation: expected 'relu', 'gelu' or 'swiglu', got {shape.activation!r}")
    if shape.n_kept is not None and not 0 <= shape.n_kept <= shape.T * shape.k:
        raise ValueError(f"n_kept: expected None or 0..T k = {shape.T * shape.k}, got {shape.n_kept!r}")


def _row(stage: str, array: str, dims: str, elements: int, element_bytes: int, lives: str) -> dict:
    return {"stage": stage, "array": array, "shape": dims, "elements": int(elements),
            "bytes": int(elements) * element_bytes, "lives": lives}


def intermediates(shape: LayerShape) -> list:
    """Every intermediate of the MoE layer with its bytes (the table in the module docstring).

    ``lives``: "returned" for the arrays ``moe_forward`` returns (routing, plan, y),
    "layer" for those a stage-by-stage forward holds until it returns (rows,
    expert_out), "expert stage" for the hidden activations that exist only while
    the experts run.
    """
    T, D, F, E, K, N, s = shape.T, shape.D, shape.F, shape.E, shape.k, shape.N, shape.element_bytes
    rows = [
        _row("route", "probs", "(T, E)", T * E, s, "returned"),
        _row("route", "experts", "(T, K)", T * K, EXPERT_INDEX_BYTES, "returned"),
        _row("route", "weights", "(T, K)", T * K, s, "returned"),
        _row("dispatch", "counts", "(E,)", E, INDEX_BYTES, "returned"),
        _row("dispatch", "offsets", "(E+1,)", E + 1, INDEX_BYTES, "returned"),
        _row("dispatch", "token", "(N,)", N, INDEX_BYTES, "returned"),
        _row("dispatch", "row", "(T, K)", T * K, INDEX_BYTES, "returned"),
        _row("permute", "rows", "(N, D)", N * D, s, "layer"),
        _row("expert MLPs", "hidden", "(N, F)", N * F, s, "expert stage"),
    ]
    if shape.activation == "swiglu":
        rows.append(_row("expert MLPs", "gate", "(N, F)", N * F, s, "expert stage"))
    rows += [
        _row("expert MLPs", "expert_out", "(N, D)", N * D, s, "layer"),
        _row("combine", "y", "(T, D)", T * D, s, "returned"),
    ]
    return rows


def dense_intermediates(T: int, D: int, F_dense: int, dtype: str = "float32", activation: str = "swiglu") -> list:
    """The dense MLP's intermediates: hidden (T, F_dense), its gate for swiglu, and y (T, D)."""
    s = numpy.dtype(dtype).itemsize
    rows = [_row("dense MLP", "hidden", "(T, F')", T * F_dense, s, "expert stage")]
    if activation == "swiglu":
        rows.append(_row("dense MLP", "gate", "(T, F')", T * F_dense, s, "expert stage"))
    rows.append(_row("dense MLP", "y", "(T, D)", T * D, s, "returned"))
    return rows


@dataclasses.dataclass(frozen=True)
class Temporaries:
    """What an implementation may add to the layer's own arrays at its peak.

    ``activation``: extra hidden-sized blocks the activation makes (the CPU
    backend's ``expit`` or ``erf`` result); ``combine_gathers``: combine gathers
    each choice's expert outputs into a (T, D) temporary before adding it to y,
    and may make the next before the last is freed.
    """

    activation: int = 0
    combine_gathers: bool = False


#: The layer's own arrays only: what the CUDA backend allocates (it activates and combines in its kernels).
NONE = Temporaries()


def cpu_temporaries(activation: str) -> Temporaries:
    """The CPU backend (kernels/topk_moe/cpu.py), bounded from above: one hidden-sized
    temporary for gelu and swiglu, K outputs' worth for combine (the ``combine``
    stage's gathers; the fused ``moe_forward`` adds into y and needs none)."""
    return Temporaries(0 if activation == "relu" else 1, True)


def cpu_block_rows(total_rows: int) -> int:
    """The CPU backend's rows per MLP block for a stage of ``total_rows`` rows (all experts, or the
    dense MLP's T); a block has fewer than 1.5 times this many rows (kernels/topk_moe/cpu.py)."""
    from topk_moe import cpu  # noqa: PLC0415

    return min(cpu.ROW_BLOCK, max(cpu.MIN_BLOCK_ROWS, math.ceil(total_rows / cpu.MIN_TASKS)))


def cpu_scratch_bytes(rows: int, D: int, F: int, dtype: str = "float32", activation: str = "swiglu",
                      fused: bool = True) -> int:
    """One CPU worker thread's scratch buffers after it ran a block of ``rows`` rows of an MLP of
    hidden width ``F``: the hidden activations (rows, F), swiglu's gate (rows, F), the activation's
    work (up to ACTIVATION_ROWS rows of F: swiglu's denominator, float32 gelu's three arrays,
    float64 gelu's one) and, in the fused ``moe_forward`` (``fused``), the block's gathered rows
    and its output (rows, D) each; the dense MLP writes its output in place. The thread keeps
    them after the call; a later, larger block grows them."""
    from topk_moe import cpu  # noqa: PLC0415

    s = numpy.dtype(dtype).itemsize
    sliced = min(rows, cpu.ACTIVATION_ROWS)
    work = {"relu": 0, "swiglu": 1, "gelu": 3 if dtype == "float32" else 1}[activation]
    total = rows * F + (rows * F if activation == "swiglu" else 0) + work * sliced * F
    if fused:
        total += 2 * rows * D
    return total * s


def held_bytes(shape: LayerShape) -> int:
    """The arrays ``moe_forward`` returns (routing, plan, y): a floor under any
    implementation's peak."""
    return sum(r["bytes"] for r in intermediates(shape) if r["lives"] == "returned")


def peak_bytes(shape: LayerShape, temporaries: Temporaries = NONE) -> int:
    """The MoE layer's peak with the whole hidden made at once: the arrays
    ``moe_forward`` holds (routing, plan, rows, expert_out) plus the larger of the
    expert stage's hidden activations and combine's y (made after the hidden is
    freed), plus ``temporaries``. An implementation that runs the experts in
    blocks of rows (the CPU backend) needs less than this."""
    rows = intermediates(shape)
    held = sum(r["bytes"] for r in rows if r["lives"] in ("returned", "layer") and r["array"] != "y")
    hidden = [r["bytes"] for r in rows if r["lives"] == "expert stage"]
    hidden_total = sum(hidden) + temporaries.activation * hidden[0]
    output = shape.T * shape.D * shape.element_bytes
    if temporaries.combine_gathers:
        output += shape.k * output
    return held + max(hidden_total, output)


def dense_peak_bytes(T: int, D: int, F_dense: int, dtype: str = "float32", activation: str = "swiglu",
                     temporaries: Temporaries = NONE) -> int:
    """The dense MLP's peak with the whole hidden made at once: y (allocated before or
    while the hidden exists) plus the hidden activations, plus ``temporaries``."""
    rows = dense_intermediates(T, D, F_dense, dtype, activation)
    hidden = [r["bytes"] for r in rows if r["lives"] == "expert stage"]
    return T * D * numpy.dtype(dtype).itemsize + sum(hidden) + temporaries.activation * hidden[0]


# ---------------------------------------------------------------- measured


def _layer_inputs(shape: LayerShape, seed: int = 0):
    import topk_moe  # noqa: PLC0415

    cfg = topk_moe.MoEConfig(shape.D, shape.F, shape.E, shape.k, activation=shape.activation)
    weights = topk_moe.init_weights(cfg, seed=seed, dtype=numpy.dtype(shape.dtype))
    x = numpy.random.default_rng(seed + 1).standard_normal((shape.T, shape.D)).astype(shape.dtype)
    return cfg, weights, x


#: Later calls measured in the same process after the first; the least of their peaks is kept
#: (which worker takes which block may change from call to call, so a worker's scratch may still grow).
REPEAT_CALLS = 2

#: What ``peak_bytes`` counts, written into every record.
PEAK_INCLUDES = {
    "cpu": ("the first call in a fresh process (after one call on an empty batch), above what the process "
            "held before it: the arrays the layer returns, its temporaries and every worker thread's scratch "
            "buffers (rows, hidden activations, gate, output, activation work), which the CPU backend keeps "
            "after the call; not the weights or the input, BLAS's private work space or thread stacks"),
    "cuda": ("one call after a warm-up call, in a fresh process: the growth of CuPy's memory pool (cached "
             "blocks freed first), rounded up to its allocation granularity; not the weights or the input"),
}


@dataclasses.dataclass(frozen=True)
class Measured:
    """One measurement, made in a fresh process.

    ``peak_bytes``: the first call's peak (on cuda: the call after a warm-up call), above what the
    process held before it; on the cpu backend it includes the scratch buffers the call made
    (``PEAK_INCLUDES``). ``repeat_peak_bytes``: the least peak of REPEAT_CALLS later calls, which
    find the scratch made. ``largest_expert_rows``: the rows of the largest expert (T for dense).
    ``workers``: the threads the CPU backend ran the call on (each keeps its own scratch; 1 on cuda)."""

    peak_bytes: int
    repeat_peak_bytes: int
    largest_expert_rows: int
    workers: int


def measure_peak(shape: LayerShape, arm: str = "moe", backend: str = "cpu", *, dense_width: Optional[int] = None,
                 seed: int = 0) -> Measured:
    """Bytes allocated at the peak of one call of the layer, above what was allocated before it,
    measured in a fresh Python process so that buffers a backend keeps between calls are counted
    (see the module docstring).

    ``arm``: "moe" runs ``topk_moe.moe_forward`` at ``shape``; "dense" runs
    ``topk_moe.dense_mlp`` of hidden width ``dense_width`` on the same tokens.
    ``backend``: "cpu" (tracemalloc) or "cuda" (CuPy's memory pool). The process
    inherits this one's environment, so its BLAS thread count (the CPU backend's
    workers) is the one OPENBLAS_NUM_THREADS or the core count gives.
    """
    if arm not in ("moe", "dense"):
        raise ValueError(f"arm: expected 'moe' or 'dense', got {arm!r}")
    if arm == "dense" and (not isinstance(dense_width, int) or dense_width < 1):
        raise ValueError(f"dense_width: expected a positive integer for the dense arm, got {dense_width!r}")
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend: expected 'cpu' or 'cuda', got {backend!r}")
    # spawn, not fork: a forked child would inherit this process's threads' scratch (and its tracemalloc state).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(_measure_in_this_process, shape, arm, backend, dense_width, seed).result()


def _layer(shape: LayerShape, arm: str, backend: str, dense_width: Optional[int], seed: int, xp):
    """(layer, x): ``layer(tokens)`` runs the arm on ``tokens`` (rows of x) with weights on ``xp``'s device."""
    import topk_moe  # noqa: PLC0415

    cfg, weights, x = _layer_inputs(shape, seed)
    tokens = xp.asarray(x)
    if arm == "dense":
        rng = numpy.random.default_rng(seed + 2)
        scale = shape.D ** -0.5
        w1, w3 = (rng.standard_normal((shape.D, dense_width)) * scale for _ in range(2))
        w2 = rng.standard_normal((dense_width, shape.D)) * scale
        dense_weights = [xp.asarray(w1.astype(shape.dtype)), xp.asarray(w2.astype(shape.dtype)),
                         xp.asarray(w3.astype(shape.dtype)) if shape.activation == "swiglu" else None]
        return (lambda rows: topk_moe.dense_mlp(rows, *dense_weights, activation=shape.activation,
                                                backend=backend)), tokens
    arrays = topk_moe.MoEWeights(*(None if w is None else xp.asarray(w)
                                  for w in (weights.router, weights.w1, weights.w2, weights.w3)))
    return (lambda rows: topk_moe.moe_forward(rows, arrays, cfg, backend=backend)), tokens


def _measure_in_this_process(shape: LayerShape, arm: str, backend: str, dense_width: Optional[int],
                             seed: int) -> Measured:
    """``measure_peak``'s work, run in the fresh process it starts."""
    if backend == "cuda":  # pragma: no cover - needs a GPU
        import cupy  # noqa: PLC0415

        layer, x = _layer(shape, arm, backend, dense_width, seed, cupy)
        layer(x)  # compiles the kernels
        first, result = _cuda_pool_peak(lambda: layer(x))
        repeat = min(_cuda_pool_peak(lambda: layer(x))[0] for _ in range(REPEAT_CALLS))
        return Measured(first, repeat, _largest_rows(result, shape.T), 1)
    from topk_moe import cpu  # noqa: PLC0415

    layer, x = _layer(shape, arm, backend, dense_width, seed, numpy)
    layer(x[:0])  # one-time loads; an empty batch makes no task, so no scratch
    workers = cpu.threads()
    tracemalloc.start()
    try:
        first, result = _tracemalloc_peak(lambda: layer(x))
        largest = _largest_rows(result, shape.T)
        del result
        repeat = min(_tracemalloc_peak(lambda: layer(x))[0] for _ in range(REPEAT_CALLS))
    finally:
        tracemalloc.stop()
    return Measured(first, repeat, largest, workers)


def _largest_rows(result, T: int) -> int:
    plan = getattr(result, "plan", None)
    if plan is None:
        return T
    counts = plan.counts.get() if hasattr(plan.counts, "get") else plan.counts
    return int(numpy.max(counts)) if len(counts) else 0


def _tracemalloc_peak(call) -> tuple:
    """(peak bytes above what was traced before, the call's result); tracemalloc must be tracing."""
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    result = call()
    _, peak = tracemalloc.get_traced_memory()
    return peak - before, result


def _cuda_pool_peak(call) -> tuple:  # pragma: no cover - needs a GPU
    """(the growth of CuPy's pool over the call, its result), every cached block freed first."""
    import cupy  # noqa: PLC0415

    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    result = call()
    cupy.cuda.Device().synchronize()
    return pool.total_bytes() - before, result


# ---------------------------------------------------------------- the run that writes records


def arms(shape: LayerShape) -> list:
    """The three arms of the memory table: the MoE at ``shape`` and its two dense baselines."""
    return [("MoE", None), ("dense, equal active FLOPs (K·F)", shape.k * shape.F),
            ("dense, equal parameters (E·F)", shape.E * shape.F)]


def run(preset: str = "cpu", tokens: Sequence[int] = (1, 64, 512, 4096), top_ks: Sequence[int] = (1, 2),
        dtype: str = "float32", backend: str = "cpu", results_dir=None, echo=print) -> list:
    """Measure every (T, k, arm) once, each in a fresh process, and write one ``memory`` record
    each: the measured peak (``peak_includes`` says what it counts), a later call's peak, the
    formula's peak with the whole hidden (``model_peak_bytes``) and the returned arrays' floor."""
    from analysis import records as record_io  # noqa: PLC0415
    from analysis.measure.sweep_plan import PRESETS  # noqa: PLC0415

    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    layer = PRESETS[preset]
    found = []
    for T in tokens:
        for k in top_ks:
            shape = LayerShape(T, layer.d_model, layer.d_ff, layer.n_experts, k, dtype, layer.activation)
            for arm, width in arms(shape):
                measured = measure_peak(shape, "moe" if width is None else "dense", backend, dense_width=width)
                if width is None:
                    model, floor = peak_bytes(shape), held_bytes(shape)
                else:
                    model = dense_peak_bytes(T, shape.D, width, dtype, shape.activation)
                    floor = T * shape.D * shape.element_bytes
                found.append({
                    "measurement": "peak-bytes", "implementation": "moe" if width is None else "dense",
                    "arm": arm, "peak_bytes": measured.peak_bytes, "peak_includes": PEAK_INCLUDES[backend],
                    "repeat_peak_bytes": measured.repeat_peak_bytes, "model_peak_bytes": model,
                    "held_bytes": floor, "largest_expert_rows": measured.largest_expert_rows,
                    "workers": measured.workers,
                    "tool": "tracemalloc" if backend == "cpu" else "cupy memory pool",
                    "params": {"preset": preset, "tokens": T, "top_k": k, "d_model": shape.D, "d_ff": shape.F,
                               "n_experts": shape.E, "activation": shape.activation, "dtype": dtype,
                               "backend": backend, "dense_width": width},
                })
                echo(f"T={T:6d} k={k} {arm:34s} measured {measured.peak_bytes / 2**20:9.3f} MiB "
                     f"(a later call {measured.repeat_peak_bytes / 2**20:9.3f}), model {model / 2**20:9.3f} MiB")
    path = record_io.write_records(RECORD_KIND, found, device_kind="gpu" if backend == "cuda" else "cpu",
                                   results_dir=results_dir)
    echo(f"wrote {len(found)} records to {path}")
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="layer shape (analysis.measure.sweep_plan.PRESETS)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096])
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--backend", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--results-dir", default=None, help="where records go (default: results/)")
    args = parser.parse_args(argv)
    run(args.preset, args.tokens, dtype=args.dtype, backend=args.backend, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
