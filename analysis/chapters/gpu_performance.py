"""The GPU chapter (book/notebooks/gpu_performance.ipynb): goals and utilisation.

The chapter's sweep figures come from ``analysis.chapters.performance``, shared
with the CPU chapter; this module adds what only a GPU run records: the study's
goals as measured ratios, Nsight Compute per kernel and NVML over a loop.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import altair as alt
import numpy as np
import pandas as pd

from analysis import charts
from analysis import records as record_io
from analysis.chapters.performance import ChapterData, check_sweep_parameters, message_chart
from analysis.display import Note
from analysis.measure import gpu_model, sweep


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


#: The sweep summary's columns (performance.summary_frame) in the reader's words.
SUMMARY_WORDS = {"tokens": "T", "top_k": "k", "moe ms": "MoE (ms)", "moe_graph ms": "MoE, CUDA graph (ms)",
                 "dense_active ms": "dense, equal active FLOPs (ms)", "dense_params ms": "dense, equal parameters (ms)",
                 "hf_eager ms": "Hugging Face loop (ms)", "grouped_mm ms": "torch._grouped_mm (ms)",
                 "moe % of roofline": "MoE, % of roofline"}


def summary_tables(summary: pd.DataFrame) -> tuple:
    """``performance.summary_frame`` as two tables that fit the page, with words for
    headers: the MoE beside the dense MLPs, and the MoE beside the PyTorch peers."""
    if summary.empty:
        return summary, summary
    frame = summary.reset_index().rename(columns=SUMMARY_WORDS)
    shape = ["preset", "dtype", "T", "k"]
    dense = [c for c in ("MoE (ms)", "MoE, CUDA graph (ms)", "dense, equal active FLOPs (ms)",
                         "dense, equal parameters (ms)") if c in frame.columns]
    peers = [c for c in ("MoE (ms)", "Hugging Face loop (ms)", "torch._grouped_mm (ms)", "MoE, % of roofline")
             if c in frame.columns]
    return frame[shape + dense], frame[shape + peers]


#: The skew table's columns (performance.skew_frame) in the reader's words.
SKEW_WORDS = {"skew": "routing", "tokens": "T", "top_k": "k", "median_s": "time (ms)",
              "time_vs_uniform": "time / uniform routing's", "load_max_over_mean": "busiest expert's rows / mean",
              "experts_used": "experts used"}


def skew_table(skews: pd.DataFrame) -> pd.DataFrame:
    """``performance.skew_frame`` with words for headers and the time in milliseconds."""
    if skews.empty:
        return skews
    return skews.assign(median_s=1e3 * skews["median_s"]).rename(columns=SKEW_WORDS)


def goals_table(goals: pd.DataFrame) -> pd.DataFrame:
    """``goals_frame`` with words for headers."""
    return goals.rename(columns={"worst_at": "worst at", "met": "verdict"})


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def utilisation_figure(ncu: pd.DataFrame):
    """``utilisation_chart`` as a numbered figure, or, where Nsight Compute measured no
    kernel, a note saying why (no figure of an empty chart)."""
    measured = ncu.dropna(subset=["sm_throughput_pct"]) if not ncu.empty else ncu
    if measured.empty:
        messages = sorted({m for m in ncu["message"].dropna()}) if "message" in ncu else []
        return Note("No Nsight Compute data", "Nsight Compute measured no kernel in this run"
                    + (f": {messages[0]}" if messages else "."))
    return charts.figure(
        utilisation_chart(ncu),
        "Nsight Compute per kernel, k = 1 beside k = 2, measured on the GPU. Read which kernels keep the DRAM "
        "busy and which the SMs or tensor pipes.",
        f"Horizontal bars for {_count(measured['kernel'].nunique(), 'kernel')}, one panel per metric "
        "(SM throughput, DRAM throughput, achieved occupancy, tensor pipe), each as % of its peak from 0 to 100, "
        "k = 1 in sky blue and k = 2 in vermilion.")


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


# ---------------------------------------------------------------- the prediction (issue 21)
#
# What the model of analysis.measure.gpu_model expects on an A100 SXM and an
# H100 SXM: read from its records under results/predicted-model/, never typed
# in. Every table caption and chart title says "predicted (model), not measured".

PREDICTED = gpu_model.LABEL
#: T shown in the waves table and as the roofline chart's points.
SHOWN_TOKENS = (1, 256, 8192)
ROOFLINE_TOKENS = (1, 64, 4096, 32768)
#: The prediction's stages as the sweep times them (the expert GEMMs are one call).
#: Stage -> the name the per-stage chart colours it by: a dense GEMM shares its expert GEMM's colour.
STAGE_PARTS = {"router": "router", "dispatch": "dispatch", "permute": "permute", "expert_gemm1": "GEMM 1",
               "dense_gemm1": "GEMM 1", "dense_activation": "activation (dense)", "expert_gemm2": "GEMM 2",
               "dense_gemm2": "GEMM 2", "combine": "combine"}
#: One colour per stage in every prediction chart (a dense GEMM shares its expert GEMM's).
STAGE_COLOURS = charts.palette(list(dict.fromkeys(STAGE_PARTS.values())))
MEASURED_STAGES = {"router": ("router",), "dispatch": ("dispatch",), "permute": ("permute",),
                   "expert_mlp": ("expert_gemm1", "expert_gemm2"), "combine": ("combine",)}


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's records: occupancy per kernel, floors per case, the published check."""

    occupancy: list
    floors: list
    sanity: list
    traffic: list  # the emulator's request counts, for the effects of item 5
    #: What the first GPU run measured to check it (issue 21, item 7): the device
    #: check's Nsight Compute records (kind ``gpu-ncu``), newest run; () when none.
    measured: tuple = ()

    @property
    def empty(self) -> bool:
        return not (self.occupancy or self.floors)


def prediction_data(results_dir=None) -> Prediction:
    return Prediction(gpu_model.read_kind(gpu_model.OCCUPANCY_KIND, results_dir),
                      gpu_model.read_kind(gpu_model.PREDICTION_KIND, results_dir),
                      gpu_model.read_kind(gpu_model.SANITY_KIND, results_dir),
                      gpu_model.traffic_records(results_dir),
                      tuple(device_check_ncu(results_dir)))


#: The kind of the device check's Nsight Compute records (analysis.measure.device_check.NCU_KIND;
#: not imported: that module imports topk_moe's build report).
DEVICE_CHECK_NCU_KIND = "gpu-ncu"


def device_check_ncu(results_dir=None) -> list:
    """The newest run of the device check's Nsight Compute records (``make
    device-check`` on a GPU: one per (k, kernel) at the emulator's traffic shape,
    preset "cpu", T = 256, float16), from the GPU folder that holds the newest;
    [] when there are none. Rehearsals write none; any marked one is left out."""
    try:
        found = record_io.read_records(DEVICE_CHECK_NCU_KIND, results_dir=results_dir)
    except FileNotFoundError:
        return []
    found = [r for r in found if r.get("device_kind") == "gpu" and not r.get("rehearsal")]
    newest = max((r.get("utc", "") for r in found), default=None)
    return [r for r in found if r.get("utc", "") == newest]


def prediction_note(prediction: Prediction, results_dir=None) -> Note:
    """Where the prediction comes from, in a visible box."""
    folder = gpu_model.predicted_root(results_dir)
    if prediction.empty:
        return Note("Predicted (model), not measured", f"No model records were found under {folder.name}/. "
                    "Run `python -m analysis.measure.gpu_model` to make them (nvcc, no GPU).")
    found = prediction.floors + prediction.occupancy
    utc = max(r["utc"] for r in found)[:10]
    commits = sorted({str(r.get("git_commit"))[:12] for r in found})
    devices = "; ".join(device.source for device in gpu_model.DEVICES.values())
    return Note("Predicted (model), not measured", (
        f"Nothing in this section ran on a GPU. `python -m analysis.measure.gpu_model` computed it on "
        f"{utc} (commit {', '.join(commits)}; records in results/{folder.name}/) from nvcc's register and "
        f"shared-memory report, the launchers' grids, the roofline's byte and FLOP formulas, the emulator's "
        f"extra sectors and these datasheets: {devices}. Launch overhead: {gpu_model.LAUNCH_SOURCE}. "
        f"{gpu_model.MMA_SYNC_NOTE}"))


def occupancy_frame(prediction: Prediction) -> pd.DataFrame:
    """One row per kernel: threads, and per architecture registers, shared bytes,
    blocks per SM, occupancy (%) and the limiter."""
    rows: dict = {}
    for record in prediction.occupancy:
        row = rows.setdefault(record["kernel"], {"kernel": record["kernel"],
                                                 "threads": record["threads_per_block"]})
        arch = f"sm_{record['arch']}"
        row[f"{arch} registers"] = record["registers"]
        row[f"{arch} shared (bytes)"] = record["shared_bytes"]
        row[f"{arch} blocks/SM"] = record["blocks_per_sm"]
        row[f"{arch} occupancy (%)"] = 100 * record["occupancy"]
        row[f"{arch} limiter"] = record["limiter"]
    return pd.DataFrame(list(rows.values()))


#: The model's devices by architecture, for the tables' captions.
ARCH_DEVICE = {80: "A100 SXM", 90: "H100 SXM"}


def occupancy_tables(prediction: Prediction) -> dict:
    """``occupancy_frame`` as one narrow table per architecture ({"sm_80": frame, ...}),
    so each fits the page: kernel, threads per block, registers per thread, shared
    bytes per block, occupancy (%) and the limiter (blocks per SM are occupancy
    times 64 warps over the block's warps)."""
    frame = occupancy_frame(prediction)
    tables = {}
    for arch in sorted({r["arch"] for r in prediction.occupancy}):
        name = f"sm_{arch}"
        table = frame[["kernel", f"{name} registers", f"{name} shared (bytes)",
                       f"{name} occupancy (%)", f"{name} limiter"]]
        if not table[f"{name} limiter"].str.contains("shared").any():  # narrower: the bytes limit nothing here
            table = table.drop(columns=f"{name} shared (bytes)")
        tables[name] = table.assign(**{f"{name} limiter": table[f"{name} limiter"].str.replace(" and ", ", ")}).rename(
            columns={f"{name} registers": "registers", f"{name} shared (bytes)": "shared (bytes)",
                     f"{name} occupancy (%)": "occupancy (%)", f"{name} limiter": "limiter"})
    return tables


def threads_sentence(prediction: Prediction) -> str:
    """The block sizes in words (the occupancy tables leave the column out to fit the page):
    "Every kernel runs 256 threads per block but these, 128: ..."."""
    frame = occupancy_frame(prediction)
    if frame.empty:
        return ""
    counts = frame["threads"].value_counts()
    common = int(counts.index[0])
    if len(counts) == 1:
        return f"Every kernel runs {common} threads per block."
    others = "; ".join(f"{int(n)}: {', '.join(frame.loc[frame['threads'] == n, 'kernel'])}"
                       for n in counts.index[1:])
    return f"Every kernel runs {common} threads per block but these ({others})."


def occupancy_caption(arch: str = "", prediction: Optional[Prediction] = None) -> str:
    """The occupancy table's caption (``arch``: "sm_80" or "sm_90", one table's; "" both),
    with the block sizes when ``prediction`` is given."""
    number = int(arch.removeprefix("sm_")) if arch else None
    which = f"{ARCH_DEVICE.get(number, arch)} ({arch})" if arch else "A100 is sm_80, H100 sm_90"
    return (f"Theoretical occupancy per kernel, {PREDICTED}: {which}; shared bytes are "
            "per block (static plus the launcher's dynamic, shown where shared memory limits a kernel); registers "
            "per thread; occupancy is resident warps over 64."
            + (f" {threads_sentence(prediction)}" if prediction else ""))


def waves_frame(prediction: Prediction, preset: str = "mixtral", tokens=SHOWN_TOKENS) -> pd.DataFrame:
    """Blocks, waves and the last wave's fill of our kernels for k = 1, 2 and the
    dense MLP's activation (uniform routing), A100 beside H100."""
    rows = gpu_model.wave_rows(prediction.occupancy, preset, tokens)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    frame["case"] = [f"k = {k}" if k else f"dense, width {d}" for k, d in zip(frame["k"], frame["d_ff"])]
    frame["device_model"] = frame["device_model"].str.replace(" SXM", "")
    frame["last wave (%)"] = 100 * frame["last_wave_fill"]
    # Grid-stride kernels launch at most 32 blocks per SM: their grids differ between the devices.
    wide = frame.pivot_table(index=["case", "tokens", "stage", "kernel"], columns="device_model",
                             values=["working_blocks", "blocks_per_sm", "waves", "last wave (%)"], aggfunc="first",
                             sort=False)
    wide.columns = [f"{device} {name}" for name, device in wide.columns]
    for column in wide.columns:
        if not column.endswith("(%)"):
            wide[column] = wide[column].astype("Int64")
    names = {"working_blocks": "blocks", "blocks_per_sm": "blocks/SM", "waves": "waves",
             "last wave (%)": "last wave (%)"}
    order = [f"{device} {name}" for device in ("A100", "H100") for name in names]
    wide = wide.reset_index().rename(columns={"tokens": "T"})
    return wide[["case", "T", "stage", "kernel", *order]].rename(
        columns={f"{device} {name}": f"{device} {label}" for device in ("A100", "H100")
                 for name, label in names.items()})


def waves_tables(prediction: Prediction, preset: str = "mixtral", tokens=SHOWN_TOKENS) -> dict:
    """``waves_frame`` as one narrow table per device ({"A100": frame, "H100": frame}):
    case, T, kernel, blocks, waves and the last wave's fill (blocks per SM are in
    the occupancy tables; the kernel's name says its stage)."""
    frame = waves_frame(prediction, preset, tokens)
    if frame.empty:
        return {}
    # The dense widths as the prose names them (F and 2 F), so the column stays narrow.
    widths = sorted({int(text.rsplit(" ", 1)[1]) for text in frame["case"] if text.startswith("dense")})
    names = {f"dense, width {width}": f"dense ({'' if i == 0 else f'{i + 1} '}F)" for i, width in enumerate(widths)}
    frame = frame.assign(case=frame["case"].replace(names))
    return {device: frame[["case", "T", "kernel", f"{device} blocks", f"{device} waves",
                           f"{device} last wave (%)"]].rename(columns={
                f"{device} blocks": "blocks", f"{device} waves": "waves",
                f"{device} last wave (%)": "last wave full (%)"})
            for device in ("A100", "H100")}


def floors_frame(prediction: Prediction, preset: str = "mixtral") -> pd.DataFrame:
    """The floor records of ``preset`` flattened, with a series label."""
    rows = []
    for record in prediction.floors:
        params = record["params"]
        if params["preset"] != preset:
            continue
        k, routing = record["k"], params["routing"]
        if k:
            series = f"MoE k = {k}" + (", the study's routing" if routing == "study" else "")
        else:
            series = f"dense, width {record['d_ff']}"
        rows.append({"device_model": record["device_model"], "series": series, "k": k, "routing": routing,
                     "d_ff": record["d_ff"], "tokens": record["tokens"], "stage": record["stage"],
                     "floor_us": 1e6 * record["floor_s"], "bound": record["bound"], "bytes": record["bytes"],
                     "flops": record["flops"], "version": params.get("version"),
                     "touched_experts": params.get("touched_experts"),
                     "memory_utilisation": record["predicted_utilisation"]["memory"],
                     "compute_utilisation": record["predicted_utilisation"]["compute"]})
    return pd.DataFrame(rows)


def layer_floor_chart(frame: pd.DataFrame, preset: str = "mixtral") -> alt.TopLevelMixin:
    """The layer's floor against T, k = 1 and 2 (uniform and the study's routing)
    beside the dense MLPs, one panel per device."""
    if frame.empty:
        return message_chart(f"no model records: run python -m analysis.measure.gpu_model ({PREDICTED})")
    layer = frame[frame["stage"] == "layer"]
    return alt.Chart(layer).mark_line(point=True).encode(
        x=alt.X("tokens:Q", scale=alt.Scale(type="log", base=2, nice=False), title="tokens T"),
        y=alt.Y("floor_us:Q", scale=alt.Scale(type="log", nice=False), title="floor per layer (µs)"),
        color=alt.Color("series:N", title=None, scale=charts.palette(sorted(layer["series"].unique())),
                        legend=alt.Legend(orient="bottom", columns=3, labelLimit=260)),
        # The prose promises the study's routing dashed: the series names say it, so no second legend.
        strokeDash=alt.StrokeDash("routing:N", legend=None, scale=alt.Scale(domain=["uniform", "study"],
                                                                            range=[[1, 0], [5, 3]])),
        tooltip=["series", "tokens", "floor_us", "bound"],
        column=alt.Column("device_model:N", title=None),
    ).properties(width=260, height=220, title=f"{preset}: time floor per layer, {PREDICTED}")


def stage_floor_chart(frame: pd.DataFrame, preset: str = "mixtral") -> alt.TopLevelMixin:
    """Each stage's floor against T, uniform routing, k = 1 and 2 and dense, one panel per device and case."""
    if frame.empty:
        return message_chart(f"no model records: run python -m analysis.measure.gpu_model ({PREDICTED})")
    stages = frame[(frame["stage"] != "layer") & (frame["routing"] != "study")
                   & ((frame["k"] > 0) | (frame["d_ff"] == frame["d_ff"].min()))].copy()
    stages["case"] = [f"k = {k}" if k else f"dense, width {d}" for k, d in zip(stages["k"], stages["d_ff"])]
    stages["part"] = stages["stage"].map(STAGE_PARTS).fillna(stages["stage"])
    return alt.Chart(stages).mark_line(point=True).encode(
        x=alt.X("tokens:Q", scale=alt.Scale(type="log", base=2, nice=False), title="tokens T"),
        y=alt.Y("floor_us:Q", scale=alt.Scale(type="log", nice=False), title="floor (µs)"),
        color=alt.Color("part:N", title=None, scale=STAGE_COLOURS,
                        legend=alt.Legend(orient="bottom", columns=4)),
        tooltip=["stage", "tokens", "floor_us", "bound", "version"],
        column=alt.Column("case:N", title=None), row=alt.Row("device_model:N", title=None),
    ).properties(width=170, height=150, title=f"{preset}: time floor per stage, {PREDICTED}")


def roofline_chart(frame: pd.DataFrame, preset: str = "mixtral", tokens=ROOFLINE_TOKENS) -> alt.TopLevelMixin:
    """Where each stage sits on each device's roofline: its FLOPs per byte against
    the FLOP rate it reaches at its floor, under min(peak, bandwidth x intensity)."""
    if frame.empty:
        return message_chart(f"no model records: run python -m analysis.measure.gpu_model ({PREDICTED})")
    points = frame[(frame["stage"] != "layer") & (frame["routing"] != "study") & (frame["flops"] > 0)
                   & frame["tokens"].isin(tokens) & ((frame["k"] > 0) | (frame["d_ff"] == frame["d_ff"].min()))].copy()
    points["intensity"] = points["flops"] / points["bytes"]
    points["tflop_per_s"] = points["flops"] / (points["floor_us"] * 1e-6) / 1e12
    points["case"] = [f"k = {k}" if k else "dense" for k in points["k"]]
    points["T"] = points["tokens"].astype(str)
    points["part"] = points["stage"].map(STAGE_PARTS).fillna(points["stage"])
    lo, hi = max(points["intensity"].min() / 2, 0.1), points["intensity"].max() * 2
    roofs = []
    for device in gpu_model.DEVICES.values():
        for intensity in np.geomspace(lo, hi, 60):
            roofs.append({"device_model": device.model, "intensity": intensity,
                          "tflop_per_s": min(device.tensor_flop_per_s, device.hbm_bytes_per_s * intensity) / 1e12})
    x = alt.X("intensity:Q", scale=alt.Scale(type="log", nice=False), title="FLOPs per byte")
    y = alt.Y("tflop_per_s:Q", scale=alt.Scale(type="log", nice=False), title="TFLOP/s at the floor")
    roof = alt.Chart(pd.DataFrame(roofs)).mark_line(color="#000000", strokeDash=[4, 2]).encode(x=x, y=y)
    dots = alt.Chart(points).mark_point(filled=True, size=60).encode(
        x=x, y=y, color=alt.Color("part:N", title="stage", scale=STAGE_COLOURS, legend=alt.Legend(
            values=[part for part in STAGE_COLOURS.domain if part in set(points["part"])])),
        shape=alt.Shape("case:N", title="case"), tooltip=["stage", "case", "T", "intensity", "tflop_per_s", "bound"])
    panels = [alt.layer(roof.transform_filter(alt.datum.device_model == model),
                        dots.transform_filter(alt.datum.device_model == model)).properties(
                  width=260, height=220, title=model)
              for model in gpu_model.DEVICES]
    return alt.hconcat(*panels).properties(
        title=f"{preset}: stages on the roofline at T = {', '.join(map(str, tokens))}, {PREDICTED}")


def _tokens_span(frame: pd.DataFrame) -> str:
    return f"T = {int(frame['tokens'].min()):,} to {int(frame['tokens'].max()):,}"


def layer_floor_figure(frame: pd.DataFrame, preset: str = "mixtral"):
    """``layer_floor_chart`` as a numbered figure with its caption and alt text."""
    chart = layer_floor_chart(frame, preset)
    if frame.empty:
        return charts.figure(chart, f"No floors to draw ({PREDICTED}).", "A message: no model records.")
    layer = frame[frame["stage"] == "layer"]
    series = ", ".join(sorted(layer["series"].unique()))
    return charts.figure(chart, (
        f"The layer's time floor at the {preset} shape, {PREDICTED}. Read the gap between the MoE lines and "
        "the dense line of equal active FLOPs (width F for k = 1, 2 F for k = 2): at small T the MoE reads "
        "more expert weights than the dense MLP's one matrix pair; at large T both are compute-bound."),
        f"Two log-log line charts, A100 SXM and H100 SXM: the predicted floor per layer in microseconds "
        f"against tokens T ({_tokens_span(layer)}), one line each for {series}; the floor rises with T "
        f"from {layer['floor_us'].min():.3g} to {layer['floor_us'].max():,.0f} µs.")


def stage_floor_figure(frame: pd.DataFrame, preset: str = "mixtral"):
    """``stage_floor_chart`` as a numbered figure with its caption and alt text."""
    chart = stage_floor_chart(frame, preset)
    if frame.empty:
        return charts.figure(chart, f"No floors to draw ({PREDICTED}).", "A message: no model records.")
    return charts.figure(chart, (
        f"Each stage's time floor at the {preset} shape, uniform routing, {PREDICTED}. Read which stage sets "
        "the layer's floor: GEMM 1 and GEMM 2 lie above every other stage at every T; the router, "
        f"dispatch, permute and combine grow with T but stay far below them.{_hidden_lines(frame)}"),
        "A grid of log-log line charts, rows A100 SXM and H100 SXM, columns k = 1, k = 2 and the dense MLP "
        f"of width {int(frame['d_ff'].min()):,}: the predicted floor in microseconds of each stage (router, "
        f"dispatch, permute, GEMM 1, GEMM 2, combine; the dense MLP's GEMMs and activation) against tokens T "
        f"({_tokens_span(frame)}).")


def _hidden_lines(frame: pd.DataFrame) -> str:
    """A sentence naming stages whose floors are within 5% of each other at every T and
    case (one line hides the other in the per-stage chart), or ""."""
    moe = frame[(frame["k"] > 0) & (frame["routing"] != "study") & (frame["stage"] != "layer")]
    wide = moe.pivot_table(index=["device_model", "k", "tokens"], columns="stage", values="floor_us")
    pairs = [(a, b) for i, a in enumerate(wide.columns) for b in wide.columns[i + 1:]
             if ((wide[a] - wide[b]).abs() <= 0.05 * wide[[a, b]].min(axis=1)).all()]
    return "".join(f" {STAGE_PARTS[a].capitalize()} and {STAGE_PARTS[b]} have nearly the same floor at every T, "
                   "so one line hides the other." for a, b in pairs)


def roofline_figure(frame: pd.DataFrame, preset: str = "mixtral", tokens=ROOFLINE_TOKENS):
    """``roofline_chart`` as a numbered figure with its caption and alt text."""
    chart = roofline_chart(frame, preset, tokens)
    if frame.empty:
        return charts.figure(chart, f"No floors to draw ({PREDICTED}).", "A message: no model records.")
    shown = ", ".join(map(str, tokens))
    return charts.figure(chart, (
        f"The stages on each device's roofline at the {preset} shape, T = {shown}, {PREDICTED}. A point on the "
        "sloped part of the dashed roof is memory-bound, one on the flat part compute-bound; stages that do "
        "no FLOPs are not drawn."),
        "Two log-log scatter charts, A100 SXM and H100 SXM, each under a dashed roofline (the HBM "
        "bandwidth's slope up to the dense FP16 tensor peak): FLOPs per byte against TFLOP/s at the "
        f"floor for the router, the expert GEMMs and the dense MLP's GEMMs at T = {shown}, "
        "shaped by case (k = 1, k = 2, dense).")


def sanity_frame(prediction: Prediction) -> pd.DataFrame:
    """The published H100 times beside the model's floor at their shapes."""
    rows = [{"T": r["tokens"], "published (µs)": 1e6 * r["published_s"], "floor (µs)": 1e6 * r["floor_s"],
             "published / floor": r["published_over_floor"],
             "floor below published": "yes" if r["floor_below_published"] else "NO: the model is wrong"}
            for r in sorted(prediction.sanity, key=lambda r: r["tokens"])]
    return pd.DataFrame(rows)


def sanity_sentence(prediction: Prediction) -> str:
    """The check in one sentence, with every ratio."""
    if not prediction.sanity:
        return "The model's records hold no sanity check yet."
    rows = sorted(prediction.sanity, key=lambda r: r["tokens"])
    ratios = ", ".join(f"{r['published_over_floor']:.2f} at T = {r['tokens']}" for r in rows)
    below = all(r["floor_below_published"] for r in rows)
    verdict = ("so the floor is below every published time, as a floor must be" if below else
               "so the floor is above a published time somewhere: the model is wrong there")
    return f"The published times over the model's floor are {ratios}, {verdict}."


def effects_frame(prediction: Prediction) -> pd.DataFrame:
    """Item 5: how much each inefficiency the emulator counted moves its stage's
    floor (and the layer's), the largest over T, shapes and k, per device."""
    excess = gpu_model.sector_excess(prediction.traffic)
    rows = gpu_model.effects(excess, gpu_model.reread_factor(prediction.traffic),
                             gpu_model.v2_bank_conflict_excess())
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["at"] = [("all shapes" if preset == "any" else f"{preset}, k = {int(k)}, T = {int(t)}")
                   for preset, k, t in zip(frame["preset"], frame["k"], frame["tokens"])]
    rows = []
    for (name, device), group in frame.groupby(["inefficiency", "device_model"], sort=False):
        stage = group.loc[group["stage_change"].idxmax()]
        layer = group.dropna(subset=["layer_change"])
        layer = layer.loc[layer["layer_change"].idxmax()] if not layer.empty else None
        rows.append({"inefficiency": name, "device": device.removesuffix(" SXM"), "stage": _stage_words(stage["stage"]),
                     "stage slower by, at most (%)": 100 * stage["stage_change"], "where (stage)": stage["at"],
                     "layer slower by, at most (%)": None if layer is None else 100 * layer["layer_change"],
                     "where (layer)": "–" if layer is None else layer["at"]})
    return pd.DataFrame(rows)


def effects_table(prediction: Prediction) -> pd.DataFrame:
    """``effects_frame`` as the page shows it: the stage's and the layer's change and
    one column saying where each is largest (once when both are at the same place)."""
    frame = effects_frame(prediction)
    if frame.empty:
        return frame
    where = [stage if stage == layer or layer == "–" else f"stage: {stage}; layer: {layer}"
             for stage, layer in zip(frame["where (stage)"], frame["where (layer)"])]
    return frame.assign(**{"where": where})[["inefficiency", "device", "stage slower by, at most (%)",
                                             "layer slower by, at most (%)", "where"]]


def _stage_words(stages: str) -> str:
    """"expert_gemm1, expert_gemm2" as the reader's "GEMM 1, GEMM 2"."""
    return ", ".join(STAGE_PARTS.get(stage.strip(), stage.strip()) for stage in stages.split(","))


def layer_change_numbers(frame: pd.DataFrame, device_model: str = "H100 SXM") -> dict:
    """The layer's floor for k = 1, k = 2 and the dense MLP at equal active FLOPs
    with k = 1 (width F) at decode (T = 1) and at T = 8192 (uniform routing),
    k = 2 over k = 1, and the expert GEMMs' touched experts and FLOPs behind it."""
    if frame.empty:
        return {}
    rows = frame[(frame["device_model"] == device_model) & (frame["routing"] != "study")]
    width = rows.loc[rows["k"] > 0, "d_ff"].iloc[0]
    out = {}
    for T in (1, 8192):
        at = rows[rows["tokens"] == T]
        layer = at[at["stage"] == "layer"].set_index("series")
        gemm = at[at["stage"] == "expert_gemm1"].set_index("k")
        k1, k2 = layer.loc["MoE k = 1"], layer.loc["MoE k = 2"]
        out[T] = {"k1_us": float(k1["floor_us"]), "k2_us": float(k2["floor_us"]),
                  "ratio": float(k2["floor_us"] / k1["floor_us"]),
                  "dense_us": float(layer.loc[f"dense, width {width}", "floor_us"]),
                  "k1_bound": k1["bound"], "k2_bound": k2["bound"],
                  "k1_touched": float(gemm.loc[1, "touched_experts"]),
                  "k2_touched": float(gemm.loc[2, "touched_experts"]),
                  "flops_ratio": float(k2["flops"] / k1["flops"])}
    return out


def _why(numbers: dict) -> str:
    if numbers["k2_bound"] == "memory":
        return (f"memory-bound: the weights of {numbers['k2_touched']:.2f} experts are read instead of "
                f"{numbers['k1_touched']:.2f}")
    if numbers["k2_bound"] == "compute":
        return f"compute-bound: {numbers['flops_ratio']:.2f} times the FLOPs"
    return "launch-bound"


def k_change_sentence(frame: pd.DataFrame, preset: str = "mixtral", device_model: str = "H100 SXM") -> str:
    """k = 1 -> 2 in the model's words: the layer's floor at decode and at T = 8192."""
    numbers = layer_change_numbers(frame, device_model)
    if not numbers:
        return "The model's records hold no floors yet."
    one, big = numbers[1], numbers[8192]
    return (f"On the {device_model} ({preset} shape, float16, uniform routing), {PREDICTED}: going from k = 1 "
            f"to k = 2 takes the layer's floor from {one['k1_us']:.0f} µs to {one['k2_us']:.0f} µs at T = 1 "
            f"(×{one['ratio']:.2f}, {_why(one)}) and from {big['k1_us']:.0f} µs to {big['k2_us']:.0f} µs at "
            f"T = 8192 (×{big['ratio']:.2f}, {_why(big)}).")


# ---------------------------------------------------------------- prediction beside measurement


#: Variants of the model's GPUs whose bandwidth or clocks differ from the SXM datasheets it uses.
OTHER_VARIANTS = ("PCIE", "NVL")


def _device_model(name: Optional[str]) -> Optional[str]:
    """The model's device for a measured GPU's name (None when the model has none:
    another GPU such as an H200, or a PCIe or NVL variant of the A100 or H100)."""
    text = (name or "").upper()
    if any(variant in text for variant in OTHER_VARIANTS):
        return None
    for model in gpu_model.DEVICES:
        if model.split()[0] in text:
            return model
    return None


#: What the prediction columns hold for a GPU the model does not know.
NO_MODEL = "no model for this GPU"


#: Where each measured row comes from.
SWEEP_TIME = "sweep: median of timed calls"
NCU_TIME = "Nsight Compute (device check): one replay, caches flushed"
#: The stage of each prediction a device-check kernel belongs to (utilisation.kernel_stage's
#: names; the tile-starts helper launches with GEMM 1, as the model counts it).
NCU_STAGES = {"router": "router", "dispatch": "dispatch", "permute": "permute", "expert_mlp": "expert_gemm1",
              "expert_gemm1": "expert_gemm1", "expert_gemm2": "expert_gemm2", "combine": "combine"}


def _uniform_floors(prediction: Prediction) -> dict:
    """{(device model, preset, k, T, stage): the floor record} of the MoE layer under uniform routing."""
    floors = {}
    for record in prediction.floors:
        params = record["params"]
        if params["routing"] == "uniform" and record["k"]:
            floors[(record["device_model"], params["preset"], record["k"], record["tokens"], record["stage"])] = record
    return floors


def _predicted_shape(floors: dict, params: dict, stages) -> bool:
    """Whether the model predicts (preset, k, T) and ``stages`` on some device."""
    return any(key[1:4] == (params.get("preset"), params.get("top_k"), params.get("tokens")) and key[4] in stages
               for key in floors)


def measured_beside_predicted(prediction: Prediction, data: ChapterData) -> pd.DataFrame:
    """Each measured MoE stage time beside the model's floor for the same
    device, shape, k, T and stage; empty where nothing measured matches a
    prediction. A GPU the model does not know (an H200, a PCIe card) keeps its
    rows at the shapes the model predicts, with the prediction columns empty.
    Two sources: the sweep's median times (uniform routing, float16, eager
    launches) and the device check's Nsight Compute kernels
    (``ncu_beside_predicted``), which also give DRAM and SM throughput beside the
    share of each peak the floor would use."""
    floors = _uniform_floors(prediction)
    rows = []
    for record in data.records:
        params = record.get("params") or {}
        if (record.get("measurement") != "time" or record.get("implementation") != "moe"
                or record.get("launch", "eager") != "eager" or params.get("skew", "uniform") != "uniform"
                or params.get("dtype") != gpu_model.DTYPE or record.get("stage") not in MEASURED_STAGES):
            continue
        model = _device_model(record.get("device"))
        keys = [(model, params.get("preset"), params.get("top_k"), params.get("tokens"), stage)
                for stage in MEASURED_STAGES[record["stage"]]]
        if model is None:  # another GPU: its time, at a shape the model predicts, with no floor beside it
            if not _predicted_shape(floors, params, MEASURED_STAGES[record["stage"]]):
                continue
            floor = None
        elif not all(key in floors for key in keys):
            continue
        else:
            floor = sum(floors[key]["floor_s"] for key in keys)
        rows.append({"device": record.get("device"), "measured by": SWEEP_TIME, "preset": params["preset"],
                     "k": params["top_k"], "T": params["tokens"], "stage": record["stage"],
                     "predicted floor (µs)": None if floor is None else 1e6 * floor,
                     "measured (µs)": 1e6 * record["median_s"],
                     "measured / predicted": None if floor is None else record["median_s"] / floor})
    frame = pd.DataFrame(rows + ncu_beside_predicted(prediction).to_dict("records"))
    return frame


def ncu_beside_predicted(prediction: Prediction) -> pd.DataFrame:
    """The device check's Nsight Compute kernels, summed per stage (durations
    add; percentages are weighted by duration), beside the model's floor for the
    same device, shape, k, T and stage: the time, and the share of the DRAM and
    compute peaks the floor would use beside the DRAM and SM throughput ncu
    measured (% of peak). Empty where no measured kernel matches a prediction."""
    floors = _uniform_floors(prediction)
    stages: dict = {}
    for record in prediction.measured:
        params = record.get("params") or {}
        stage = NCU_STAGES.get(record.get("stage"))
        model = _device_model(record.get("device"))
        if stage is None or record.get("duration_s") is None or params.get("dtype") != gpu_model.DTYPE:
            continue
        key = (model, params.get("preset"), params.get("top_k"), params.get("tokens"), stage)
        if model is None:  # another GPU: shown without a prediction, at a shape the model predicts
            if not _predicted_shape(floors, params, (stage,)):
                continue
            key = (record.get("device"), *key[1:])
        elif key not in floors:
            continue
        stages.setdefault(key, {"device": record.get("device"), "kernels": []})["kernels"].append(record)
    rows = []
    for key, found in stages.items():
        model, preset, k, T, stage = key
        kernels = found["kernels"]
        seconds = sum(r["duration_s"] for r in kernels)

        def weighted(field):
            values = [(r[field], r["duration_s"]) for r in kernels if r.get(field) is not None]
            weight = sum(w for _, w in values)
            return sum(v * w for v, w in values) / weight if weight > 0 else None

        floor = floors.get(key)  # None: a GPU the model does not know
        rows.append({"device": found["device"], "measured by": NCU_TIME, "preset": preset, "k": k, "T": T,
                     "stage": stage,
                     "predicted floor (µs)": None if floor is None else 1e6 * floor["floor_s"],
                     "measured (µs)": 1e6 * seconds,
                     "measured / predicted": None if floor is None else seconds / floor["floor_s"],
                     "predicted DRAM use (%)": (None if floor is None
                                                else 100 * floor["predicted_utilisation"]["memory"]),
                     "DRAM throughput (%)": weighted("dram_throughput_pct"),
                     "predicted compute use (%)": (None if floor is None
                                                   else 100 * floor["predicted_utilisation"]["compute"]),
                     "SM throughput (%)": weighted("sm_throughput_pct"),
                     "achieved occupancy (%)": weighted("achieved_occupancy_pct")})
    order = {stage: i for i, stage in enumerate(gpu_model.MOE_STAGES)}
    rows.sort(key=lambda row: (row["device"], row["k"], order.get(row["stage"], len(order))))
    return pd.DataFrame(rows)


def beside_views(frame: pd.DataFrame) -> tuple:
    """``measured_beside_predicted`` as two tables that fit the page: the times
    (device, source, shape, stage, floor, measured, ratio) and, for the Nsight
    Compute rows, the throughputs beside the shares of each peak the floor would
    use. Prediction columns of a GPU the model does not know say so."""
    if frame.empty:
        return frame, frame
    frame = frame.copy()
    unknown = frame["device"].map(_device_model).isna()
    frame["stage"] = frame["stage"].map(lambda stage: STAGE_PARTS.get(stage, stage.replace("_", " ")))
    times = frame[["device", "measured by", "preset", "k", "T", "stage", "predicted floor (µs)", "measured (µs)",
                   "measured / predicted"]].astype({"predicted floor (µs)": object, "measured / predicted": object})
    times.loc[unknown, ["predicted floor (µs)", "measured / predicted"]] = NO_MODEL
    throughput_columns = ["predicted DRAM use (%)", "DRAM throughput (%)", "predicted compute use (%)",
                          "SM throughput (%)", "achieved occupancy (%)"]
    if not set(throughput_columns) <= set(frame.columns):
        return times, pd.DataFrame()
    ncu = frame[frame["measured by"] == NCU_TIME]
    throughputs = ncu[["device", "k", "stage", *throughput_columns]].astype(
        {"predicted DRAM use (%)": object, "predicted compute use (%)": object})
    throughputs.loc[unknown[ncu.index], ["predicted DRAM use (%)", "predicted compute use (%)"]] = NO_MODEL
    return times, throughputs


def occupancy_beside_achieved(prediction: Prediction, data: ChapterData) -> pd.DataFrame:
    """Nsight Compute's achieved occupancy per kernel beside the theoretical one
    for the measured GPU's architecture: from the sweep's Nsight Compute block
    and from the device check's (``prediction.measured``); where the device
    check's are present a column says which run and shape each row is from."""
    theoretical = {(r["kernel"], r["arch"]): r for r in prediction.occupancy}
    rows = []
    sources = [(record, "sweep") for record in data.records] + [(r, "device check") for r in prediction.measured]
    for record, source in sources:
        if record.get("measurement") != "ncu" or record.get("achieved_occupancy_pct") is None:
            continue
        capability = str(record.get("compute_capability") or "").replace(".", "")
        predicted = theoretical.get((record.get("kernel"), int(capability))) if capability.isdigit() else None
        if predicted is None:
            continue
        params = record.get("params") or {}
        rows.append({"k": params.get("top_k"), "kernel": record["kernel"],
                     "arch": f"sm_{predicted['arch']}",
                     "theoretical occupancy (%)": 100 * predicted["occupancy"], "limiter": predicted["limiter"],
                     "achieved occupancy (%)": record["achieved_occupancy_pct"],
                     "measured at": f"{source}: {params.get('preset')}, T = {params.get('tokens')}"})
    frame = pd.DataFrame(rows)
    if not prediction.measured and not frame.empty:  # one source: the shape is the sweep's, said in the text
        frame = frame.drop(columns="measured at")
    return frame
