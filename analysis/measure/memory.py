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
in per-thread scratch buffers, so less hidden exists at once;
``cpu_temporaries`` bounds what its activation and combine add. Whatever the implementation,
the arrays the layer returns (routing, plan and y: ``held_bytes``) are a
floor under its peak.

``measure_peak`` runs the layer once and reads its peak: on the ``cpu`` backend
with ``tracemalloc`` (NumPy reports its array buffers to it; BLAS's private
work space is not seen), on ``cuda`` from CuPy's memory pool (all cached blocks
freed first, so the pool's size after the call is its high-water mark, rounded
up to CuPy's allocation granularity). The ``run`` below writes ``memory``
records with the formula beside each measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tracemalloc
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


@dataclasses.dataclass(frozen=True)
class Measured:
    """One measured call: its peak bytes and the rows of its largest expert (T for dense)."""

    peak_bytes: int
    largest_expert_rows: int


def measure_peak(shape: LayerShape, arm: str = "moe", backend: str = "cpu", *, dense_width: Optional[int] = None,
                 seed: int = 0) -> Measured:
    """Bytes allocated at the peak of one call of the layer, above what was allocated before it.

    ``arm``: "moe" runs ``topk_moe.moe_forward`` at ``shape``; "dense" runs
    ``topk_moe.dense_mlp`` of hidden width ``dense_width`` on the same tokens.
    ``backend``: "cpu" (tracemalloc) or "cuda" (CuPy's memory pool, see the module
    docstring). The layer runs once untraced first, so that one-time costs (imports,
    caches, compiled kernels) are not counted.
    """
    import topk_moe  # noqa: PLC0415

    if arm not in ("moe", "dense"):
        raise ValueError(f"arm: expected 'moe' or 'dense', got {arm!r}")
    if arm == "dense" and (not isinstance(dense_width, int) or dense_width < 1):
        raise ValueError(f"dense_width: expected a positive integer for the dense arm, got {dense_width!r}")
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend: expected 'cpu' or 'cuda', got {backend!r}")
    cfg, weights, x = _layer_inputs(shape, seed)
    if arm == "dense":
        rng = numpy.random.default_rng(seed + 2)
        scale = shape.D ** -0.5
        w1, w3 = (rng.standard_normal((shape.D, dense_width)) * scale for _ in range(2))
        w2 = rng.standard_normal((dense_width, shape.D)) * scale
        dense_weights = (w1.astype(shape.dtype), w2.astype(shape.dtype),
                         w3.astype(shape.dtype) if shape.activation == "swiglu" else None)

        def call(xp):
            arrays = [None if w is None else xp.asarray(w) for w in dense_weights]
            tokens = xp.asarray(x)
            return lambda: topk_moe.dense_mlp(tokens, *arrays, activation=shape.activation, backend=backend)
    else:
        def call(xp):
            arrays = topk_moe.MoEWeights(*(None if w is None else xp.asarray(w)
                                          for w in (weights.router, weights.w1, weights.w2, weights.w3)))
            tokens = xp.asarray(x)
            return lambda: topk_moe.moe_forward(tokens, arrays, cfg, backend=backend)
    if backend == "cuda":  # pragma: no cover - needs a GPU
        import cupy  # noqa: PLC0415

        layer = call(cupy)
        result = layer()
        return Measured(_cuda_pool_peak(layer), _largest_rows(result, shape.T))
    layer = call(numpy)
    result = layer()
    return Measured(_tracemalloc_peak(layer), _largest_rows(result, shape.T))


def _largest_rows(result, T: int) -> int:
    plan = getattr(result, "plan", None)
    if plan is None:
        return T
    counts = plan.counts.get() if hasattr(plan.counts, "get") else plan.counts
    return int(numpy.max(counts)) if len(counts) else 0


def _tracemalloc_peak(layer) -> int:
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = layer()
        _, peak = tracemalloc.get_traced_memory()
        del result
        return peak - before
    finally:
        if started_here:
            tracemalloc.stop()


def _cuda_pool_peak(layer) -> int:  # pragma: no cover - needs a GPU
    import cupy  # noqa: PLC0415

    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    result = layer()
    cupy.cuda.Device().synchronize()
    peak = pool.total_bytes() - before
    del result
    return peak


# ---------------------------------------------------------------- the run that writes records


def arms(shape: LayerShape) -> list:
    """The three arms of the memory table: the MoE at ``shape`` and its two dense baselines."""
    return [("MoE", None), ("dense, equal active FLOPs (K·F)", shape.k * shape.F),
            ("dense, equal parameters (E·F)", shape.E * shape.F)]


def run(preset: str = "cpu", tokens: Sequence[int] = (1, 64, 512, 4096), top_ks: Sequence[int] = (1, 2),
        dtype: str = "float32", backend: str = "cpu", results_dir=None, echo=print) -> list:
    """Measure every (T, k, arm) once and write one ``memory`` record each, with the
    formula's peak for this backend and for the whole hidden beside the measured one."""
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
                    "arm": arm, "peak_bytes": measured.peak_bytes, "model_peak_bytes": model,
                    "held_bytes": floor, "largest_expert_rows": measured.largest_expert_rows,
                    "tool": "tracemalloc" if backend == "cpu" else "cupy memory pool",
                    "params": {"preset": preset, "tokens": T, "top_k": k, "d_model": shape.D, "d_ff": shape.F,
                               "n_experts": shape.E, "activation": shape.activation, "dtype": dtype,
                               "backend": backend, "dense_width": width},
                })
                echo(f"T={T:6d} k={k} {arm:34s} measured {measured.peak_bytes / 2**20:9.3f} MiB, "
                     f"model {model / 2**20:9.3f} MiB")
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
