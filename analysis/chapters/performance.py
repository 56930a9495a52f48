"""Data, tables and charts of the chapters "Performance on the GPU" and "The CPU baseline".

Both chapters show ``sweep`` records (``analysis.measure.sweep``). Where they come
from is decided in one place, ``chapter_data``: measured live while the chapter
runs, or the newest committed records of the device kind, or nothing (a GPU
chapter on a machine without a GPU before any GPU run was committed). Every
chapter shows ``ChapterData.note``, which names the source, device, date and
commit. The CPU chapter also shows the newest committed ``bench-cpu`` run
(``analysis.measure.bench_cpu``, ``make bench-cpu``) through ``bench_cpu_view``, read
by the same functions (``newest_folder``, ``newest_run``) and with the same
kind of note. Timing records marked ``valid: false`` (a peer whose output
differed from the layer's) are in no table or chart (``sweep.valid_timing``).

The functions below turn records into pandas frames and Altair charts (drawn
offline by ``analysis.charts.show``); each returns an empty frame or a chart
that says what is missing when its records are absent, so a chapter always
runs to the end.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Optional

import altair as alt
import numpy
import pandas as pd

from analysis.measure import sweep, sweep_plan
from analysis import charts, display
from analysis import records as record_io

KIND = sweep.RECORD_KIND
STAGE_ORDER = ["router", "dispatch", "permute", "expert_mlp", "combine"]
#: How a stage is named on a page (records keep the code's names).
STAGE_LABELS = {"router": "router", "dispatch": "dispatch", "permute": "permute", "expert_mlp": "expert MLPs",
                "combine": "combine", "end_to_end": "whole layer"}
#: One panel per k, headed "k = 1", "k = 2".
K_COLUMN = alt.Column("top_k:O", title=None, header=alt.Header(labelExpr="'k = ' + datum.value"))
#: Okabe-Ito colours, one per stage, colour-blind safe.
STAGE_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7"]
NO_GPU_RECORDS = "no GPU records yet: this chapter shows no GPU numbers"


@dataclasses.dataclass
class ChapterData:
    """The records a chapter shows and where they came from."""

    records: list
    source: str  # "live", "records" or "none"
    note: str
    device: Optional[str] = None
    run_id: Optional[str] = None

    @property
    def plain_note(self) -> str:
        """The note for a box that is already titled as one: without its leading "Note: "."""
        head, found, rest = self.note.partition("Note: ")
        return head + rest[:1].upper() + rest[1:] if found else self.note

    @property
    def empty(self) -> bool:
        return not any(record.get("measurement") == "time" for record in self.records)


# ---------------------------------------------------------------- where the numbers come from


def chapter_data(device_kind: str, *, source: str = "auto", plan: Optional[str] = None,
                 results_dir=None, overrides: Optional[dict] = None) -> ChapterData:
    """The one place a chapter's numbers come from.

    ``source``: "live" runs the sweep now (``plan``, default ``gpu-default``
    or ``cpu-tiny``, with ``overrides`` such as ``{"tokens": [1, 16]}``) and
    writes its records to a temporary folder, so they carry the same
    provenance as committed ones; "records" reads the newest committed run of
    ``device_kind`` ("gpu" or "cpu") under ``results_dir``; "auto" is "live"
    for a GPU chapter where a GPU is present, "records" otherwise, and for a
    CPU chapter "records" where any exist, "live" otherwise.
    """
    if device_kind not in ("gpu", "cpu"):
        raise ValueError(f"device_kind: expected 'gpu' or 'cpu', got {device_kind!r}")
    if source not in ("auto", "live", "records"):
        raise ValueError(f"source: expected 'auto', 'live' or 'records', got {source!r}")
    if source == "auto":
        if device_kind == "gpu":
            source = "live" if _gpu_present() else "records"
        else:
            source = "records" if newest_folder(device_kind, results_dir) else "live"
    if source == "live":
        return _live(device_kind, plan, overrides or {})
    folder = newest_folder(device_kind, results_dir)
    if folder is None:
        what = NO_GPU_RECORDS if device_kind == "gpu" else "no CPU records yet: this chapter shows no CPU numbers"
        root = record_io.results_root(results_dir)
        shown = root.relative_to(record_io.REPO_ROOT) if root.is_relative_to(record_io.REPO_ROOT) else root
        return ChapterData([], "none", f"Note: {what} (none under {shown.as_posix()}/).")
    run = newest_run(record_io.read_records(KIND, results_dir=results_dir, device=folder))
    first = run[0]
    where = "GPU" if device_kind == "gpu" else "CPU"
    note = (f"Note: these are the newest committed {where} records, not measured while this chapter ran: "
            f"{provenance_text(first, folder, KIND)}.")
    if device_kind == "gpu":
        note = "No GPU here. " + note
    return ChapterData(run, "records", note, first.get("device"), first.get("run_id"))


def _gpu_present() -> bool:
    from topk_moe.backends import cuda_unavailable_reason  # noqa: PLC0415 - imports CuPy where present

    return cuda_unavailable_reason() is None


def _live(device_kind: str, plan_name: Optional[str], overrides: dict) -> ChapterData:
    plan_name = plan_name or ("gpu-default" if device_kind == "gpu" else "cpu-tiny")
    plan = sweep_plan.with_overrides(sweep_plan.PLANS[plan_name], **overrides)
    if (plan.device == "cuda") != (device_kind == "gpu"):
        raise ValueError(f"plan: {plan_name!r} runs on {plan.device}, not on a {device_kind}")
    folder = tempfile.mkdtemp(prefix="moe-live-")
    result = sweep.run_sweep(plan, progress=False, results_dir=folder, echo=lambda message: None)
    first = result.records[0]
    note = (f"Note: measured live while this chapter ran (plan {plan.name}): {first.get('device')}, "
            f"{_date(first)}, {_commit(first)}.")
    return ChapterData(result.records, "live", note, first.get("device"), result.run_id)


def provenance_text(record: dict, folder: str, kind: str) -> str:
    """Device, date, commit and file of a committed run, for a note."""
    run = f"run {record['run_id']}, " if record.get("run_id") else ""
    return (f"{record.get('device')}, measured {_date(record)}, {_commit(record)} "
            f"({run}results/{folder}/{kind}.jsonl)")


def _date(record: dict) -> str:
    utc = str(record.get("utc", ""))
    return utc[:10] + " " + utc[11:16] + " UTC" if len(utc) >= 16 else (utc or "an unknown date")


def _commit(record: dict) -> str:
    commit = record.get("git_commit")
    if not commit:
        return "commit unknown"
    dirty = {True: ", with uncommitted changes", False: "", None: ""}[record.get("git_dirty")]
    return f"commit {commit[:10]}{dirty}"


def newest_folder(device_kind: str, results_dir=None, kind: str = KIND) -> Optional[str]:
    """The device folder (``cpu-*`` for CPUs, else GPUs) holding the newest
    record of ``kind`` (default ``sweep``) of that device kind, or None."""
    root = record_io.results_root(results_dir)
    newest, newest_utc = None, ""
    for path in sorted(root.glob(f"*/{kind}.jsonl")):
        folder = path.parent.name
        if folder.startswith("cpu-") != (device_kind == "cpu"):
            continue
        found = record_io.read_records(kind, results_dir=root, device=folder)
        utc = max((record.get("utc", "") for record in found), default="")
        if found and utc > newest_utc:
            newest, newest_utc = folder, utc
    return newest


def _run_key(record: dict):
    """What makes a run: its ``run_id`` (the sweep writes a run in several
    batches), else its ``utc`` (one ``write_records`` call, as ``bench_cpu`` makes)."""
    return record.get("run_id") or record.get("utc")


def newest_run(found: list) -> list:
    """The records of the run whose records are newest (``_run_key``)."""
    latest: dict = {}
    for record in found:
        key = _run_key(record)
        latest[key] = max(latest.get(key, ""), record.get("utc", ""))
    newest = max(latest, key=lambda key: latest[key])
    return [record for record in found if _run_key(record) == newest]


# ---------------------------------------------------------------- the bench-cpu run


# ---------------------------------------------------------------- frames


def timing_frame(data: ChapterData) -> pd.DataFrame:
    """One line per timing record, flattened, with a series ``label``."""
    lines = []
    for record in data.records:
        if not sweep.valid_timing(record):
            continue
        params = record["params"]
        lines.append({
            "preset": params["preset"], "dtype": params["dtype"], "skew": params.get("skew", "uniform"),
            "tokens": params["tokens"], "top_k": params.get("top_k"), "width": params.get("width"),
            "compared_as": ", ".join(params.get("compared_as", [])), "compute_dtype": params.get("compute_dtype"),
            "implementation": record["implementation"], "stage": record["stage"],
            "launch": record.get("launch", "eager"),
            **{key: record.get(key) for key in ("median_s", "p20_s", "p80_s", "roofline_s", "fraction_of_roofline",
                                                "achieved_flop_per_s", "achieved_bytes_per_s", "bound",
                                                "load_max_over_mean", "experts_used", "relative_error_vs_moe")},
        })
    frame = pd.DataFrame(lines)
    if frame.empty:
        return frame
    frame["label"] = [_label(line) for line in frame.itertuples()]
    return frame


def _label(line) -> str:
    if line.implementation == "moe":
        return "MoE (graph replay)" if line.launch == "graph" else "MoE (kernels)"
    if line.implementation == "dense":
        return "dense, equal parameters (E·F)" if "equal-params" in line.compared_as and "active" not in \
            line.compared_as else "dense, equal active FLOPs (K·F)"
    if line.implementation == "hf-eager":
        return "HF eager loop"
    if line.implementation == "torch-grouped-mm":
        return f"torch._grouped_mm ({line.compute_dtype})"
    if line.implementation == "gemm-same-flops":
        return "GEMMs alone, same FLOPs"
    return line.implementation


def main_shape(data: ChapterData) -> tuple:
    """(preset, dtype) with the most token counts measured: the chapter's main layer."""
    frame = timing_frame(data)
    if frame.empty:
        return None, None
    counts = frame[frame["skew"] == "uniform"].groupby(["preset", "dtype"])["tokens"].nunique()
    preset, dtype = counts.idxmax()
    return preset, dtype


def layer_curves(data: ChapterData, preset: str, dtype: str) -> pd.DataFrame:
    """Whole-layer times against T, one series per (k, implementation): the MoE,
    its peers, and the dense baselines that belong to each k."""
    frame = timing_frame(data)
    if frame.empty:
        return frame
    frame = frame[(frame["preset"] == preset) & (frame["dtype"] == dtype) & (frame["skew"] == "uniform")
                  & (frame["stage"] == "end_to_end") & (frame["implementation"] != "gemm-same-flops")]
    parts = []
    for k in sorted(frame["top_k"].dropna().unique()):
        k = int(k)
        mine = frame[frame["top_k"] == k]
        widths = frame[frame["implementation"] == "dense"]
        F = _d_ff(data, preset)
        E = _n_experts(data, preset)
        dense = widths[(widths["width"] == k * F) | (widths["width"] == E * F)].copy()
        dense["label"] = numpy.where(dense["width"] == k * F, "dense, equal active FLOPs (K·F)",
                                     "dense, equal parameters (E·F)")
        parts.append(pd.concat([mine, dense]).assign(top_k=k))
    return pd.concat(parts, ignore_index=True) if parts else frame


def _shape_value(data: ChapterData, preset: str, key: str):
    for record in data.records:
        if record.get("measurement") == "time" and record["params"]["preset"] == preset:
            return record["params"][key]
    return None


def _d_ff(data: ChapterData, preset: str):
    return _shape_value(data, preset, "d_ff")


def _n_experts(data: ChapterData, preset: str):
    return _shape_value(data, preset, "n_experts")


def crossovers(curves: pd.DataFrame, intervals: Optional[dict] = None) -> pd.DataFrame:
    """Where the MoE (eager) stops or starts beating each dense baseline, per k:
    the T at which time(MoE) / time(dense) crosses 1, interpolated on log T
    between the two measured T around it. None where it never crosses.

    ``intervals``: {(k, baseline, T): [low, high]}, the 95% interval of the
    ratio where the run measured one (the bench's rounds). A ratio whose
    interval holds 1 is neither faster nor slower (``moe_within_noise_at``),
    and a crossing is only placed between two T on either side of 1 beyond the noise."""
    rows = []
    columns = ["top_k", "baseline", "crossover_tokens", "moe_faster_at", "moe_within_noise_at"]
    if curves.empty:
        return pd.DataFrame(columns=columns)
    intervals = intervals or {}
    for k, mine in curves.groupby("top_k"):
        moe = mine[mine["label"] == "MoE (kernels)"].set_index("tokens")["median_s"]
        for baseline in ("dense, equal active FLOPs (K·F)", "dense, equal parameters (E·F)"):
            dense = mine[mine["label"] == baseline].set_index("tokens")["median_s"]
            common = sorted(set(moe.index) & set(dense.index))
            if not common:
                continue
            ratio = numpy.array([moe[T] / dense[T] for T in common])
            noise = [T for T in common if (k, baseline, T) in intervals
                     and intervals[k, baseline, T][0] <= 1 <= intervals[k, baseline, T][1]]
            crossing = None
            for i in range(len(common) - 1):
                clear = common[i] not in noise and common[i + 1] not in noise
                if clear and (ratio[i] - 1) * (ratio[i + 1] - 1) < 0:
                    a, b = math.log(common[i]), math.log(common[i + 1])
                    fa, fb = math.log(ratio[i]), math.log(ratio[i + 1])
                    crossing = float(math.exp(a + (b - a) * (0 - fa) / (fb - fa)))
                    break
            faster = [T for T, r in zip(common, ratio) if r < 1 and T not in noise]
            rows.append({"top_k": int(k), "baseline": baseline, "crossover_tokens": crossing,
                         "moe_faster_at": _describe_tokens(faster, common),
                         "moe_within_noise_at": "T = " + ", ".join(str(T) for T in noise) if noise else None})
    return pd.DataFrame(rows, columns=columns)


def _describe_tokens(faster: list, measured: list) -> str:
    if not faster:
        return "no measured T"
    if len(faster) == len(measured):
        return "every measured T"
    return "T = " + ", ".join(str(T) for T in faster)


def stage_frame(data: ChapterData, preset: str, dtype: str) -> pd.DataFrame:
    """Per-stage times and % of roofline, uniform routing."""
    frame = timing_frame(data)
    if frame.empty:
        return frame
    return frame[(frame["preset"] == preset) & (frame["dtype"] == dtype) & (frame["skew"] == "uniform")
                 & (frame["implementation"] == "moe") & (frame["launch"] == "eager")].copy()


def ceilings_table(data: ChapterData) -> pd.DataFrame:
    rows = []
    for record in data.records:
        if record.get("measurement") != "ceiling":
            continue
        if record["implementation"] == "copy":
            rows.append({"ceiling": "copy bandwidth (read + written)", "value": record["bytes_per_s"] / 1e9,
                         "unit": "GB/s", "size": bytes_text(record["params"].get("nbytes"))})
        else:
            rows.append({"ceiling": f"GEMM rate, {record['params']['dtype']} ({record['params'].get('library')})",
                         "value": record["flop_per_s"] / 1e12, "unit": "TFLOP/s",
                         "size": gemm_shape_text(record["params"].get("n"))})
    return pd.DataFrame(rows, columns=["ceiling", "value", "unit", "size"])


#: What the prose says where a ceiling's record does not give its size (records from before it did).
SIZE_NOT_RECORDED = "a size its record does not give"


def bytes_text(nbytes: Optional[int]) -> str:
    """A byte count as the prose writes it: "1 GiB", "256 MiB", "1000 bytes"."""
    if nbytes is None:
        return SIZE_NOT_RECORDED
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} bytes"


def gemm_shape_text(n: Optional[int]) -> str:
    """An n x n x n matrix product's shape as the prose writes it."""
    return SIZE_NOT_RECORDED if n is None else f"{n} × {n} × {n}"


def ceiling_numbers(data: ChapterData) -> dict:
    """Copy GB/s and the largest GEMM TFLOP/s (None when absent), and the sizes
    they were measured at as text ("not measured" when absent), for the prose."""
    copy = [r for r in data.records if r.get("measurement") == "ceiling" and r["implementation"] == "copy"]
    gemm = [r for r in data.records if r.get("measurement") == "ceiling" and r["implementation"] == "gemm"]
    shapes = list(dict.fromkeys(gemm_shape_text(r["params"].get("n")) for r in gemm))
    return {"copy_gb_per_s": round(copy[0]["bytes_per_s"] / 1e9, 1) if copy else None,
            "gemm_tflop_per_s": round(max(r["flop_per_s"] for r in gemm) / 1e12, 3) if gemm else None,
            "copy_size": bytes_text(copy[0]["params"].get("nbytes")) if copy else "not measured",
            "gemm_shape": " and ".join(shapes) if shapes else "not measured"}


def summary_frame(data: ChapterData) -> pd.DataFrame:
    """``sweep.summary_table`` as a frame, times in milliseconds."""
    table = pd.DataFrame(sweep.summary_table(data.records))
    if table.empty:
        return table
    for column in [c for c in table.columns if c.endswith("_s")]:
        table[column.removesuffix("_s") + " ms"] = table.pop(column) * 1e3
    table["moe % of roofline"] = 100 * table.pop("moe_fraction_of_roofline").astype(float)
    return table.set_index(["preset", "dtype", "tokens", "top_k"])


def skew_frame(data: ChapterData, preset: str, dtype: str) -> pd.DataFrame:
    """Whole-layer (eager) time per skew at the T where skews were measured,
    relative to uniform routing at the same T and k."""
    frame = timing_frame(data)
    if frame.empty:
        return frame
    frame = frame[(frame["preset"] == preset) & (frame["dtype"] == dtype) & (frame["implementation"] == "moe")
                  & (frame["stage"] == "end_to_end") & (frame["launch"] == "eager")]
    skewed_tokens = set(frame.loc[frame["skew"] != "uniform", "tokens"])
    frame = frame[frame["tokens"].isin(skewed_tokens)].copy()
    if frame.empty:
        return frame
    uniform = frame[frame["skew"] == "uniform"].set_index(["tokens", "top_k"])["median_s"]
    frame["time_vs_uniform"] = [row.median_s / uniform.get((row.tokens, row.top_k), numpy.nan)
                                for row in frame.itertuples()]
    frame["top_k"] = frame["top_k"].astype(int)
    return frame[["skew", "tokens", "top_k", "median_s", "time_vs_uniform", "load_max_over_mean",
                  "experts_used"]].reset_index(drop=True)


def run_problems(data: ChapterData) -> pd.DataFrame:
    """What the run reported as failed or skipped (its summary record)."""
    rows = []
    for record in data.records:
        if record.get("measurement") == "run":
            rows += [{"what": p["what"], "problem": p["error"]} for p in record.get("problems", [])]
            if record.get("skipped"):
                rows.append({"what": f"{len(record['skipped'])} cells", "problem": "skipped: time budget ran out"})
    return pd.DataFrame(rows, columns=["what", "problem"])


# ---------------------------------------------------------------- charts


def message_chart(text: str) -> alt.Chart:
    """A small chart that only says ``text``: shown where data is missing."""
    return alt.Chart(pd.DataFrame({"text": [text]})).mark_text(align="left", fontSize=13).encode(
        text="text:N").properties(width=420, height=40)


def time_vs_tokens_chart(curves: pd.DataFrame, crossings: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """Log-log time against T, one panel per k, p20-p80 as error bars, the
    crossovers against the dense baselines as dashed rules."""
    if curves.empty:
        return message_chart("no timings to draw")
    panels = []
    for k, mine in curves.groupby("top_k"):
        base = alt.Chart(mine).encode(
            # nice=False: log axes end at the data, not at the next powers of ten
            x=alt.X("tokens:Q", scale=alt.Scale(type="log", nice=False), title="tokens T"),
            color=alt.Color("label:N", title=None, legend=alt.Legend(orient="bottom", columns=2)))
        lines = base.mark_line(point=True).encode(
            y=alt.Y("median_s:Q", scale=alt.Scale(type="log", nice=False), title="time per layer (s)"))
        bars = base.mark_rule().encode(y="p20_s:Q", y2="p80_s:Q")
        layers = [lines, bars]
        marks = crossings[(crossings["top_k"] == k) & crossings["crossover_tokens"].notna()] if not crossings.empty \
            else crossings
        if not marks.empty:
            marks = marks.assign(text=[f"crossover vs {b.split(',')[1].split('(')[0].strip()}: T≈{t:.0f}"
                                       for b, t in zip(marks["baseline"], marks["crossover_tokens"])])
            layers.append(alt.Chart(marks).mark_rule(strokeDash=[4, 3], color="black").encode(x="crossover_tokens:Q"))
            layers.append(alt.Chart(marks).mark_text(align="left", dx=3, dy=-4, angle=270, fontSize=10).encode(
                x="crossover_tokens:Q", y=alt.value(5), text="text:N"))
        panels.append(alt.layer(*layers).properties(width=300, height=260, title=f"k = {int(k)}"))
    return alt.hconcat(*panels).properties(title=title).resolve_scale(y="shared")


def stage_share_chart(stages: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """Each stage's share of the summed stage times, per T, one panel per k."""
    stages = stages[stages["stage"].isin(STAGE_ORDER)] if not stages.empty else stages
    if stages.empty:
        return message_chart("no per-stage timings to draw")
    stages = stages.assign(stage_order=stages["stage"].map(STAGE_ORDER.index),
                           stage_name=stages["stage"].map(STAGE_LABELS))
    return alt.Chart(stages).mark_bar().encode(
        x=alt.X("tokens:O", title="tokens T"),
        y=alt.Y("median_s:Q", stack="normalize", title="share of the stages' time"),
        color=alt.Color("stage_name:N", scale=alt.Scale(domain=[STAGE_LABELS[s] for s in STAGE_ORDER],
                                                        range=STAGE_COLOURS), title="stage"),
        order=alt.Order("stage_order:Q"),
        column=K_COLUMN,
    ).properties(width=280, height=220, title=title)


def roofline_chart(stages: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """% of roofline per stage (and the whole layer) against T, one panel per k."""
    if stages.empty:
        return message_chart("no per-stage timings to draw")
    frame = stages.assign(percent=100 * stages["fraction_of_roofline"].astype(float),
                          stage_name=stages["stage"].map(lambda stage: STAGE_LABELS.get(stage, stage)))
    order = [STAGE_LABELS[stage] for stage in STAGE_ORDER + ["end_to_end"]]
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("tokens:Q", scale=alt.Scale(type="log", nice=False), title="tokens T"),
        y=alt.Y("percent:Q", title="% of roofline (roofline time / measured time)"),
        color=alt.Color("stage_name:N", scale=alt.Scale(domain=order, range=STAGE_COLOURS + ["#000000"]),
                        title="stage"),
        column=K_COLUMN,
    ).properties(width=280, height=220, title=title)


def skew_chart(skews: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """Whole-layer time under each skew relative to uniform routing, one bar per
    (T, k) beside the others (bars of several T never stack)."""
    if skews.empty:
        return message_chart("no skew timings to draw")
    frame = skews.assign(case=[f"T = {int(t):,}, k = {int(k)}" for t, k in zip(skews["tokens"], skews["top_k"])])
    cases = list(dict.fromkeys(frame.sort_values(["tokens", "top_k"])["case"]))
    bars = alt.Chart(frame).mark_bar().encode(
        x=alt.X("skew:N", sort=["uniform", "zipf-1.0", "zipf-2.0", "one-hot", "half-empty"], title="routing skew"),
        xOffset=alt.XOffset("case:N", sort=cases),
        y=alt.Y("time_vs_uniform:Q", title="time / time with uniform routing"),
        color=alt.Color("case:N", title=None, sort=cases, scale=charts.palette(cases)))
    rule = alt.Chart(pd.DataFrame({"one": [1.0]})).mark_rule(strokeDash=[4, 3]).encode(y="one:Q")
    return alt.layer(bars, rule).properties(width=360, height=220, title=title)


def as_text(value, unit: str = "", digits: int = 3) -> str:
    """A number for the prose (``digits`` significant), or "not measured"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "not measured"
    return f"{value:.{digits}g}{' ' + unit if unit else ''}"


def crossover_sentence(crossings: pd.DataFrame) -> str:
    """One clause per k and dense baseline: where the MoE is faster, and where the time
    ratio crosses 1 (interpolated on log T between the measured T around it)."""
    if crossings.empty:
        return "No crossover could be computed: the run has no MoE and dense timings at common T."
    parts = []
    for row in crossings.itertuples():
        baseline = row.baseline.split(",")[1].split("(")[0].strip()
        noise = row.moe_within_noise_at if isinstance(row.moe_within_noise_at, str) else None  # None or NaN: none
        if row.moe_faster_at == "every measured T":
            where = "the MoE is faster at every measured T"
        elif row.moe_faster_at == "no measured T":
            where = "the MoE is faster at no measured T" if noise else "the MoE is slower at every measured T"
        else:
            where = f"the MoE is faster at {row.moe_faster_at} only"
        if noise:
            where += f", and within the run's 95% interval of it at {noise}"
        if pd.notna(row.crossover_tokens):
            where += f", first crossing near T ≈ {display.significant(float(row.crossover_tokens), 2)}"
        parts.append(f"k = {row.top_k} against {baseline}: {where}")
    return "; ".join(parts) + "."


def first_value(frame: pd.DataFrame, column: str, default=None):
    """The first non-null value of a column, for glue (``default`` when none)."""
    if frame.empty or column not in frame:
        return default
    values = frame[column].dropna()
    return default if values.empty else values.iloc[0]


def check_sweep_parameters(source: str, plan, results_dir, device: str) -> None:
    """A performance chapter's parameters, one clear sentence each (ValueError):
    where the sweep records come from, a plan of ``device`` ("cpu" or "cuda")
    for a live run, and an existing results folder."""
    if source not in ("auto", "live", "records"):
        raise ValueError(f"source: expected 'auto', 'live' or 'records', got {source!r}")
    plans = sorted(name for name, p in sweep_plan.PLANS.items() if p.device == device)
    label = "GPU" if device == "cuda" else "CPU"
    if plan is not None and plan not in plans:
        raise ValueError(f"plan: expected None or one of the {label} plans {plans}, got {plan!r}")
    if results_dir is not None and not Path(results_dir).is_dir():
        raise ValueError(f"results_dir: expected None or an existing folder, got {results_dir!r}")
