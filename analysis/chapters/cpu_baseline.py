"""The CPU-baseline chapter (book/notebooks/cpu_baseline.ipynb): the ``bench-cpu`` view.

The chapter's sweep figures come from ``analysis.chapters.performance``, shared
with the GPU chapter; this module adds what only the CPU chapter shows, the
newest committed ``make bench-cpu`` run: our MoE against our dense MLPs and
PyTorch's layers, its ceilings, its four targets and a chart of the ratios.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import altair as alt
import pandas as pd

from analysis import charts
from analysis import records as record_io
from analysis.chapters.performance import check_sweep_parameters, newest_folder, newest_run, provenance_text
from analysis.measure import bench_cpu

NO_BENCH_CPU_RECORDS = "no bench-cpu records yet: run `make bench-cpu` to measure the ratio table and its targets"

#: What the MoE is compared with in the ratio chart: (row field, legend label), in legend order.
CHART_RATIOS = (
    ("moe_over_torch_eager", "PyTorch eager loop (HF)"),
    ("moe_over_torch_grouped", "torch._grouped_mm"),
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


def bench_cpu_view(results_dir=None) -> BenchCpuView:
    """The newest ``bench-cpu`` run on a CPU (``newest_folder``, ``newest_run``),
    rebuilt from its records (``bench_cpu.rows_from_records``), with a note
    naming where it comes from; or only a note saying there is none."""
    folder = newest_folder("cpu", results_dir, kind=bench_cpu.RECORD_KIND)
    if folder is None:
        root = record_io.results_root(results_dir)
        shown = root.relative_to(record_io.REPO_ROOT) if root.is_relative_to(record_io.REPO_ROOT) else root
        return BenchCpuView(f"{NO_BENCH_CPU_RECORDS} (none under {shown.as_posix()}/).", [])
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
    "pytorch": {"moe_over_torch_eager": "÷ PyTorch loop", "moe_over_torch_grouped": "÷ grouped_mm",
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
    columns = {"activation": "activation", "top_k": "k", "tokens": "T", "moe_s": "MoE ms", **RATIO_TABLES[table]}
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

    return pd.DataFrame([{"target": goal.name, "worst": goal.worst, "95% interval": interval(goal), "at": goal.where,
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
        x=alt.X("T:Q", scale=alt.Scale(type="log", base=2), title="tokens T"),
        y=alt.Y("MoE time / its time:Q", scale=alt.Scale(type="log"), title="MoE time / its time (log)"),
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
