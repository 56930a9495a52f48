"""The GPU chapter (book/notebooks/gpu_performance.ipynb): goals and utilisation.

The chapter's sweep figures come from ``analysis.chapters.performance``, shared
with the CPU chapter; this module adds what only a GPU run records: the study's
goals as measured ratios, Nsight Compute per kernel and NVML over a loop.
"""

from __future__ import annotations

from typing import Optional

import altair as alt
import pandas as pd

from analysis.chapters.performance import ChapterData, check_sweep_parameters, message_chart
from analysis.measure import sweep


def goals_frame(data: ChapterData, preset: Optional[str] = None, dtype: Optional[str] = None) -> pd.DataFrame:
    """``sweep.goal_table`` as a frame (percentages for fractions)."""
    if preset is None:
        preset, dtype = "mixtral", "float16"
    rows = sweep.goal_table(data.records, preset, dtype)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["measured"] = [None if m is None else (100 * m if u == "fraction" else m)
                         for m, u in zip(frame["measured"], frame["unit"])]
    frame["target"] = [100 * t if u == "fraction" else t for t, u in zip(frame["target"], frame["unit"])]
    frame["unit"] = frame["unit"].map({"fraction": "%", "ratio": "x"})
    frame["met"] = frame["met"].map({True: "met", False: "not met", None: "not measured"})
    return frame.set_index("goal")[["measured", "target", "unit", "met", "worst_at"]]


def ncu_frame(data: ChapterData) -> pd.DataFrame:
    rows = [dict(r, top_k=r["params"].get("top_k")) for r in data.records if r.get("measurement") == "ncu"]
    columns = ["top_k", "kernel", "stage", "sm_throughput_pct", "dram_throughput_pct", "achieved_occupancy_pct",
               "tensor_pipe_pct", "duration_s", "message"]
    return pd.DataFrame(rows).reindex(columns=columns) if rows else pd.DataFrame(columns=columns)


def nvml_frame(data: ChapterData) -> pd.DataFrame:
    rows = [dict(r, top_k=r["params"].get("top_k")) for r in data.records if r.get("measurement") == "nvml"]
    columns = ["top_k", "gpu_utilisation_pct", "gpu_utilisation_max_pct", "sm_clock_mhz", "power_w",
               "memory_used_bytes", "samples", "message"]
    return pd.DataFrame(rows).reindex(columns=columns).set_index("top_k") if rows else pd.DataFrame(columns=columns)


def utilisation_chart(ncu: pd.DataFrame) -> alt.TopLevelMixin:
    """Nsight Compute's four utilisation figures per kernel, k = 1 beside k = 2."""
    measured = ncu.dropna(subset=["sm_throughput_pct"]) if not ncu.empty else ncu
    if measured.empty:
        messages = sorted({m for m in ncu.get("message", pd.Series(dtype=str)).dropna()}) if not ncu.empty else []
        return message_chart("no Nsight Compute data" + (f": {messages[0][:140]}" if messages else ""))
    metrics = {"sm_throughput_pct": "SM throughput", "dram_throughput_pct": "DRAM throughput",
               "achieved_occupancy_pct": "achieved occupancy", "tensor_pipe_pct": "tensor pipe"}
    long = measured.melt(id_vars=["top_k", "kernel", "stage"], value_vars=list(metrics),
                         var_name="metric", value_name="percent")
    long["metric"] = long["metric"].map(metrics)
    long["k"] = "k = " + long["top_k"].astype(int).astype(str)
    return alt.Chart(long).mark_bar().encode(
        y=alt.Y("kernel:N", title=None, sort=None),
        x=alt.X("percent:Q", title="% of peak", scale=alt.Scale(domain=[0, 100])),
        yOffset="k:N",
        color=alt.Color("k:N", title=None, scale=alt.Scale(range=["#56B4E9", "#D55E00"])),
        column=alt.Column("metric:N", title=None),
    ).properties(width=150, height=alt.Step(9), title="Nsight Compute per kernel")


def validate_parameters(source: str, plan, results_dir) -> None:
    """The chapter's parameters, one clear sentence each (ValueError)."""
    check_sweep_parameters(source, plan, results_dir, device="cuda")



#: Reader's column names for the Nsight Compute and NVML tables.
READABLE = {"top_k": "k", "sm_throughput_pct": "SM throughput (%)", "dram_throughput_pct": "DRAM throughput (%)",
            "achieved_occupancy_pct": "achieved occupancy (%)", "tensor_pipe_pct": "tensor pipe (%)",
            "duration_s": "duration (s)", "gpu_utilisation_pct": "GPU utilisation (%)",
            "gpu_utilisation_max_pct": "max GPU utilisation (%)", "sm_clock_mhz": "SM clock (MHz)",
            "power_w": "power (W)", "memory_used_bytes": "memory used (bytes)"}


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (ncu_frame, nvml_frame) with the reader's column names, its index as a column."""
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()
    return frame.rename(columns=READABLE)
