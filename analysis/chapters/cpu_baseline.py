"""The CPU-baseline chapter (book/notebooks/cpu_baseline.ipynb): the ``bench-cpu`` views.

The newest committed ``make bench-cpu`` run (our MoE against our dense MLPs
and PyTorch's layers at one shape, its ceilings, its four targets and a chart
of the ratios) and the newest ``bench-cpu --grid`` run (the same over a grid
of shapes, the grid's targets and the fixed cost of a T = 1 call by step).
Of the older ``make sweep-cpu`` records the chapter keeps only the stage
shares and the skew ratios (``analysis.chapters.performance``), labelled with their conditions:
its times, measured with weights in cache on an older backend, contradicted
the bench (issue 23, item 2) and are not shown.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import altair as alt
import pandas as pd

from analysis import charts
from analysis import records as record_io
from analysis.chapters import performance
from analysis.chapters.performance import check_sweep_parameters, newest_folder, newest_run, provenance_text
from analysis.measure import bench_cpu, torch_overhead

NO_BENCH_CPU_RECORDS = "no bench-cpu records yet: run `make bench-cpu` to measure the ratio table and its targets"

#: What the MoE is compared with in the ratio chart: (row field, legend label), in legend order.
CHART_RATIOS = (
    ("moe_over_torch_eager", "PyTorch eager loop (HF)"),
    ("moe_over_torch_grouped", "PyTorch grouped GEMM"),
    ("moe_over_torch_dense", "PyTorch dense, width K·F"),
    ("moe_over_dense_active", "our dense, width K·F"),
)


def validate_parameters(source: str, plan, results_dir) -> None:
    """The chapter's parameters, one clear sentence each (ValueError)."""
    check_sweep_parameters(source, plan, results_dir, device="cpu")


@dataclasses.dataclass
class BenchCpuView:
    """The newest committed ``bench-cpu`` run as the CPU chapter shows it."""

    note: str
    #: ``bench_cpu.table_rows`` of the run (empty without records).
    rows: list
    #: ``bench_cpu.ceilings_from_records`` of the run (None without records).
    ceilings: Optional[dict] = None
    #: The run's records (empty without records).
    run: list = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows


def _none_under(message: str, results_dir) -> str:
    """``message`` and the results folder searched, relative to the repository where it lies inside."""
    root = record_io.results_root(results_dir)
    shown = root.relative_to(record_io.REPO_ROOT) if root.is_relative_to(record_io.REPO_ROOT) else root
    return f"{message} (none under {shown.as_posix()}/)."


def bench_cpu_view(results_dir=None) -> BenchCpuView:
    """The newest ``bench-cpu`` run on a CPU (``newest_folder``, ``newest_run``),
    rebuilt from its records (``bench_cpu.rows_from_records``), with a note
    naming where it comes from; or only a note saying there is none."""
    folder = newest_folder("cpu", results_dir, kind=bench_cpu.RECORD_KIND)
    if folder is None:
        return BenchCpuView(_none_under(NO_BENCH_CPU_RECORDS, results_dir), [])
    run = newest_run(record_io.read_records(bench_cpu.RECORD_KIND, results_dir=results_dir, device=folder))
    try:
        rows, ceilings = bench_cpu.rows_from_records(run)
    except ValueError as error:  # a run from before the copy-bandwidth record: say so, show nothing
        return BenchCpuView(f"the newest bench-cpu run ({provenance_text(run[0], folder, bench_cpu.RECORD_KIND)}) "
                            f"cannot be shown: {error}; run `make bench-cpu` again.", [])
    timed = [r for r in run if r.get("measurement") == "forward-time"]
    moe = next((r["params"] for r in timed if r.get("implementation") == "moe"), {})
    activations = sorted({r["params"]["activation"] for r in timed})
    layer = [f"{letter} = {moe[key]}" for letter, key in (("D", "d_model"), ("F", "d_ff"), ("E", "n_experts"))
             if key in moe] + [", ".join(activations)] + [str(moe[key]) for key in ("dtype",) if key in moe]
    note = (f"The newest committed bench-cpu run, not measured while this chapter ran: "
            f"{provenance_text(run[0], folder, bench_cpu.RECORD_KIND)}; {', '.join(layer)}; "
            f"{thread_text(run)}.")
    return BenchCpuView(note, rows, ceilings, run)


def thread_text(run: list) -> str:
    """The thread counts the run's implementations used, in words."""
    ours = sorted({r["threads"] for r in run if r.get("backend") == "cpu" and "threads" in r
                   and r.get("measurement") == "forward-time"})
    torch = sorted({r["threads"] for r in run if str(r.get("backend", "")).startswith("torch") and "threads" in r})
    words = f"our kernels on {_counts(ours)} threads"
    return words + (f", PyTorch on {_counts(torch)}" if torch else ", PyTorch not timed")


def _counts(values: list) -> str:
    return " and ".join(str(v) for v in values) if values else "an unrecorded number of"


def bench_numbers(view: BenchCpuView) -> dict:
    """Numbers for the prose, by glue name: the targets' thresholds, and the
    run's ceilings and thread counts (en dashes without a run)."""
    numbers = {
        "bench_peer_tokens": bench_cpu.PEER_TOKENS, "bench_goal_eager": f"{bench_cpu.GOAL_MAX_RATIO_TO_EAGER}",
        "bench_large_tokens": bench_cpu.LARGE_TOKENS,
        "bench_goal_ratio": f"{bench_cpu.GOAL_MAX_RATIO_TO_DENSE_ACTIVE:.2f}",
        "bench_goal_fraction": f"{100 * bench_cpu.GOAL_MIN_FRACTION_OF_SGEMM:.0f}%",
        "bench_decode_tokens": bench_cpu.DECODE_TOKENS,
        "bench_goal_decode": f"{bench_cpu.GOAL_MAX_DECODE_OVER_WEIGHT_READ}",
        "bench_sgemm": "\u2013", "bench_copy": "\u2013", "bench_threads": "\u2013", "bench_few_row": "\u2013",
        "bench_decode_floor": "\u2013",
    }
    numbers["bench_loop_share"] = loop_share_text(view)
    if view.ceilings is not None:
        ceilings = view.ceilings
        numbers["bench_sgemm"] = f"{ceilings['sgemm_flop_per_s'] / 1e9:.0f} GFLOP/s"
        numbers["bench_copy"] = f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s"
        numbers["bench_threads"] = thread_text(view.run)
        few_rows = ceilings.get("few_row_read_bytes_per_s") or {}
        numbers["bench_few_row"] = ", ".join(f"{rate / 1e9:.1f} GB/s with {n} row{'s' if n > 1 else ''}"
                                             for n, rate in sorted(few_rows.items())) or "(not measured in this run)"
        if few_rows:  # the fastest read NumPy offers (one row: a GEMV) against the copy the target uses
            numbers["bench_decode_floor"] = f"{ceilings['copy_bytes_per_s'] / max(few_rows.values()):.2f}"
    return numbers


def loop_share_text(view: BenchCpuView) -> str:
    """The PyTorch loop's share of the SGEMM rate for T >= LARGE_TOKENS in the
    run (geometric means over the rounds, lowest to highest), and the share
    the MoE would need to take GOAL_MAX_RATIO_TO_EAGER of its time."""
    shares = [row["torch_eager_fraction_of_sgemm"] for row in view.rows
              if row["tokens"] >= bench_cpu.LARGE_TOKENS and row.get("torch_eager_fraction_of_sgemm") is not None]
    if not shares:
        return f"(no PyTorch loop timed at T ≥ {bench_cpu.LARGE_TOKENS} in this run)"
    low, high = min(shares), max(shares)
    goal = bench_cpu.GOAL_MAX_RATIO_TO_EAGER
    return (f"{100 * low:.0f}–{100 * high:.0f}% of the SGEMM rate, so a MoE taking {goal} of its time would "
            f"run at {100 * low / goal:.0f}–{100 * high / goal:.0f}%")


#: The columns of the two ratio tables (row field: header), after activation, k, T and the MoE's time.
RATIO_TABLES = {
    "pytorch": {"moe_over_torch_eager": "÷ PyTorch loop", "moe_over_torch_grouped": "÷ PyTorch grouped GEMM",
                "moe_over_torch_dense": "÷ PyTorch dense K·F", "torch_eager_fraction_of_sgemm": "loop % of SGEMM"},
    "ours": {"moe_over_dense_active": "÷ our dense K·F", "moe_over_dense_params": "÷ our dense E·F",
             "moe_over_weight_read": "÷ weight read", "moe_fraction_of_sgemm": "% of SGEMM"},
}


def ratio_frame(view: BenchCpuView, table: str) -> pd.DataFrame:
    """One of the run's two tables for the page (``table``: "pytorch", the
    MoE against PyTorch's layers and the loop's own share of SGEMM; "ours",
    the MoE against our dense MLPs and the weight read, and its share of
    SGEMM): per (activation, k, T) the MoE's time (median over the rounds)
    and each ratio as its geometric mean over the rounds ± the larger side of
    its 95% interval (``bench_cpu.ratio_text``)."""
    columns = {"activation": "activation", "top_k": "k", "tokens": "T", "moe_s": "MoE time (ms)", **RATIO_TABLES[table]}
    shown = []
    for row in view.rows:
        line = {field: row[field] for field in ("activation", "top_k", "tokens")}
        line["moe_s"] = row["moe_s"] * 1e3
        for field in RATIO_TABLES[table]:
            line[field] = "–" if row[field] is None else bench_cpu.ratio_text(
                row, field, percent=field.endswith("fraction_of_sgemm"))
        shown.append(line)
    return pd.DataFrame(shown, columns=list(columns)).rename(columns=columns)


def goals_frame(view: BenchCpuView) -> pd.DataFrame:
    """The four targets as judged on the run: worst value (a geometric mean
    over the rounds), its 95% interval, where, verdict."""
    verdicts = {True: "met", False: "missed", None: "not judged"}

    def interval(goal):
        return "–" if goal.interval is None else f"{goal.interval[0]:.3g} to {goal.interval[1]:.3g}"

    return pd.DataFrame([{"target": goal.name, "worst value": goal.worst, "95% interval": interval(goal),
                          "at": goal.where,
                          "verdict": verdicts[goal.met] + (" (interval reaches across)" if goal.within_noise else "")}
                         for goal in bench_cpu.goals(view.rows)])


def ceilings_frame(view: BenchCpuView) -> pd.DataFrame:
    """The run's ceilings: the SGEMM rate (both ways of measuring it) and the copy bandwidth."""
    ceilings = view.ceilings or {}
    rows = [("SGEMM, the ceiling used", ceilings.get("sgemm_flop_per_s"), "GFLOP/s"),
            ("SGEMM, NumPy matmul on BLAS's threads", ceilings.get("sgemm_blas_threads_flop_per_s"), "GFLOP/s"),
            ("SGEMM, one single-threaded product per worker", ceilings.get("sgemm_one_per_worker_flop_per_s"),
             "GFLOP/s"),
            ("copy bandwidth (read + written)", ceilings.get("copy_bytes_per_s"), "GB/s")]
    rows += [(f"weights read by a product of {n} row{'s' if n > 1 else ''} (one thread)", rate, "GB/s")
             for n, rate in sorted((ceilings.get("few_row_read_bytes_per_s") or {}).items())]
    return pd.DataFrame([{"ceiling": name, "value": None if value is None else value / 1e9, "unit": unit}
                         for name, value, unit in rows])


def ratio_chart(view: BenchCpuView) -> alt.TopLevelMixin:
    """MoE time over each other layer's time against T, one panel per
    (activation, k); below 1, the MoE is faster. The dashed rule is the
    PyTorch-loop target."""
    lines = []
    for row in view.rows:
        for field, label in CHART_RATIOS:
            if row.get(field) is not None:
                interval = row.get(f"{field}_interval") or [row[field], row[field]]
                lines.append({"activation": row["activation"], "k": f"k = {row['top_k']}", "T": row["tokens"],
                              "compared with": label, "MoE time / its time": row[field],
                              "95% low": interval[0], "95% high": interval[1]})
    frame = pd.DataFrame(lines)
    labels = [label for _, label in CHART_RATIOS if label in set(frame.get("compared with", []))]
    base = alt.Chart().mark_line(point=True).encode(
        x=alt.X("T:Q", scale=alt.Scale(type="log", base=2, nice=False), title="tokens T"),
        y=alt.Y("MoE time / its time:Q", scale=_log_scale_fitting(frame, bench_cpu.GOAL_MAX_RATIO_TO_EAGER),
                title="MoE time / its time (log)"),
        color=alt.Color("compared with:N", scale=charts.palette(labels), sort=labels,
                        legend=alt.Legend(title="MoE compared with", orient="bottom", columns=2)),
        tooltip=["activation", "k", "T", "compared with", alt.Tooltip("MoE time / its time:Q", format=".3f")],
    ).properties(width=190, height=150)
    # Each ratio's 95% interval over the run's rounds.
    intervals = alt.Chart().mark_rule().encode(
        x="T:Q", y="95% low:Q", y2="95% high:Q",
        color=alt.Color("compared with:N", scale=charts.palette(labels), sort=labels, legend=None))
    target = alt.Chart().mark_rule(strokeDash=[4, 3], color="#000000").encode(
        y=alt.datum(bench_cpu.GOAL_MAX_RATIO_TO_EAGER))
    return alt.layer(base, intervals, target, data=frame).facet(
        column=alt.Column("activation:N", title=None), row=alt.Row("k:N", title=None)
    ).properties(title="MoE time over each other layer's time (below 1: the MoE is faster)")


def _log_scale_fitting(frame: pd.DataFrame, *marks: float) -> alt.Scale:
    """A log scale whose axis ends near the data (the intervals and the drawn targets
    ``marks``), not at the next power of ten beyond them."""
    if frame.empty:
        return alt.Scale(type="log")
    values = [*frame["95% low"], *frame["95% high"], *frame["MoE time / its time"], *marks]
    values = [value for value in values if value is not None and value > 0]
    return alt.Scale(type="log", domain=[min(values) / 1.1, max(values) * 1.1], nice=False)


# ---------------------------------------------------------------- the shape grid (issue 24)


GRID_COMMAND = 'make bench-cpu BENCH_ARGS="--grid"'
NO_GRID_RECORDS = (f"no bench-cpu-grid records yet: run `{GRID_COMMAND}` (about "
                   f"{bench_cpu.GRID_EXPECTED_MINUTES} minutes on 2 idle cores) "
                   "to measure the shape grid, its targets and the fixed cost of a decode step")


@dataclasses.dataclass
class GridView:
    """The newest committed ``bench-cpu --grid`` run as the CPU chapter shows it."""

    note: str
    #: ``bench_cpu.grid_rows`` of the run (empty without records).
    rows: list
    #: ``bench_cpu.fixed_cost_rows`` of the run.
    fixed: list = dataclasses.field(default_factory=list)
    run: list = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows


def grid_view(results_dir=None) -> GridView:
    """The newest ``bench-cpu-grid`` run on a CPU, rebuilt from its records
    (``bench_cpu.grid_rows``, ``fixed_cost_rows``), with a note naming where it
    comes from; or only a note naming the command that makes one."""
    folder = newest_folder("cpu", results_dir, kind=bench_cpu.GRID_KIND)
    if folder is None:
        return GridView(_none_under(NO_GRID_RECORDS, results_dir), [])
    run = newest_run(record_io.read_records(bench_cpu.GRID_KIND, results_dir=results_dir, device=folder))
    rows = bench_cpu.grid_rows(run)
    rounds = max((row["rounds"] for row in rows), default=0)
    note = (f"The newest committed bench-cpu grid run, not measured while this chapter ran: "
            f"{provenance_text(run[0], folder, bench_cpu.GRID_KIND)}; {len(rows)} shapes, {rounds} round(s) each; "
            f"{thread_text(run)}.")
    return GridView(note, rows, bench_cpu.fixed_cost_rows(run), run)


#: The grid table's ratio columns (row field: header).
GRID_RATIOS = {"moe_over_torch_eager": "÷ PyTorch loop", "moe_over_dense_active": "÷ dense K·F",
               "moe_over_weight_floor": "÷ read floor"}


def grid_frame(view: GridView) -> pd.DataFrame:
    """Every grid point: its shape, the MoE's time (median over the rounds)
    and each ratio as its geometric mean over the rounds ± the larger side of
    its 95% interval ("–" where the point has none: the weight-read floor
    exists for T ≤ DECODE_TOKENS only)."""
    # The activation and D, F, E share one column of words, which may wrap, so that
    # the point's numbers fit the page
    columns = {"shape": "layer", "tokens": "T", "top_k": "k", "moe_s": "MoE (ms)", **GRID_RATIOS}
    shown = []
    for row in view.rows:
        line = {field: row[field] for field in ("tokens", "top_k")}
        line["shape"] = _layer_text(row)
        line["moe_s"] = row["moe_s"] * 1e3
        for field in GRID_RATIOS:
            line[field] = "–" if row[field] is None else bench_cpu.ratio_text(row, field)
        shown.append(line)
    return pd.DataFrame(shown, columns=list(columns)).rename(columns=columns)


def grid_goals_frame(view: GridView) -> pd.DataFrame:
    """The grid's four targets: value (the worst point's, or the median's),
    its 95% interval over the rounds, where, verdict."""
    return _goals_table(bench_cpu.grid_goals(view.rows))


def _goals_table(found: list) -> pd.DataFrame:
    verdicts = {True: "met", False: "missed", None: "not judged"}

    def interval(goal):
        return "–" if goal.interval is None else f"{goal.interval[0]:.3g} to {goal.interval[1]:.3g}"

    return pd.DataFrame([{"target": goal.name, "value": goal.worst, "95% interval": interval(goal), "at": goal.where,
                          "verdict": verdicts[goal.met] + (" (interval reaches across)" if goal.within_noise else "")}
                         for goal in found])


def _layer_text(row: dict) -> str:
    """A grid point's layer in a table cell: "gelu, D 256, F 512, E 8"."""
    return f"{row['activation']}, D {row['d_model']}, F {row['d_ff']}, E {row['n_experts']}"


def _point_text(row: dict) -> str:
    """A grid point in prose: "gelu, T = 16, k = 2, D 256, F 512, E 8"."""
    return (f"{row['activation']}, T = {row['tokens']}, k = {row['top_k']}, D {row['d_model']}, F {row['d_ff']}, "
            f"E {row['n_experts']}")


def _rows_with(view: GridView, *fields: str) -> list:
    """The grid rows that hold every one of ``fields``."""
    return [row for row in view.rows if all(row.get(field) is not None for field in fields)]


def _worst(view: GridView, field: str, *needed: str) -> Optional[dict]:
    """The row with the largest ``field`` among those that hold it and ``needed``; None when none does."""
    rows = _rows_with(view, field, *needed)
    return max(rows, key=lambda row: row[field]) if rows else None


def gemm_rows_frame(view: GridView) -> pd.DataFrame:
    """The T >= LARGE_TOKENS grid points: MoE time over our dense MLP's at
    equal active FLOPs beside the slowdown of the GEMMs alone
    (``bench_cpu.measure_gemm_rows``: one thread's rate at the dense block's
    rows over its rate at an expert's mean rows), each ± the larger side of its
    95% interval. Empty for runs made before that measurement existed."""
    columns = ["layer", "T", "k", "rows per expert", "dense block rows", "GEMMs alone: slowdown", "MoE ÷ dense K·F"]
    shown = [{"layer": _layer_text(row), "T": row["tokens"], "k": row["top_k"], "rows per expert": row["expert_rows"],
              "dense block rows": row["dense_rows"],
              "GEMMs alone: slowdown": bench_cpu.ratio_text(row, "gemm_rows_slowdown"),
              "MoE ÷ dense K·F": bench_cpu.ratio_text(row, "moe_over_dense_active")}
             for row in _rows_with(view, "gemm_rows_slowdown")]
    return pd.DataFrame(shown, columns=columns)


def activation_frame(view: GridView) -> pd.DataFrame:
    """The T >= PEER_TOKENS grid points: MoE time over the PyTorch loop's
    beside our activation's time over PyTorch's on one expert's rows (one
    thread each, ``bench_cpu.measure_activation``), each ± the larger side of
    its 95% interval. Empty for runs without that measurement."""
    columns = ["layer", "T", "k", "rows", "activation: ours ÷ PyTorch's", "MoE ÷ PyTorch loop"]
    shown = [{"layer": _layer_text(row), "T": row["tokens"], "k": row["top_k"], "rows": row["activation_rows"],
              "activation: ours ÷ PyTorch's": bench_cpu.ratio_text(row, "activation_over_torch"),
              "MoE ÷ PyTorch loop": bench_cpu.ratio_text(row, "moe_over_torch_eager")}
             for row in _rows_with(view, "activation_over_torch", "moe_over_torch_eager")]
    return pd.DataFrame(shown, columns=columns)


def fixed_cost_frame(view: GridView) -> pd.DataFrame:
    """The fixed cost of a T = 1 call by step (``bench_cpu.measure_fixed_cost``),
    per k: microseconds (median over the rounds) and share of the whole call."""
    return pd.DataFrame([{"layer": row["shape"], "k": row["top_k"], "step": row["step"], "time (µs)": row["us"],
                          "share of the call": f"{100 * row['share']:.0f}%"} for row in view.fixed],
                        columns=["layer", "k", "step", "time (µs)", "share of the call"])


#: The grid chart's panels: (row field, panel title, the target drawn as a dashed rule).
GRID_CHART = (
    ("moe_over_torch_eager", "÷ PyTorch eager loop", bench_cpu.GRID_GOAL_WORST_TO_EAGER),
    ("moe_over_dense_active", "÷ our dense at K·F", bench_cpu.GOAL_MAX_RATIO_TO_DENSE_ACTIVE),
    ("moe_over_weight_floor", "÷ weight-read floor", bench_cpu.GRID_GOAL_DECODE_OVER_FLOOR),
)


def grid_chart(view: GridView) -> alt.TopLevelMixin:
    """Each grid point's MoE time over each baseline against T, one panel per
    baseline, coloured by E, with its 95% interval; the dashed rule is the
    panel's target at its worst point (the loop's median target is 0.9)."""
    lines = []
    for row in view.rows:
        for field, title, target in GRID_CHART:
            if row.get(field) is None:
                continue
            interval = row.get(f"{field}_interval") or [row[field], row[field]]
            lines.append({"compared with": title, "T": row["tokens"], "E": f"E = {row['n_experts']}",
                          "MoE time / its time": row[field], "95% low": interval[0], "95% high": interval[1],
                          "target": target,
                          "shape": f"{row['activation']} k={row['top_k']} D={row['d_model']} F={row['d_ff']}"})
    frame = pd.DataFrame(lines)
    experts = [f"E = {E}" for E in bench_cpu.GRID_AXES["n_experts"]]
    colour = alt.Color("E:N", sort=experts, scale=charts.palette(experts), legend=alt.Legend(title="experts"))
    x = alt.X("T:Q", scale=alt.Scale(type="log", base=2), title="tokens T",
              axis=alt.Axis(values=list(bench_cpu.GRID_AXES["tokens"])))
    points = alt.Chart().mark_point(filled=True).encode(
        x=x, y=alt.Y("MoE time / its time:Q",
                     scale=_log_scale_fitting(frame, *(target for _, _, target in GRID_CHART)),
                     title="MoE time / its time (log)"),
        color=colour, tooltip=["shape", "T", "E", alt.Tooltip("MoE time / its time:Q", format=".3f")])
    bars = alt.Chart().mark_rule().encode(x=x, y="95% low:Q", y2="95% high:Q", color=colour)
    target = alt.Chart().mark_rule(strokeDash=[4, 3], color="#000000").encode(y="target:Q")
    return alt.layer(points, bars, target, data=frame).properties(width=190, height=170).facet(
        column=alt.Column("compared with:N", title=None, sort=[title for _, title, _ in GRID_CHART])
    ).properties(title="The shape grid: MoE time over each baseline's (below 1: the MoE is faster)")


def grid_numbers(view: GridView) -> dict:
    """Numbers for the prose, by glue name: the grid's targets and its size."""
    worst = _worst(view, "moe_over_dense_active", "gemm_rows_slowdown")
    loop_worst = _worst(view, "moe_over_torch_eager", "activation_over_torch")
    return {"grid_loop_worst_activation": "–" if loop_worst is None else (
                f"{bench_cpu.ratio_text(loop_worst, 'activation_over_torch')} times PyTorch's "
                f"({_point_text(loop_worst)}; MoE ÷ loop {bench_cpu.ratio_text(loop_worst, 'moe_over_torch_eager')})"),
            "grid_dense_worst_gemm": "–" if worst is None else (
                f"{bench_cpu.ratio_text(worst, 'gemm_rows_slowdown')} at {worst['expert_rows']} rows per expert "
                f"against blocks of {worst['dense_rows']} rows (its MoE ÷ dense: "
                f"{bench_cpu.ratio_text(worst, 'moe_over_dense_active')})"),
            **_decode_numbers(view),
            "grid_points": len(view.rows) or bench_cpu.GRID_POINTS,
            "grid_goal_median": f"{bench_cpu.GRID_GOAL_MEDIAN_TO_EAGER}",
            "grid_goal_worst": f"{bench_cpu.GRID_GOAL_WORST_TO_EAGER}",
            "grid_goal_decode": f"{bench_cpu.GRID_GOAL_DECODE_OVER_FLOOR}"}


def _decode_numbers(view: GridView) -> dict:
    """The decode target's worst point set against what its floor leaves out:
    the floor (the touched weights at the one-row GEMV rate, the MoE's median
    time over the ratio), the rows of each touched expert's products there and
    how much slower BLAS reads the weights for them, and a k = 1, T = 1 call's
    time besides its expert MLPs (the fixed-cost breakdown, at the one-shape
    layer), in microseconds; dashes where the run has none of them."""
    worst = _worst(view, "moe_over_weight_floor")
    fixed = {row["step"]: row["us"] for row in view.fixed if row["top_k"] == 1}
    return {"grid_decode_worst_floor": "–" if worst is None else
            f"{worst['moe_s'] / worst['moe_over_weight_floor'] * 1e6:.0f} µs ({_point_text(worst)})",
            "grid_decode_worst_rows": "–" if worst is None or "decode_product_rows" not in worst else (
                "one row, the floor's own product" if worst["decode_product_rows"] == 1 else
                f"{worst['decode_product_rows']} rows, whose weights one thread's BLAS reads "
                f"{bench_cpu.ratio_text(worst, 'decode_rows_slowdown')} times slower than one row's"),
            "grid_fixed_besides_mlps": "–" if not fixed else
            f"{fixed['whole call'] - fixed['expert MLPs']:.0f} µs of its {fixed['whole call']:.0f} µs"}


# ---------------------------------------------------------------- the sweep's views (issue 23, item 2)


def sweep_conditions(note: str) -> str:
    """What a reader must know before reading the sweep's per-stage shares and
    skew ratios beside the bench-cpu run: where they come from (``note``,
    the sweep's provenance) and why its times are not shown."""
    return (f"{note} The sweep ran on an older backend (the commit above) with each expert's weights staying "
            "in cache from call to call (its expert MLP passed 100% of its memory roofline at T = 1), so its "
            "times are not this backend's and are not shown: the bench-cpu sections above give the times and "
            "every comparison with dense and PyTorch. Shown here are only ratios within the sweep: each stage's "
            "share of the stages' summed time (the stages run one by one, where the backend now runs permute and "
            "combine inside the expert tasks; with weights in cache the expert MLPs' share at small T is a lower "
            "bound), and the layer's time under skewed routing over its time under uniform routing at the same "
            "T and k. Its % of roofline is not shown: with weights in cache it passed 100%.")


def skew_frame(data, preset: str, dtype: str) -> pd.DataFrame:
    """The sweep's skew ratios for the page (``performance.skew_frame``) without
    its times: routing, T, k, the layer's time over uniform routing's, and the
    load the kernels saw."""
    skews = performance.skew_frame(data, preset, dtype)
    if skews.empty:
        return pd.DataFrame()
    return pd.DataFrame({"routing": skews["skew"], "T": skews["tokens"], "k": skews["top_k"],
                         "time / uniform routing's": skews["time_vs_uniform"],
                         "busiest expert / mean load": skews["load_max_over_mean"],
                         "experts with tokens": skews["experts_used"].astype(int)})


# ---------------------------------------------------------------- from PyTorch

TORCH_OVERHEAD_COMMAND = "python -m analysis.measure.torch_overhead"


@dataclasses.dataclass
class TorchOverheadView:
    note: str
    frame: pd.DataFrame
    numbers: dict


def torch_overhead_view(results_dir=None) -> TorchOverheadView:
    """What ``topk_moe.torch`` adds over the NumPy call, from the newest
    ``torch-overhead`` run on a CPU: its table (``torch_overhead.overhead_frame``),
    a note saying where it comes from, and the numbers the contract chapter
    pastes (``torch_overhead_t1``, ``torch_overhead_t4096``, ``torch_overhead_layer_t1``)."""
    folder = newest_folder("cpu", results_dir, kind=torch_overhead.RECORD_KIND)
    if folder is None:
        missing = f"not measured yet (run `{TORCH_OVERHEAD_COMMAND}`)"
        return TorchOverheadView(f"No torch-overhead records yet: run `{TORCH_OVERHEAD_COMMAND}`.", pd.DataFrame(),
                                 {"torch_overhead_t1": missing, "torch_overhead_t4096": missing,
                                  "torch_overhead_layer_t1": missing})
    run = newest_run(record_io.read_records(torch_overhead.RECORD_KIND, results_dir=results_dir, device=folder))
    frame = torch_overhead.overhead_frame(run)
    machine = sorted({record["params"]["machine"] for record in run})
    note = (f"The newest committed torch-overhead run, not measured while this chapter ran: "
            f"{provenance_text(run[0], folder, torch_overhead.RECORD_KIND)}; {'; '.join(machine)}.")

    def added(entry: str, tokens: int) -> str:
        found = [r for r in run if r["entry"] == entry and r["params"]["tokens"] == tokens]
        if not found:
            return "not measured"
        record = found[0]
        median, low, high = record["overhead_median_s"], record["overhead_p20_s"], record["overhead_p80_s"]
        spread = f"20th to 80th percentile over the rounds {_duration(low)} to {_duration(high)}"
        if low <= 0 <= high:
            return (f"none that the run could tell from noise ({_duration(median)} per call, {spread}, "
                    f"against the NumPy call's {_duration(record['numpy_median_s'])})")
        return (f"{_duration(median)} per call ({spread}; {100 * record['overhead_fraction']:.0f}% of the "
                f"NumPy call's {_duration(record['numpy_median_s'])})")

    numbers = {"torch_overhead_t1": added("torch-function", 1), "torch_overhead_t4096": added("torch-function", 4096),
               "torch_overhead_layer_t1": added("moe-layer", 1)}
    return TorchOverheadView(note, overhead_table(frame), numbers)


#: The torch-overhead entries in words, as the prose names them.
OVERHEAD_ENTRIES = {"torch-function": "functions on tensors", "moe-layer": "MoELayer"}


def overhead_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``torch_overhead.overhead_frame`` turned to fit the page: one row per quantity,
    one column per (entry, T), the entries in words, the 20th and 80th percentiles in
    one cell, times in µs (the note names the machine and commit, so those go)."""
    if frame.empty:
        return frame
    from analysis.display import significant  # noqa: PLC0415

    quantities = {
        "the NumPy call (µs)": lambda row: significant(row["NumPy call (us)"]),
        "overhead, median (µs)": lambda row: significant(row["overhead, median (us)"]),
        "overhead, 20th to 80th percentile (µs)": lambda row: (f"{significant(row['overhead p20 (us)'])} to "
                                                               f"{significant(row['overhead p80 (us)'])}"),
        "overhead of the fast calls (µs)": lambda row: significant(row["overhead of the fast calls (us)"]),
        "overhead (% of the NumPy call)": lambda row: significant(row["overhead (% of the NumPy call)"]),
    }
    columns = {f"{OVERHEAD_ENTRIES.get(row['entry'], row['entry'])}, T = {row['T']:,}": row
               for _, row in frame.iterrows()}
    return pd.DataFrame([{"quantity": name, **{column: shown(row) for column, row in columns.items()}}
                         for name, shown in quantities.items()])


def _duration(seconds: float) -> str:
    """A signed duration in µs below a millisecond, else in ms, three significant digits."""
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    return f"{seconds * 1e3:.3g} ms"

