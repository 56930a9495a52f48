"""The CPU-baseline chapter (book/notebooks/cpu_baseline.ipynb): the ``bench-cpu`` view.

The chapter's sweep figures come from ``analysis.chapters.performance``, shared
with the GPU chapter; this module adds what only the CPU chapter shows, the
newest committed ``make bench-cpu`` run and its goals.
"""

from __future__ import annotations

import dataclasses

from analysis import records as record_io
from analysis.chapters.performance import provenance_text, newest_folder, newest_run
from analysis.measure import bench_cpu


NO_BENCH_CPU_RECORDS = "no bench-cpu records yet: run `make bench-cpu` to measure the ratio table and its goals"


@dataclasses.dataclass
class BenchCpuView:
    """The newest committed ``bench-cpu`` run as the CPU chapter shows it."""

    note: str
    #: ``bench_cpu.format_table`` and ``goal_report`` of the run, as ``make bench-cpu`` printed them;
    #: "" without records.
    text: str
    rows: list


def bench_cpu_view(results_dir=None) -> BenchCpuView:
    """The newest ``bench-cpu`` run on a CPU (``newest_folder``, ``newest_run``): its
    ratio table and the two goals, rebuilt from its records
    (``bench_cpu.rows_from_records``), with a note naming where they come from,
    or only a note saying there are none."""
    folder = newest_folder("cpu", results_dir, kind=bench_cpu.RECORD_KIND)
    if folder is None:
        root = record_io.results_root(results_dir)
        shown = root.relative_to(record_io.REPO_ROOT) if root.is_relative_to(record_io.REPO_ROOT) else root
        return BenchCpuView(f"Note: {NO_BENCH_CPU_RECORDS} (none under {shown.as_posix()}/).", "", [])
    run = newest_run(record_io.read_records(bench_cpu.RECORD_KIND, results_dir=results_dir, device=folder))
    rows, sgemm_flop_per_s = bench_cpu.rows_from_records(run)
    shape = next((r["params"] for r in run if r.get("measurement") == "forward-time"
                  and r.get("implementation") == "moe"), {})
    layer = [f"{letter} = {shape[key]}" for letter, key in (("D", "d_model"), ("F", "d_ff"), ("E", "n_experts"))
             if key in shape] + [str(shape[key]) for key in ("activation", "dtype") if key in shape]
    note = (f"Note: the newest committed bench-cpu run, not measured while this chapter ran: "
            f"{provenance_text(run[0], folder, bench_cpu.RECORD_KIND)}; {', '.join(layer)}; "
            f"SGEMM {sgemm_flop_per_s / 1e9:.1f} GFLOP/s.")
    text = bench_cpu.format_table(rows) + "\n\n" + "\n".join(bench_cpu.goal_report(rows))
    return BenchCpuView(note, text, rows)


def bench_cpu_goals() -> dict:
    """The two CPU-baseline goals' thresholds (``analysis.measure.bench_cpu``), by glue name, for the prose."""
    return {"bench_large_tokens": bench_cpu.LARGE_TOKENS,
            "bench_goal_ratio": f"{bench_cpu.GOAL_MAX_RATIO_TO_DENSE_ACTIVE:.2f}x",
            "bench_goal_fraction": f"{100 * bench_cpu.GOAL_MIN_FRACTION_OF_SGEMM:.0f}%"}
