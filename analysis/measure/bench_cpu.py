"""MoE against a dense MLP on this CPU: ``python -m analysis.measure.bench_cpu``.

For each token count T and each k, it times

- the MoE layer, ``kernels.moe_forward(backend="cpu")``;
- a dense MLP of width K·F, the same active FLOPs as the MoE's experts;
- a dense MLP of width E·F, the same total parameters;
- the float64 ``reference`` backend, only for T <= 256 (it loops in Python);

and, in the same run, this machine's SGEMM rate, the ceiling the MoE's achieved
FLOP/s is divided by. It prints a table of ratios, writes ``bench-cpu`` records
(``analysis.records``), and says whether the two CPU-baseline goals are met:
MoE within 1.15x of dense at equal active FLOPs for T >= 4096, and at least
70% of the measured SGEMM rate at those T.

Nothing wrong is timed: each cpu MoE output must first pass the project's one
tolerance rule against the float64 reference (``sweep_cells.check_moe_output``);
a failure stops the run. ``rows_from_records`` rebuilds the table from a
run's records (the CPU chapter shows the newest run that way).

Inputs rotate (``analysis.measure.timing``): each timed call gets its own tokens and
its own copy of the weights, with enough copies that together they are twice
the last-level cache. Without that, a small dense MLP would be timed from
cache while the MoE, whose weights don't fit, would not.

Dimension letters as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token, N kept assignments.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import numpy
from tqdm import tqdm

import kernels
from analysis import records
from analysis.measure import roofline, sweep_cells, timing

RECORD_KIND = "bench-cpu"

#: The goals the CPU baseline is held to, at T >= LARGE_TOKENS.
LARGE_TOKENS = 4096
GOAL_MAX_RATIO_TO_DENSE_ACTIVE = 1.15
GOAL_MIN_FRACTION_OF_SGEMM = 0.70


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything that decides what the benchmark measures; recorded in ``params``."""

    d_model: int
    d_ff: int
    n_experts: int
    tokens: tuple[int, ...]
    top_ks: tuple[int, ...]
    activation: str
    dtype: str
    #: Timed calls at most per measurement, and at least (a slow one stops early).
    repeats: int
    min_repeats: int
    #: Time one measurement may take; sets the repeats of the slow ones.
    seconds_per_measurement: float
    #: The reference backend is timed only up to this T.
    reference_max_tokens: int
    #: SGEMM is measured on n x n matrices.
    sgemm_n: int
    seed: int = 0


PRESETS = {
    "full": BenchConfig(
        d_model=512, d_ff=1024, n_experts=8,
        tokens=(1, 4, 16, 64, 256, 1024, 4096, 16384), top_ks=(1, 2),
        activation="swiglu", dtype="float32",
        repeats=20, min_repeats=5, seconds_per_measurement=2.0,
        reference_max_tokens=256, sgemm_n=2048,
    ),
    # Small shapes that finish in seconds: for tests and a first look.
    "quick": BenchConfig(
        d_model=64, d_ff=128, n_experts=4,
        tokens=(1, 16, 256), top_ks=(1, 2),
        activation="swiglu", dtype="float32",
        repeats=3, min_repeats=3, seconds_per_measurement=0.05,
        reference_max_tokens=256, sgemm_n=256,
    ),
}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed implementation at one shape, ready to become a record."""

    implementation: str  # "moe" or "dense"
    backend: str  # "cpu" or "reference"
    call_time: timing.Timing
    flops: int
    rotation_sets: int
    params: dict
    extra: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- inputs


def token_sets(T: int, D: int, dtype: numpy.dtype, count: int, seed: int) -> list[numpy.ndarray]:
    """``count`` independent random ``(T, D)`` token batches, reproducible from
    ``seed`` and ``T`` (so MoE and dense see the same first batch)."""
    rng = numpy.random.default_rng([seed, T])
    return [rng.standard_normal((T, D), dtype=numpy.float64).astype(dtype) for _ in range(count)]


def rotation_count(token_bytes: int, weight_bytes: int) -> int:
    """Sets of (tokens, weight copy) needed to exceed the last-level cache."""
    return timing.sets_to_exceed_cache(token_bytes + weight_bytes)


def moe_weight_copies(weights: kernels.MoEWeights, count: int) -> list[kernels.MoEWeights]:
    """The original and ``count - 1`` copies in fresh memory."""
    def copy(array):
        return None if array is None else array.copy()

    copies = [weights]
    for _ in range(count - 1):
        copies.append(kernels.MoEWeights(router=copy(weights.router), w1=copy(weights.w1),
                                         w2=copy(weights.w2), w3=copy(weights.w3)))
    return copies


def dense_weights(D: int, width: int, activation: str, dtype: numpy.dtype, seed: int):
    """(w1, w2, w3) of a dense MLP of hidden width ``width``, drawn like one
    expert (``kernels.init_weights`` with one expert), so scales match the MoE."""
    single_expert = kernels.init_weights(kernels.MoEConfig(D, width, 1, 1, activation=activation),
                                         seed=seed, dtype=dtype)
    w3 = None if single_expert.w3 is None else single_expert.w3[0]
    return single_expert.w1[0], single_expert.w2[0], w3


def nbytes(*arrays) -> int:
    return sum(array.nbytes for array in arrays if array is not None)


# ---------------------------------------------------------------- timing


def budget(config: BenchConfig, min_repeats: int | None = None) -> timing.Budget:
    """The config's time budget per measurement, for ``timing.time_within_budget``."""
    return timing.Budget(seconds_per_measurement=config.seconds_per_measurement,
                         min_repeats=config.min_repeats if min_repeats is None else min_repeats,
                         max_repeats=config.repeats)


def measure_moe(T: int, K: int, config: BenchConfig) -> list[Measurement]:
    """The cpu MoE at (T, K), and the reference where T is small enough."""
    D, F, E = config.d_model, config.d_ff, config.n_experts
    dtype = numpy.dtype(config.dtype)
    cfg = kernels.MoEConfig(D, F, E, K, activation=config.activation)
    weights = kernels.init_weights(cfg, seed=config.seed, dtype=dtype)
    weight_bytes = nbytes(weights.router, weights.w1, weights.w2, weights.w3)
    count = rotation_count(T * D * dtype.itemsize, weight_bytes)
    args_sets = list(zip(token_sets(T, D, dtype, count, config.seed), moe_weight_copies(weights, count)))

    def moe_on(backend: str) -> Callable:
        return lambda x, layer_weights: kernels.moe_forward(x, layer_weights, cfg, backend=backend)

    first_output = kernels.moe_forward(*args_sets[0], cfg, backend="cpu")
    kept_assignments = int(first_output.plan.offsets[-1])
    flops = roofline.moe_flops(T, D, F, E, K, config.activation, kept_assignments=kept_assignments)
    params = {"tokens": T, "d_model": D, "d_ff": F, "n_experts": E, "top_k": K,
              "activation": config.activation, "dtype": config.dtype,
              "capacity_factor": cfg.capacity_factor, "seed": config.seed}

    # Nothing wrong is timed: the cpu output must first pass the project's one
    # tolerance rule against the float64 reference, routed the same way
    # (sweep_cells.check_moe_output: a spread of up to 64 rows, exact for this
    # dropless layer; it raises, and the run stops, when the rule is broken).
    checked = sweep_cells.check_moe_output(*args_sets[0], cfg, first_output,
                                           name=f"cpu moe_forward at T={T}, k={K}")
    results = [Measurement("moe", "cpu", timing.time_within_budget(moe_on("cpu"), args_sets, budget(config)),
                           flops, count, params, {"kept_assignments": kept_assignments, **checked})]
    if T <= config.reference_max_tokens:
        # The reference is slow and its time is only a ratio; three calls suffice.
        reference_timing = timing.time_within_budget(moe_on("reference"), args_sets, budget(config, min_repeats=3))
        results.append(Measurement("moe", "reference", reference_timing, flops, count, params,
                                   {"kept_assignments": kept_assignments}))
    return results


def measure_dense(T: int, width: int, config: BenchConfig, compared_as: list[str]) -> Measurement:
    """The cpu dense MLP of hidden width ``width`` at T tokens."""
    D = config.d_model
    dtype = numpy.dtype(config.dtype)
    w1, w2, w3 = dense_weights(D, width, config.activation, dtype, config.seed)
    count = rotation_count(T * D * dtype.itemsize, nbytes(w1, w2, w3))
    weight_sets = [(w1, w2, w3)] + [tuple(None if w is None else w.copy() for w in (w1, w2, w3))
                                    for _ in range(count - 1)]
    args_sets = [(x, *ws) for x, ws in zip(token_sets(T, D, dtype, count, config.seed), weight_sets)]

    def dense(x, w1, w2, w3):
        return kernels.dense_mlp(x, w1, w2, w3, activation=config.activation, backend="cpu")

    params = {"tokens": T, "d_model": D, "d_ff": width, "activation": config.activation,
              "dtype": config.dtype, "seed": config.seed}
    return Measurement("dense", "cpu", timing.time_within_budget(dense, args_sets, budget(config)),
                       roofline.dense_flops(T, D, width, config.activation), count, params,
                       {"compared_as": compared_as})


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class BenchResult:
    """The run's measurements, its SGEMM ceiling, and one table row per (T, k)."""

    config: BenchConfig
    sgemm_flop_per_s: float
    measurements: list[Measurement]
    rows: list[dict]


def dense_comparisons(config: BenchConfig) -> dict[int, list[str]]:
    """Dense widths to time, each with what it is compared as. Widths that
    coincide (E·F == K·F) are timed once."""
    comparisons: dict[int, list[str]] = {}
    for K in config.top_ks:
        comparisons.setdefault(K * config.d_ff, []).append(f"equal active FLOPs to k={K} (width K*F)")
    comparisons.setdefault(config.n_experts * config.d_ff, []).append("equal total parameters (width E*F)")
    return comparisons


def run_bench(config: BenchConfig, *, progress: bool = True) -> BenchResult:
    """Measure SGEMM, then every (T, k) of ``config``; build the table rows."""
    dtype = numpy.dtype(config.dtype)
    comparisons = dense_comparisons(config)
    n_reference = sum(T <= config.reference_max_tokens for T in config.tokens) * len(config.top_ks)
    total = 1 + len(config.tokens) * (len(config.top_ks) + len(comparisons)) + n_reference

    measurements: list[Measurement] = []
    rows: list[dict] = []
    with tqdm(total=total, desc="bench-cpu", unit="measurement", disable=not progress) as bar:
        bar.set_postfix_str("SGEMM")
        sgemm_flop_per_s = roofline.sgemm_rate(n=config.sgemm_n, dtype=dtype)
        bar.update()
        for T in config.tokens:
            dense_by_width = {}
            for width, compared_as in comparisons.items():
                bar.set_postfix_str(f"T={T} dense width {width}")
                dense_by_width[width] = measure_dense(T, width, config, compared_as)
                bar.update()
            measurements.extend(dense_by_width.values())
            for K in config.top_ks:
                bar.set_postfix_str(f"T={T} k={K} MoE")
                moe_measurements = measure_moe(T, K, config)
                bar.update(len(moe_measurements))
                measurements.extend(moe_measurements)
                rows.append(table_row(T, K, moe_measurements,
                                      dense_by_width[K * config.d_ff],
                                      dense_by_width[config.n_experts * config.d_ff],
                                      sgemm_flop_per_s))
    return BenchResult(config, sgemm_flop_per_s, measurements, rows)


def table_row(T: int, K: int, moe_measurements: list[Measurement], dense_active: Measurement,
              dense_params: Measurement, sgemm_flop_per_s: float) -> dict:
    by_backend = {m.backend: m for m in moe_measurements}
    moe = by_backend["cpu"]
    reference = by_backend.get("reference")
    moe_seconds = moe.call_time.median_s
    return {
        "tokens": T,
        "top_k": K,
        "moe_s": moe_seconds,
        "dense_active_s": dense_active.call_time.median_s,
        "dense_params_s": dense_params.call_time.median_s,
        "reference_s": None if reference is None else reference.call_time.median_s,
        "moe_over_dense_active": moe_seconds / dense_active.call_time.median_s,
        "moe_over_dense_params": moe_seconds / dense_params.call_time.median_s,
        "reference_over_cpu": None if reference is None else reference.call_time.median_s / moe_seconds,
        "moe_fraction_of_sgemm": moe.flops / moe_seconds / sgemm_flop_per_s,
    }


def to_records(result: BenchResult) -> list[dict]:
    """One tidy record per measurement, plus one for the SGEMM ceiling."""
    sgemm = {
        "implementation": "numpy-matmul", "backend": "cpu", "measurement": "sgemm-rate",
        "flop_per_s": result.sgemm_flop_per_s,
        "params": {"n": result.config.sgemm_n, "dtype": result.config.dtype},
    }
    timed = [
        {
            "implementation": m.implementation,
            "backend": m.backend,
            "measurement": "forward-time",
            **m.call_time.as_dict(),
            "flops": m.flops,
            "flop_per_s": m.flops / m.call_time.median_s,
            "fraction_of_sgemm": m.flops / m.call_time.median_s / result.sgemm_flop_per_s,
            "sgemm_flop_per_s": result.sgemm_flop_per_s,
            "rotation_sets": m.rotation_sets,
            **m.extra,
            "params": m.params,
        }
        for m in result.measurements
    ]
    return [sgemm, *timed]


# ---------------------------------------------------------------- reporting


def rows_from_records(found: list[dict]) -> tuple[list[dict], float]:
    """(table rows, SGEMM FLOP/s) of one run's ``bench-cpu`` records, rebuilt with
    ``table_row`` exactly as ``run_bench`` built them: how a chapter shows a
    committed run. Rows are ordered by (T, k); a (T, k) missing a baseline is left out."""
    sgemm = [record["flop_per_s"] for record in found if record.get("measurement") == "sgemm-rate"]
    if not sgemm:
        raise ValueError("records: expected the run's sgemm-rate record, found none")
    timed = [record for record in found if record.get("measurement") == "forward-time"]

    def measurement(record: dict) -> Measurement:
        call_time = timing.Timing(**{field: record[field] for field in ("median_s", "p20_s", "p80_s", "repeats")})
        return Measurement(record["implementation"], record["backend"], call_time, record["flops"],
                           record.get("rotation_sets", 0), record["params"])

    dense = {(record["params"]["tokens"], record["params"]["d_ff"]): measurement(record)
             for record in timed if record["implementation"] == "dense"}
    moe: dict = {}
    for record in timed:
        if record["implementation"] == "moe":
            key = (record["params"]["tokens"], record["params"]["top_k"])
            moe.setdefault(key, []).append(measurement(record))
    rows = []
    for (T, K), measured in sorted(moe.items()):
        params = measured[0].params
        active, total = dense.get((T, K * params["d_ff"])), dense.get((T, params["n_experts"] * params["d_ff"]))
        if active is not None and total is not None and any(m.backend == "cpu" for m in measured):
            rows.append(table_row(T, K, measured, active, total, sgemm[0]))
    return rows, sgemm[0]


def format_table(rows: list[dict]) -> str:
    """The ratio table ``main`` prints, one line per row of ``table_row``."""
    def milliseconds(seconds):
        return "-" if seconds is None else f"{seconds * 1e3:.3g}"

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    header = ("T", "k", "moe ms", "dense K*F ms", "dense E*F ms", "ref ms",
              "moe/dense_active", "moe/dense_params", "ref/cpu", "moe % SGEMM")
    lines = [header]
    for row in rows:
        lines.append((
            str(row["tokens"]), str(row["top_k"]),
            milliseconds(row["moe_s"]), milliseconds(row["dense_active_s"]),
            milliseconds(row["dense_params_s"]), milliseconds(row["reference_s"]),
            ratio(row["moe_over_dense_active"]), ratio(row["moe_over_dense_params"]),
            ratio(row["reference_over_cpu"]), f"{100 * row['moe_fraction_of_sgemm']:.1f}",
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def goal_report(rows: list[dict]) -> list[str]:
    """The two CPU-baseline goals, judged on every row with T >= LARGE_TOKENS."""
    large = [row for row in rows if row["tokens"] >= LARGE_TOKENS]
    if not large:
        return [f"Goals: not judged, no T >= {LARGE_TOKENS} in this run."]
    worst_ratio = max(row["moe_over_dense_active"] for row in large)
    worst_fraction = min(row["moe_fraction_of_sgemm"] for row in large)
    met = {True: "MET", False: "NOT MET"}
    return [
        f"Goal 1: MoE cpu within {GOAL_MAX_RATIO_TO_DENSE_ACTIVE:.2f}x of dense at equal active FLOPs "
        f"for T >= {LARGE_TOKENS}: worst {worst_ratio:.2f}x -> "
        f"{met[worst_ratio <= GOAL_MAX_RATIO_TO_DENSE_ACTIVE]}",
        f"Goal 2: MoE cpu >= {100 * GOAL_MIN_FRACTION_OF_SGEMM:.0f}% of measured SGEMM "
        f"for T >= {LARGE_TOKENS}: worst {100 * worst_fraction:.1f}% -> "
        f"{met[worst_fraction >= GOAL_MIN_FRACTION_OF_SGEMM]}",
    ]


# ---------------------------------------------------------------- command line


def parse_config(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.measure.bench_cpu",
        description="Time MoE (kernels cpu backend) against dense MLPs on this CPU; "
                    "print ratios and write bench-cpu records.")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats (seconds); explicit options still win")
    parser.add_argument("--d-model", type=int, help="D (full: 512)")
    parser.add_argument("--d-ff", type=int, help="F, each expert's hidden width (full: 1024)")
    parser.add_argument("--n-experts", type=int, help="E (full: 8)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts T (full: 1 4 ... 16384)")
    parser.add_argument("--k", type=int, nargs="+", dest="top_ks", help="experts per token (full: 1 2)")
    parser.add_argument("--activation", choices=("swiglu", "relu", "gelu"))
    parser.add_argument("--dtype", choices=("float32", "float64"))
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, at most (full: 20)")
    parser.add_argument("--seconds-per-measurement", type=float,
                        help="time budget that lowers the repeats of slow measurements (full: 2)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-write", action="store_true", help="print only; write no records")
    parser.add_argument("--results-dir", help="results folder (default: $MOE_RESULTS_DIR or <repo>/results)")
    arguments = parser.parse_args(argv)

    preset = PRESETS["quick" if arguments.quick else "full"]
    overrides = {field: getattr(arguments, field)
                 for field in ("d_model", "d_ff", "n_experts", "activation", "dtype", "repeats",
                               "seconds_per_measurement", "seed")
                 if getattr(arguments, field) is not None}
    if arguments.tokens is not None:
        overrides["tokens"] = tuple(arguments.tokens)
    if arguments.top_ks is not None:
        overrides["top_ks"] = tuple(arguments.top_ks)
    if "repeats" in overrides:
        overrides["min_repeats"] = min(preset.min_repeats, overrides["repeats"])
    config = dataclasses.replace(preset, **overrides)
    if any(T < 1 for T in config.tokens):
        parser.error(f"--tokens: expected positive counts, got {list(config.tokens)}")
    if config.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {config.repeats}")
    return config, arguments


def main(argv: list[str] | None = None) -> int:
    config, arguments = parse_config(argv)
    provenance = records.provenance("cpu")
    print(f"Device: {provenance['device']} ({provenance['cpu_count']} CPUs), BLAS: {provenance['blas']}, "
          f"last-level cache {timing.last_level_cache_bytes() // 2**20} MiB")
    print(f"MoE: D={config.d_model} F={config.d_ff} E={config.n_experts} {config.activation} "
          f"{config.dtype}; dense at equal active FLOPs (width K*F) and equal parameters (width E*F)")

    result = run_bench(config)

    print(f"\nSGEMM (numpy matmul {config.sgemm_n}x{config.sgemm_n} {config.dtype}): "
          f"{result.sgemm_flop_per_s / 1e9:.1f} GFLOP/s")
    print("Medians; ratios below 1 mean the MoE is faster. "
          f"ref: the float64 reference backend, timed only for T <= {config.reference_max_tokens} ('-' above).")
    print(format_table(result.rows))
    print()
    for line in goal_report(result.rows):
        print(line)

    if not arguments.no_write:
        path = records.write_records(RECORD_KIND, to_records(result), device_kind="cpu",
                                     results_dir=arguments.results_dir)
        print(f"\nRecords appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
