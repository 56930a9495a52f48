"""The Answers chapter (book/notebooks/answers.ipynb): the study's four key questions,
each answered from the committed records through the chapter that owns them.

Nothing here measures or re-derives a number another chapter computes: speed and
time per stage come from ``analysis.chapters.performance`` (the sweep records),
accuracy from ``analysis.chapters.accuracy`` (the evaluation records), routing
from ``analysis.chapters.routing`` (the committed checkpoints), memory from
``analysis.measure.memory`` (the formula) and its ``memory`` records, and the
published figures from ``analysis.chapters.published``. Each answer is a small
dataclass: the numbers the prose glues, one chart, and ``missing``, one line
naming what is not measured and the command that measures it (empty when
nothing is missing).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import altair as alt
import pandas as pd

from analysis import charts
from analysis import records as record_io
from analysis.chapters import accuracy, expert_parallel, gpu_performance, performance, published, routing
from analysis.measure import memory, sweep_plan

#: The command that writes every GPU record the book reads.
GPU_COMMAND = "make device-check PY=python3"
NO_GPU = ("No GPU has run this study yet: results/ holds no GPU records, so there is no GPU answer here. "
          f"`{GPU_COMMAND}` on a GPU machine writes them, and this chapter then shows them.")
#: The balanced arms whose routing the chapter reads (and one without the balancing loss).
ROUTING_ARMS = ("moe-k1", "moe-k2", "moe-k1-nobal")


def validate_parameters(preset: str, routing_bytes: int, experiment_bytes: int = 65536) -> None:
    """The chapter's parameters, one clear sentence each (ValueError)."""
    from analysis.study import train  # noqa: PLC0415 - only for the preset names

    if preset not in train.PRESETS:
        raise ValueError(f"preset: expected one of {sorted(train.PRESETS)}, got {preset!r}")
    for name, value in (("routing_bytes", routing_bytes), ("experiment_bytes", experiment_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 256:
            raise ValueError(f"{name}: expected an integer of at least 256, got {value!r}")


def _relative(path) -> str:
    """A results path as the book shows it: relative to the repository, never the builder's machine."""
    root = record_io.REPO_ROOT
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return f"{path.parent.name}/{path.name}"


def _results_file(results_dir, folder: str, kind: str) -> str:
    return _relative(record_io.results_root(results_dir) / folder / f"{kind}.jsonl")


def _layer_text(data: performance.ChapterData, preset: str, dtype: str) -> str:
    shape = sweep_plan.PRESETS.get(preset)
    tokens = sorted({r["params"]["tokens"] for r in data.records if r.get("measurement") == "time"
                     and r["params"].get("preset") == preset})
    layer = (f"D = {shape.d_model}, F = {shape.d_ff}, E = {shape.n_experts}, {shape.activation}"
             if shape else f"the {preset} preset")
    span = f"T = {tokens[0]} to {tokens[-1]}" if tokens else "no T"
    return f"one layer ({layer}, {dtype}), {span}, on {data.device}"


# ---------------------------------------------------------------- 1. speed


@dataclasses.dataclass
class SpeedAnswer:
    """MoE against dense on one device kind: the time ratio at every T and the crossovers."""

    device_kind: str
    data: performance.ChapterData
    ratios: pd.DataFrame  # top_k, baseline, tokens, ratio (MoE time / dense time)
    crossings: pd.DataFrame
    numbers: dict
    evidence: str


def speed(device_kind: str, results_dir=None) -> Optional[SpeedAnswer]:
    """The speed answer from the newest committed sweep of ``device_kind``, or None without one."""
    data = performance.chapter_data(device_kind, source="records", results_dir=results_dir)
    if data.empty:
        return None
    preset, dtype = performance.main_shape(data)
    curves = performance.layer_curves(data, preset, dtype)
    crossings = performance.crossovers(curves)
    rows = []
    for k, mine in curves.groupby("top_k"):
        moe = mine[mine["label"] == "MoE (kernels)"].set_index("tokens")["median_s"]
        for baseline in ("dense, equal active FLOPs (K·F)", "dense, equal parameters (E·F)"):
            dense = mine[mine["label"] == baseline].set_index("tokens")["median_s"]
            for T in sorted(set(moe.index) & set(dense.index)):
                rows.append({"top_k": int(k), "baseline": baseline, "tokens": int(T), "ratio": moe[T] / dense[T]})
    ratios = pd.DataFrame(rows, columns=["top_k", "baseline", "tokens", "ratio"])
    largest = int(ratios["tokens"].max()) if not ratios.empty else None
    numbers = {"device": data.device, "scale": _layer_text(data, preset, dtype), "largest_T": largest}
    for (k, baseline), group in ratios.groupby(["top_k", "baseline"]):
        short = "active" if "active" in baseline else "params"
        at_largest = group[group["tokens"] == largest]["ratio"]
        numbers[f"k{k}_{short}_ratio_largest"] = float(at_largest.iloc[0]) if len(at_largest) else float("nan")
        numbers[f"k{k}_{short}_ratio_smallest"] = float(group.sort_values("tokens")["ratio"].iloc[0])
    numbers["crossovers"] = performance.crossover_sentence(crossings)
    numbers["switch_throughput"] = published.text("Switch Transformer", "throughput of the top-1 MoE relative to dense")
    folder = performance.newest_folder(device_kind, results_dir)
    evidence = f"{_results_file(results_dir, folder, performance.KIND)} (run {data.run_id})"
    return SpeedAnswer(device_kind, data, ratios, crossings, numbers, evidence)


#: The layer the CPU speed answer reads from a bench-cpu run (the study's activation).
BENCH_ACTIVATION = "swiglu"


def bench_speed(results_dir=None) -> Optional[SpeedAnswer]:
    """The CPU speed answer from the newest committed ``make bench-cpu`` run (the CPU
    chapter's ``cpu_baseline.bench_cpu_view``): MoE over our dense MLP at K·F and E·F
    for every k and T of the swiglu layer, and the PyTorch peers at the largest T;
    None without a run."""
    from analysis.chapters import cpu_baseline  # noqa: PLC0415

    view = cpu_baseline.bench_cpu_view(results_dir)
    rows = [row for row in view.rows if row["activation"] == BENCH_ACTIVATION]
    if not rows:
        return None
    curves, ratios, intervals = [], [], {}
    for row in rows:
        for label, time_key, ratio_key, baseline in (
                ("MoE (kernels)", "moe_s", None, None),
                ("dense, equal active FLOPs (K·F)", "dense_active_s", "moe_over_dense_active",
                 "dense, equal active FLOPs (K·F)"),
                ("dense, equal parameters (E·F)", "dense_params_s", "moe_over_dense_params",
                 "dense, equal parameters (E·F)")):
            curves.append({"top_k": row["top_k"], "tokens": row["tokens"], "label": label, "median_s": row[time_key]})
            if ratio_key:
                ratios.append({"top_k": row["top_k"], "baseline": baseline, "tokens": row["tokens"],
                               "ratio": row[ratio_key]})
                if row.get(f"{ratio_key}_interval") is not None:
                    intervals[row["top_k"], baseline, row["tokens"]] = row[f"{ratio_key}_interval"]
    ratios = pd.DataFrame(ratios)
    crossings = performance.crossovers(pd.DataFrame(curves), intervals)
    largest = int(ratios["tokens"].max())
    first = view.run[0]
    shape = next(r["params"] for r in view.run if r.get("measurement") == "forward-time"
                 and r.get("implementation") == "moe")
    numbers = {"device": first.get("device"), "largest_T": largest,
               "scale": (f"one layer (D = {shape['d_model']}, F = {shape['d_ff']}, E = {shape['n_experts']}, "
                         f"{BENCH_ACTIVATION}, {shape['dtype']}), T = {int(ratios['tokens'].min())} to {largest}, "
                         f"on {first.get('device')} ({first.get('cpu_count')} cores), "
                         f"{cpu_baseline.thread_text(view.run)}. Each ratio is the geometric mean over "
                         f"{rows[0]['rounds']} round(s) of the ratio of two medians timed in the same round")}
    for (k, baseline), group in ratios.groupby(["top_k", "baseline"]):
        short = "active" if "active" in baseline else "params"
        numbers[f"k{k}_{short}_ratio_largest"] = float(group[group["tokens"] == largest]["ratio"].iloc[0])
    for row in rows:
        if row["tokens"] == largest:
            numbers[f"k{row['top_k']}_eager_ratio_largest"] = row.get("moe_over_torch_eager")
            numbers[f"k{row['top_k']}_grouped_ratio_largest"] = row.get("moe_over_torch_grouped")
    numbers["crossovers"] = performance.crossover_sentence(crossings)
    numbers["switch_throughput"] = published.text("Switch Transformer", "throughput of the top-1 MoE relative to dense")
    # How far a ratio may be from its true value: the 95% intervals over the
    # rounds where the run has several, else the spread of single timings.
    halves = sorted(max(interval[1] / row[field] - 1, 1 - interval[0] / row[field])
                    for row in rows for field in ("moe_over_dense_active", "moe_over_dense_params")
                    for interval in [row.get(f"{field}_interval")] if interval is not None)
    spreads = sorted(r["p80_s"] / r["p20_s"] - 1 for r in view.run if r.get("measurement") == "forward-time"
                     and r["params"].get("activation") == BENCH_ACTIVATION and r.get("p20_s"))
    if halves:
        numbers["noise"] = (f" Read single points with care: a ratio's 95% interval over the rounds reaches "
                            f"±{100 * halves[len(halves) // 2]:.0f}% at the median over this run's ratios and "
                            f"±{100 * halves[-1]:.0f}% at worst, so a ratio that close to 1 is no crossing.")
    elif spreads:
        numbers["noise"] = (f" Read single points with care: between a timing's 20th and 80th percentile "
                            f"lies {100 * spreads[len(spreads) // 2]:.0f}% at the median over this run's timings "
                            f"and {spreads[-1]:.1f}x at worst, so a ratio near 1 is no crossing.")
    folder = performance.newest_folder("cpu", results_dir, kind="bench-cpu")
    evidence = f"{_results_file(results_dir, folder, 'bench-cpu')} (run of {first['utc'][:16].replace('T', ' ')} UTC)"
    return SpeedAnswer("cpu", None, ratios, crossings, numbers, evidence)


def speed_sentence(answer: SpeedAnswer) -> str:
    """The answer in two sentences, every number from the records."""
    n = answer.numbers
    where = "this CPU" if answer.device_kind == "cpu" else answer.numbers["device"]
    return (f"On {where}, at T = {n['largest_T']}, the MoE layer takes "
            f"{n['k1_active_ratio_largest']:.2f}x the time of a dense MLP of equal active FLOPs with k = 1 and "
            f"{n['k2_active_ratio_largest']:.2f}x with k = 2, and {n['k1_params_ratio_largest']:.2f}x "
            f"(k = 1) and {n['k2_params_ratio_largest']:.2f}x (k = 2) the time of a dense MLP of equal "
            f"parameters. Crossovers: {n['crossovers']}{_peers_clause(n)}{n.get('noise', '')}")


def _peers_clause(n: dict) -> str:
    if n.get("k1_eager_ratio_largest") is None:
        return ""
    parts = [f"{n[f'k{k}_eager_ratio_largest']:.2f}x (k = {k})" for k in (1, 2) if n.get(f"k{k}_eager_ratio_largest")]
    grouped = [f"{n[f'k{k}_grouped_ratio_largest']:.2f}x (k = {k})" for k in (1, 2)
               if n.get(f"k{k}_grouped_ratio_largest")]
    return (f" Against PyTorch at T = {n['largest_T']}, the MoE takes {' and '.join(parts)} the time of the "
            f"Hugging Face eager loop and {' and '.join(grouped)} that of torch._grouped_mm.")


def speed_chart(answer: SpeedAnswer) -> alt.TopLevelMixin:
    """MoE time over dense time against T: below the line at 1 the MoE is faster."""
    frame = answer.ratios.assign(series=[f"k = {k}, against {b.split(',')[1].split('(')[0].strip()}"
                                         for k, b in zip(answer.ratios["top_k"], answer.ratios["baseline"])])
    order = sorted(frame["series"].unique())
    lines = alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("tokens:Q", scale=alt.Scale(type="log"), title="tokens T"),
        y=alt.Y("ratio:Q", scale=alt.Scale(type="log"), title="MoE time / dense time"),
        color=alt.Color("series:N", sort=order, title=None, scale=charts.palette(order),
                        legend=alt.Legend(orient="bottom", columns=2)),
        strokeDash=alt.StrokeDash("series:N", sort=order, title=None, legend=None))
    even = alt.Chart(pd.DataFrame({"one": [1.0]})).mark_rule(color="black").encode(y="one:Q")
    where = "CPU" if answer.device_kind == "cpu" else "GPU"
    return alt.layer(lines, even).properties(
        width=540, height=280, title=f"MoE against dense on the {where} (below 1: the MoE is faster)")


# ---------------------------------------------------------------- 2. k = 1 against k = 2: time per stage


STAGE_NAMES = performance.STAGE_LABELS


def stage_ratios(answer: SpeedAnswer) -> pd.DataFrame:
    """Per stage and T: median time with k = 2 over the time with k = 1 (eager launches)."""
    preset, dtype = performance.main_shape(answer.data)
    stages = performance.stage_frame(answer.data, preset, dtype)
    if stages.empty:
        return pd.DataFrame(columns=["stage", "tokens", "k1_s", "k2_s", "ratio"])
    times = stages.pivot_table(index=["stage", "tokens"], columns="top_k", values="median_s", aggfunc="first")
    times = times.dropna().reset_index()
    times.columns = ["stage", "tokens", "k1_s", "k2_s"]
    times["ratio"] = times["k2_s"] / times["k1_s"]
    times = times[times["stage"].isin(STAGE_NAMES)]
    times["stage"] = times["stage"].map(STAGE_NAMES)
    return times.reset_index(drop=True)


def stage_numbers(ratios: pd.DataFrame) -> dict:
    """The k = 2 / k = 1 time ratio of each stage at the largest T, for the prose."""
    if ratios.empty:
        return {}
    largest = int(ratios["tokens"].max())
    at = ratios[ratios["tokens"] == largest].set_index("stage")
    numbers = {"stage_T": largest}
    for stage, key in (("whole layer", "layer"), ("expert MLPs", "experts"), ("router", "router"),
                       ("dispatch", "dispatch"), ("permute", "permute"), ("combine", "combine")):
        numbers[f"stage_{key}_ratio"] = float(at.loc[stage, "ratio"]) if stage in at.index else float("nan")
    share = at.loc["expert MLPs", "k2_s"] / at.loc["whole layer", "k2_s"] if {"expert MLPs", "whole layer"} <= set(
        at.index) else float("nan")
    numbers["stage_experts_share_k2"] = float(share)
    return numbers


def stage_chart(ratios: pd.DataFrame, device_kind: str) -> alt.TopLevelMixin:
    """Time with k = 2 over time with k = 1, per stage, against T."""
    order = [name for name in STAGE_NAMES.values() if name in set(ratios["stage"])]
    lines = alt.Chart(ratios).mark_line(point=True).encode(
        x=alt.X("tokens:Q", scale=alt.Scale(type="log"), title="tokens T"),
        y=alt.Y("ratio:Q", title="time with k = 2 / time with k = 1"),
        color=alt.Color("stage:N", sort=order, title="stage", scale=charts.palette(order)))
    guides = alt.Chart(pd.DataFrame({"y": [1.0, 2.0]})).mark_rule(strokeDash=[4, 3], color="grey").encode(y="y:Q")
    where = "CPU" if device_kind == "cpu" else "GPU"
    return alt.layer(lines, guides).properties(width=480, height=260,
                                                title=f"What k = 2 costs over k = 1, per stage ({where})")


# ---------------------------------------------------------------- 2. k = 1 against k = 2: memory


@dataclasses.dataclass
class MemoryAnswer:
    """The formula at the sweep's layer shape, and the newest committed measured peaks."""

    formula: pd.DataFrame  # per T and arm: bytes by the formula
    measured: pd.DataFrame  # per T and arm: the measured peak (empty without records)
    intermediates: pd.DataFrame  # every array of the layer at one T, k = 1 and k = 2
    numbers: dict
    note: str


def memory_arms(T: int, D: int, F: int, E: int, dtype: str, activation: str) -> list:
    """(arm, k, peak bytes by the formula): the MoE at k = 1 and 2 and the dense baselines."""
    rows = []
    for k in (1, 2):
        shape = memory.LayerShape(T, D, F, E, k, dtype, activation)
        rows.append((f"MoE, k = {k}", k, memory.peak_bytes(shape)))
        rows.append((f"dense, F' = {k}·F (equal active FLOPs, k = {k})", k,
                     memory.dense_peak_bytes(T, D, k * F, dtype, activation)))
    rows.append(("dense, F' = E·F (equal parameters)", None, memory.dense_peak_bytes(T, D, E * F, dtype, activation)))
    return rows


def memory_answer(results_dir=None, preset: str = "cpu", dtype: str = "float32",
                  tokens=(1, 16, 256, 1024, 4096)) -> MemoryAnswer:
    """The memory cost of k at ``preset``'s layer shape: the formula at every T, and the measured
    peaks of the newest committed ``memory`` run of that preset on a CPU (if any)."""
    shape = sweep_plan.PRESETS[preset]
    D, F, E, activation = shape.d_model, shape.d_ff, shape.n_experts, shape.activation
    formula = pd.DataFrame([{"tokens": T, "arm": arm, "bytes": peak}
                            for T in tokens for arm, _, peak in memory_arms(T, D, F, E, dtype, activation)])
    T_big = max(tokens)
    parts = []
    for k in (1, 2):
        for row in memory.intermediates(memory.LayerShape(T_big, D, F, E, k, dtype, activation)):
            parts.append({"stage": row["stage"], "array": row["array"], "shape": row["shape"], "k": k,
                          "bytes": row["bytes"]})
    arrays = pd.DataFrame(parts).pivot_table(index=["stage", "array", "shape"], columns="k", values="bytes",
                                             sort=False).reset_index()
    arrays.columns = ["stage", "array", "shape", "k = 1 (bytes)", "k = 2 (bytes)"]
    arrays = arrays.astype({"k = 1 (bytes)": "int64", "k = 2 (bytes)": "int64"})
    measured, note = _measured_memory(results_dir, preset, dtype)
    one = memory.peak_bytes(memory.LayerShape(T_big, D, F, E, 1, dtype, activation))
    two = memory.peak_bytes(memory.LayerShape(T_big, D, F, E, 2, dtype, activation))
    numbers = {"memory_T": T_big, "memory_k1_mib": one / 2**20, "memory_k2_mib": two / 2**20,
               "memory_ratio": two / one,
               "memory_dense_active_mib": memory.dense_peak_bytes(T_big, D, F, dtype, activation) / 2**20,
               "memory_dense_params_mib": memory.dense_peak_bytes(T_big, D, E * F, dtype, activation) / 2**20,
               "memory_layer": f"D = {D}, F = {F}, E = {E}, {activation}, {dtype}"}
    if not measured.empty:
        at = measured[measured["tokens"] == measured["tokens"].max()].set_index("arm")["bytes"]
        numbers["memory_measured_T"] = int(measured["tokens"].max())
        numbers["memory_measured_k1_mib"] = float(at.get("MoE, k = 1", float("nan"))) / 2**20
        numbers["memory_measured_k2_mib"] = float(at.get("MoE, k = 2", float("nan"))) / 2**20
    return MemoryAnswer(formula, measured, arrays, numbers, note)


def _measured_memory(results_dir, preset: str, dtype: str) -> tuple:
    folder = performance.newest_folder("cpu", results_dir, kind=memory.RECORD_KIND)
    if folder is None:
        return (pd.DataFrame(columns=["tokens", "arm", "bytes"]),
                "No measured peaks yet: `python -m analysis.measure.memory` writes them (seconds on a CPU).")
    run = performance.newest_run(record_io.read_records(memory.RECORD_KIND, results_dir=results_dir, device=folder))
    rows = []
    for record in run:
        params = record["params"]
        if params.get("preset") != preset or params.get("dtype") != dtype:
            continue
        k, width = params["top_k"], params.get("dense_width")
        if width is None:
            arm = f"MoE, k = {k}"
        elif width == params["n_experts"] * params["d_ff"]:
            if k != 1:  # the equal-parameter dense MLP does not depend on k: show it once
                continue
            arm = "dense, F' = E·F (equal parameters)"
        else:
            arm = f"dense, F' = {k}·F (equal active FLOPs, k = {k})"
        rows.append({"tokens": params["tokens"], "arm": arm, "bytes": record["peak_bytes"]})
    first = run[0]
    note = (f"Measured: the newest committed memory run on {first.get('device')} ({first['utc'][:10]}, "
            f"{_results_file(results_dir, folder, memory.RECORD_KIND)}), the peak of the layer's first call in a "
            f"fresh process by tracemalloc, the CPU backend's scratch buffers included. On a GPU the same run "
            f"(`python -m analysis.measure.memory --backend cuda`, not yet run) reads CuPy's memory pool.")
    return pd.DataFrame(rows, columns=["tokens", "arm", "bytes"]), note


def memory_table(answer: MemoryAnswer) -> pd.DataFrame:
    """Per T and arm: the formula's peak and the measured CPU peak, in MiB."""
    table = answer.formula.rename(columns={"bytes": "formula"})
    if not answer.measured.empty:
        table = table.merge(answer.measured.rename(columns={"bytes": "measured"}), on=["tokens", "arm"], how="left")
    table = table[table["tokens"] == table["tokens"].max()] if len(table) else table
    out = pd.DataFrame({"arm": table["arm"], "peak by formula, whole hidden (MiB)": table["formula"] / 2**20})
    if "measured" in table:
        out["measured peak, CPU backend (MiB)"] = table["measured"] / 2**20
    return out.reset_index(drop=True)


def memory_chart(answer: MemoryAnswer) -> alt.TopLevelMixin:
    """Peak bytes against T per arm: the formula (lines) and the CPU measurement (points)."""
    formula = answer.formula.assign(MiB=answer.formula["bytes"] / 2**20, source="formula (whole hidden)")
    order = list(dict.fromkeys(formula["arm"]))
    colour = alt.Color("arm:N", sort=order, title=None, scale=charts.palette(order),
                       legend=alt.Legend(orient="bottom", columns=2, labelLimit=320))
    x = alt.X("tokens:Q", scale=alt.Scale(type="log"), title="tokens T")
    y = alt.Y("MiB:Q", scale=alt.Scale(type="log"), title="peak memory of the layer (MiB)")
    layers = [alt.Chart(formula).mark_line().encode(x=x, y=y, color=colour)]
    if not answer.measured.empty:
        measured = answer.measured.assign(MiB=answer.measured["bytes"] / 2**20)
        layers.append(alt.Chart(measured).mark_point(filled=True, size=45).encode(
            x=x, y=y, color=alt.Color("arm:N", sort=order, scale=charts.palette(order), legend=None)))
    title = ("Peak memory: formula (lines) and CPU measurement (points)" if len(layers) > 1
             else "Peak memory by the formula")
    return alt.layer(*layers).properties(width=460, height=260, title=title)


# ---------------------------------------------------------------- 3. accuracy


@dataclasses.dataclass
class AccuracyAnswer:
    runs: pd.DataFrame
    scores: pd.DataFrame  # accuracy.held_out_scores: whole-test-split scores from the records
    comparisons: pd.DataFrame  # accuracy.paired_comparisons, the three this page answers with
    numbers: dict
    evidence: str


#: The Accuracy chapter's comparisons (accuracy.COMPARISONS) this page answers with, as (arm, baseline).
ACCURACY_PAIRS = (("moe-k1", "dense"), ("moe-k2", "moe-k1"), ("moe-k2-half", "moe-k1"))
NO_SCORES = ("No whole-split scores yet: `python -m analysis.study.evaluation --preset {preset}` writes "
             "the accuracy-rescore records the Accuracy chapter reads.")


def accuracy_answer(results_dir=None, preset: str = "cpu") -> Optional[AccuracyAnswer]:
    """The Accuracy chapter's paired comparisons by seed, on its whole-test-split scores
    (``accuracy.held_out_scores`` from the records), or None without trained runs or scores."""
    try:
        runs = accuracy.runs_table(results_dir, preset=preset)
        scores = accuracy.held_out_scores(runs, source="records", results_dir=results_dir)
    except FileNotFoundError:
        return None
    comparisons = accuracy.paired_comparisons(scores)
    wanted = [(arm, baseline) in ACCURACY_PAIRS for arm, baseline in zip(comparisons["arm"], comparisons["baseline"])]
    comparisons = comparisons[wanted].reset_index(drop=True)
    numbers = accuracy.paired_numbers(comparisons)
    bits = scores.groupby("arm")["bits_per_byte"].mean()
    for arm in ("dense", "moe-k1", "moe-k2", "moe-k2-half"):
        if arm in bits:
            numbers[f"{arm.replace('-', '_')}_bits"] = float(bits[arm])
    numbers["accuracy_scale"] = (f"byte-level transformers of {runs['params_total'].min():,} to "
                                 f"{runs['params_total'].max():,} parameters, {int(runs['steps'].iloc[0]):,} "
                                 f"training steps, {_seeds_text(runs)} per arm, scored on the whole test split "
                                 f"({int(scores['eval_bytes'].iloc[0]):,} bytes of the Python standard library)")
    folders = sorted({record_io.device_folder(str(d), "cpu") for d in runs["device"]})
    evidence = ", ".join(f"results/{folder}/{kind}.jsonl" for folder in folders
                         for kind in (accuracy.RESCORE_KIND, accuracy.EVAL_KIND))
    return AccuracyAnswer(runs, scores, comparisons, numbers, evidence)


def accuracy_anchors() -> dict:
    """The published accuracy figures the answer sits beside, as the prose gives them."""
    dense, top1, top2 = (published.value("DeepSeekMoE", q) for q in (
        "Pile validation loss, dense", "Pile validation loss, top-1 (Switch)", "Pile validation loss, top-2 (GShard)"))
    return {"deepseek_k1_dense": f"{100 * (top1 / dense - 1):+.1f}%",
            "deepseek_k2_k1": f"{100 * (top2 / top1 - 1):+.1f}%",
            "st_moe": published.text("ST-MoE", "top-2 over top-1 routing, gain in negative log perplexity")}


def accuracy_published_line(answer: Optional[AccuracyAnswer]) -> str:
    """The published figures beside ours, relative changes side by side where ours exist."""
    anchors = accuracy_anchors()
    n = answer.numbers if answer is not None else {}

    def ours(key: str) -> str:
        return f" (ours: {n[f'{key}_percent']:+.1f}% in bits per byte)" if f"{key}_percent" in n else ""

    return (f"DeepSeekMoE (Table 1, 2B-parameter models on the Pile): top-1 against dense "
            f"{anchors['deepseek_k1_dense']} in loss{ours('moe_k1_vs_dense')}, top-2 against top-1 "
            f"{anchors['deepseek_k2_k1']}{ours('moe_k2_vs_moe_k1')}. ST-MoE (Table 8): top-2 over top-1 "
            f"{anchors['st_moe']} in negative log perplexity.")


def routing_anchors() -> dict:
    """The published routing figures the answer sits beside, as the prose gives them."""
    return {"shazeer": (f"{published.value(*routing.SHAZEER_NO_BALANCE_MAX):.2f} without a balancing loss and "
                        f"{published.value(*routing.SHAZEER_BALANCED_MAX):.2f} with one"),
            "mixtral_same": published.text(*routing.MIXTRAL_SAME_EXPERT)}


def _seeds_text(runs: pd.DataFrame) -> str:
    counts = sorted(set(runs.groupby("arm")["seed"].nunique()))
    return f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} seeds"


def accuracy_table(answer: AccuracyAnswer) -> pd.DataFrame:
    """The three comparisons as the Accuracy chapter prints them, fewer columns."""
    table = accuracy.format_paired(answer.comparisons)
    keep = [c for c in table.columns if c.startswith(("comparison", "mean", "95%", "verdict", "seeds"))
            and c != "seeds for 80% power"]
    return table[keep]


def accuracy_chart(answer: AccuracyAnswer) -> alt.TopLevelMixin:
    """Each seed's paired difference, the mean and its 95% interval (the Accuracy chapter's chart)."""
    return accuracy.paired_chart(answer.comparisons, answer.scores)


# ---------------------------------------------------------------- 4. routing


@dataclasses.dataclass
class RoutingAnswer:
    averages: pd.DataFrame
    numbers: dict
    positions: int


def trained_runs(results_dir=None, preset: str = "cpu") -> Optional[pd.DataFrame]:
    """The trained runs of ``preset`` (accuracy.runs_table), or None when none was trained."""
    try:
        return accuracy.runs_table(results_dir, preset=preset)
    except FileNotFoundError:
        return None


def routing_answer(runs: Optional[pd.DataFrame], routing_bytes: int, arms=ROUTING_ARMS) -> Optional[RoutingAnswer]:
    """Load balance and consecutive-byte expert reuse of ``arms`` (every seed), on
    ``routing_bytes`` test bytes spread over the test files, through the Routing chapter's
    functions; None without trained runs."""
    if runs is None:
        return None
    chosen = runs[runs["arm"].isin(arms)]
    if chosen.empty:
        return None
    collected = routing.collect_all(chosen, max_bytes=routing_bytes)
    metrics = routing.metrics_table(collected)
    numbers = routing.headline_numbers(metrics)
    return RoutingAnswer(routing.arm_averages(metrics), numbers, routing.tokens_collected(collected))


def routing_chart(answer: RoutingAnswer) -> alt.TopLevelMixin:
    """Per arm: max/mean expert load and the same-expert rate of consecutive bytes, against
    their balanced or random values."""
    balanced = "max/mean expert load (1 = balanced)"
    reuse = "consecutive bytes, same first expert (random = 1/E)"
    rows = []
    for row in answer.averages.itertuples():
        rows.append({"arm": row.arm, "metric": balanced, "value": row.load_max_over_mean_mean, "reference": 1.0})
        rows.append({"arm": row.arm, "metric": reuse, "value": row.same_expert_rate_mean,
                     "reference": answer.numbers["uniform_same_expert"]})
    frame = pd.DataFrame(rows)
    order = [accuracy.arm_label(a) for a in accuracy.ARM_ORDER if a in set(frame["arm"])]
    frame["arm"] = frame["arm"].map(accuracy.arm_label)
    bars = alt.Chart().mark_bar().encode(
        y=alt.Y("arm:N", sort=order, title=None), x=alt.X("value:Q", title=None),
        color=alt.Color("arm:N", sort=order, title="arm", scale=charts.palette(order)))
    rule = alt.Chart().mark_rule(color="black", strokeDash=[4, 3]).encode(x="reference:Q")
    return alt.layer(bars, rule, data=frame).properties(width=250, height=alt.Step(22)).facet(
        column=alt.Column("metric:N", title=None, header=alt.Header(labelLimit=300))
    ).resolve_scale(x="independent").properties(title="How tokens route (dashed: balanced or random)")


# ---------------------------------------------------------------- the prose


def _or_missing(answer, sentence, missing: str) -> str:
    return missing if answer is None else sentence(answer)


def gpu_line(answer: Optional[SpeedAnswer]) -> str:
    """The GPU half of an answer: the GPU records' sentence, or the one line saying there are none."""
    return _or_missing(answer, speed_sentence, NO_GPU)


def cpu_speed_line(answer: Optional[SpeedAnswer]) -> str:
    return _or_missing(answer, speed_sentence, "No CPU sweep records yet: `make sweep-cpu` writes them.")


def speed_figure(gpu: Optional[SpeedAnswer], cpu: Optional[SpeedAnswer]):
    """The section's one figure: the GPU's where there are GPU records, else the CPU's, else None."""
    chosen = gpu or cpu
    return None if chosen is None else charts.show(speed_chart(chosen))


def skew_sentence(answer: Optional[SpeedAnswer]) -> str:
    """How the worst routing skew in the run changes the whole layer's time."""
    if answer is None:
        return ""
    preset, dtype = performance.main_shape(answer.data)
    skews = performance.skew_frame(answer.data, preset, dtype)
    skewed = skews[skews["skew"] != "uniform"] if not skews.empty else skews
    if skewed.empty:
        return "The run measured no skewed routing."
    worst = skewed.loc[skewed["time_vs_uniform"].idxmax()]
    return (f"the worst skew measured ({worst['skew']}, k = {int(worst['top_k'])}, T = {int(worst['tokens'])}, "
            f"busiest expert {worst['load_max_over_mean']:.1f}x the mean load) takes "
            f"{worst['time_vs_uniform']:.2f}x the time of uniform routing.")


def stage_sentence(answer: Optional[SpeedAnswer], numbers: dict) -> str:
    if answer is None or not numbers:
        return "No per-stage timings in the records."
    where = "this CPU" if answer.device_kind == "cpu" else answer.numbers["device"]
    return (f"On {where} at T = {numbers['stage_T']}, k = 2 takes {numbers['stage_layer_ratio']:.2f}x the time "
            f"of k = 1 for the whole layer. The expert MLPs, which do twice the FLOPs, take "
            f"{numbers['stage_experts_ratio']:.2f}x and are {100 * numbers['stage_experts_share_k2']:.0f}% of "
            f"the k = 2 layer's time; permute and combine, which move twice the rows, take "
            f"{numbers['stage_permute_ratio']:.2f}x and {numbers['stage_combine_ratio']:.2f}x; the router "
            f"{numbers['stage_router_ratio']:.2f}x and dispatch {numbers['stage_dispatch_ratio']:.2f}x.")


def memory_sentence(answer: MemoryAnswer) -> str:
    n = answer.numbers
    text = (f"By the formula, at T = {n['memory_T']} ({n['memory_layer']}), the layer's peak is "
            f"{n['memory_k1_mib']:.1f} MiB with k = 1 and {n['memory_k2_mib']:.1f} MiB with k = 2 "
            f"({n['memory_ratio']:.2f}x): the permuted tokens, the hidden activations and the expert outputs "
            f"all have N = T k rows. The dense MLP of equal active FLOPs (k = 1) needs "
            f"{n['memory_dense_active_mib']:.1f} MiB, the one of equal parameters "
            f"{n['memory_dense_params_mib']:.1f} MiB.")
    if "memory_measured_k1_mib" in n:
        text += (f" Measured on the CPU backend at T = {n['memory_measured_T']}: {n['memory_measured_k1_mib']:.1f} "
                 f"and {n['memory_measured_k2_mib']:.1f} MiB, below the formula because that backend gathers "
                 f"each expert's rows as it runs it, a block at a time, so neither the permuted tokens nor the "
                 f"whole hidden activations exist at once, and adds each block's weighted output rows straight "
                 f"into y, so that k = 2 holds one output, as k = 1 does.")
    return text


def utilisation_line(results_dir=None) -> str:
    """Utilisation is measured only on a GPU (Nsight Compute and NVML): what the records hold."""
    data = performance.chapter_data("gpu", source="records", results_dir=results_dir)
    if data.empty:
        return (f"Not measured: GPU utilisation (tensor-pipe and DRAM throughput, occupancy) needs Nsight Compute "
                f"on a GPU, and no GPU has run this study. `{GPU_COMMAND}` on a GPU machine measures it, and "
                f"the GPU chapter then shows it.")
    return f"Measured on {data.device}: see the Nsight Compute table of the GPU chapter ({data.note})."


def gpu_anchor_text() -> str:
    vllm = published.entry("vLLM", "fused MoE, fraction of HBM bandwidth")
    grouped = published.entry("PyTorch", "torch._grouped_mm rate")
    return (f"{vllm['value_text']} of HBM bandwidth for vLLM's tuned fused MoE ({vllm['setting']}), and "
            f"{grouped['value_text']} for torch._grouped_mm ({grouped['setting']}), both as the study's design "
            f"quotes them (The contract, last section)")


def accuracy_sentence(answer: Optional[AccuracyAnswer], preset: str = "cpu") -> str:
    if answer is None:
        return NO_SCORES.format(preset=preset) + " (`make train-cpu` first, if no arm is trained.)"
    n = answer.numbers

    def diff(key: str) -> str:
        if f"{key}_mean" not in n:
            return "not trained"
        return (f"{n[f'{key}_mean']:+.3f} bits/byte, 95% interval [{n[f'{key}_low']:+.3f}, "
                f"{n[f'{key}_high']:+.3f}] over {n[f'{key}_n']} seeds: {n[f'{key}_verdict']}")

    return (f"Held-out bits per byte, mean of seeds: dense {n.get('dense_bits', float('nan')):.3f}, top-1 MoE "
            f"{n.get('moe_k1_bits', float('nan')):.3f}, top-2 MoE {n.get('moe_k2_bits', float('nan')):.3f}. "
            f"Paired by seed (negative: the first arm predicts better): top-1 against dense at equal active FLOPs {diff('moe_k1_vs_dense')}; top-2 against "
            f"top-1 with the same experts (twice the expert FLOPs) {diff('moe_k2_vs_moe_k1')}; top-2 against top-1 "
            f"at equal active FLOPs (half-width experts) {diff('moe_k2_half_vs_moe_k1')}.")


def routing_sentence(answer: Optional[RoutingAnswer]) -> str:
    if answer is None:
        return "No trained MoE checkpoints yet: `make train-cpu` trains them."
    n = answer.numbers
    parts = [f"With the balancing loss the busiest expert gets {n['moe_k1_load_max_over_mean']:.2f}x the mean "
             f"load with k = 1"]
    if "moe_k2_load_max_over_mean" in n:
        parts[0] += f" and {n['moe_k2_load_max_over_mean']:.2f}x with k = 2"
    if "moe_k1_nobal_load_max_over_mean" in n:
        parts[0] += f"; without it, {n['moe_k1_nobal_load_max_over_mean']:.2f}x (k = 1)"
    reuse = (f"Consecutive bytes keep the same first-choice expert {100 * n['moe_k1_same_expert_rate']:.0f}% "
             f"of the time (k = 1) against {100 * n['uniform_same_expert']:.1f}% at random (E = {n['n_experts']})")
    if "moe_k1_same_expert_different_bytes" in n:
        reuse += f", and {100 * n['moe_k1_same_expert_different_bytes']:.0f}% when the two bytes differ"
    parts.append(reuse)
    if "moe_k2_second_weight_share" in n:
        parts.append(f"With k = 2 the second expert carries {100 * n['moe_k2_second_weight_share']:.0f}% of a "
                     f"token's routing weight")
    return ". ".join(parts) + "."


def gpu_stage_line(answer: Optional[SpeedAnswer]) -> str:
    """The GPU half of the time-per-stage answer, or the one line saying there are no GPU records."""
    if answer is None:
        return NO_GPU
    return stage_sentence(answer, stage_numbers(stage_ratios(answer)))


# ---------------------------------------------------------------- 2. k = 1 against k = 2: bytes requested


def traffic(results_dir=None) -> tuple:
    """The bytes each stage's kernels request at k = 1 and k = 2, counted in CPU emulation
    (the Kernels chapter's ``traffic_k_answer``), and the sentence for the prose; an empty
    frame and "" without committed traffic records."""
    from analysis.chapters import kernels as kernels_chapter  # noqa: PLC0415 - only this section needs it

    frame = kernels_chapter.traffic_k_answer(results_dir)
    if frame.empty:
        return frame, ""
    numbers = kernels_chapter.traffic_numbers(kernels_chapter.traffic_records(results_dir))
    one, two = frame["k = 1 (KiB)"].sum(), frame["k = 2 (KiB)"].sum()
    sentence = (f"Bytes the kernels request, {kernels_chapter.TRAFFIC_LABEL}, at {numbers['traffic_shape']}. "
                f"The whole MoE layer requests {one:,.0f} KiB with k = 1 and {two:,.0f} KiB with k = 2 "
                f"({two / one:.2f}x). This is CPU emulation, not a GPU measurement.")
    return frame, sentence


# ---------------------------------------------------------------- compact tables (issue 23, item 3)
#
# Per question: a table of the values, each with its 95% interval where the run repeats
# and a one-line verdict, and at most three short sentences of prose (tests check that
# no sentence of the page runs over MAX_SENTENCE_WORDS words).

#: No sentence the Answers page prints runs longer than this.
MAX_SENTENCE_WORDS = 45


def _interval_text(low, high, digits: int = 2) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "\u2013"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _ratio_verdict(ratio: float, low, high) -> str:
    if low is not None and high is not None and not pd.isna(low) and low <= 1 <= high:
        return "no difference shown (interval contains 1)"
    return "MoE faster" if ratio < 1 else "MoE slower"


def speed_table(answer: SpeedAnswer) -> pd.DataFrame:
    """Q1: the MoE's time over each dense baseline's at the smallest and largest T, per k,
    with the 95% interval over the run's rounds where it has one."""
    rows = []
    ratios = answer.ratios
    for T in sorted({int(ratios["tokens"].min()), int(ratios["tokens"].max())}):
        for row in ratios[ratios["tokens"] == T].sort_values(["top_k", "baseline"]).itertuples():
            low, high = getattr(row, "low", None), getattr(row, "high", None)
            rows.append({"T (tokens)": T, "k": int(row.top_k),
                         "against": "dense, equal active FLOPs" if "active" in row.baseline
                         else "dense, equal parameters",
                         "MoE time / dense time": row.ratio, "95% interval": _interval_text(low, high),
                         "verdict": _ratio_verdict(row.ratio, low, high)})
    return pd.DataFrame(rows)


def speed_chart_with_intervals(answer: SpeedAnswer) -> alt.TopLevelMixin:
    """Q1's figure: MoE time over dense time against T, with the 95% interval of each ratio
    over the run's rounds (where it has them); the axes run over the data only."""
    frame = answer.ratios.assign(series=[f"k = {k}, against {'equal active FLOPs' if 'active' in b else 'equal parameters'}"
                                         for k, b in zip(answer.ratios["top_k"], answer.ratios["baseline"])])
    order = sorted(frame["series"].unique())
    low_T, high_T = int(frame["tokens"].min()), int(frame["tokens"].max())
    x = alt.X("tokens:Q", scale=alt.Scale(type="log", domain=[low_T, high_T], nice=False), title="tokens T")
    values = pd.concat([frame["ratio"], frame.get("low", frame["ratio"]), frame.get("high", frame["ratio"])]).dropna()
    y_scale = alt.Scale(type="log", domain=[float(values.min()) * 0.95, float(values.max()) * 1.05], nice=False)
    colour = alt.Color("series:N", sort=order, title=None, scale=charts.palette(order),
                       legend=alt.Legend(orient="bottom", columns=2, labelLimit=320))
    lines = alt.Chart(frame).mark_line(point=True).encode(
        x=x, y=alt.Y("ratio:Q", scale=y_scale, title="MoE time / dense time"), color=colour)
    layers = [lines]
    if "low" in frame and frame["low"].notna().any():
        layers.append(alt.Chart(frame.dropna(subset=["low"])).mark_rule().encode(
            x=x, y=alt.Y("low:Q", scale=y_scale), y2="high:Q",
            color=alt.Color("series:N", sort=order, scale=charts.palette(order), legend=None)))
    layers.append(alt.Chart(pd.DataFrame({"one": [1.0]})).mark_rule(color="black", strokeDash=[4, 3]).encode(
        y=alt.Y("one:Q", scale=y_scale)))
    where = "CPU" if answer.device_kind == "cpu" else "GPU"
    return alt.layer(*layers).resolve_legend(color="independent").properties(
        width=520, height=280, title=f"MoE against dense on the {where} (below 1: the MoE is faster)")


def with_intervals(answer: SpeedAnswer, results_dir=None) -> SpeedAnswer:
    """``answer`` (from bench_speed) with each ratio's 95% interval over rounds as low/high
    columns, read from the same bench-cpu view the ratios came from."""
    from analysis.chapters import cpu_baseline  # noqa: PLC0415

    view = cpu_baseline.bench_cpu_view(results_dir)
    found = {}
    for row in view.rows:
        if row["activation"] != BENCH_ACTIVATION:
            continue
        for key, baseline in (("moe_over_dense_active", "dense, equal active FLOPs (K·F)"),
                              ("moe_over_dense_params", "dense, equal parameters (E·F)")):
            interval = row.get(f"{key}_interval")
            if interval is not None:
                found[row["top_k"], baseline, row["tokens"]] = interval
    ratios = answer.ratios.copy()
    keys = list(zip(ratios["top_k"], ratios["baseline"], ratios["tokens"]))
    ratios["low"] = [found[key][0] if key in found else float("nan") for key in keys]
    ratios["high"] = [found[key][1] if key in found else float("nan") for key in keys]
    return dataclasses.replace(answer, ratios=ratios)


def speed_sentences(answer: Optional[SpeedAnswer]) -> str:
    """Q1 in at most three short sentences (the numbers are in the table)."""
    if answer is None:
        return "No CPU timings yet: `make bench-cpu` writes them."
    table = speed_table(answer)
    largest = table[table["T (tokens)"] == table["T (tokens)"].max()]
    faster = largest[largest["verdict"] == "MoE faster"]
    where = "this CPU" if answer.device_kind == "cpu" else answer.numbers["device"]
    first = (f"On {where} at T = {int(largest['T (tokens)'].iloc[0]):,}, the MoE beats "
             f"{len(faster)} of the {len(largest)} dense baselines.")
    return " ".join([first] + [_crossing_sentence(answer.ratios, baseline) for baseline in ("params", "active")])


def _crossing_sentence(ratios: pd.DataFrame, baseline: str) -> str:
    """Where the MoE is faster than one dense baseline, for each k, in one sentence: faster
    means the ratio's 95% interval lies below 1 where the run has intervals, else ratio < 1."""
    mine = ratios[ratios["baseline"].str.contains("active" if baseline == "active" else "parameters")]
    parts = []
    for k, group in mine.groupby("top_k"):
        group = group.sort_values("tokens")
        upper = group["high"] if "high" in group and group["high"].notna().all() else group["ratio"]
        faster = list(group.loc[upper.to_numpy() < 1, "tokens"])
        if len(faster) == len(group):
            status = "at every measured T"
        elif not faster:
            status = "at no measured T"
        else:
            status = f"at T = {', '.join(f'{int(t):,}' for t in faster)}"
        parts.append((status, int(k)))
    what = "equal active FLOPs" if baseline == "active" else "equal parameters"
    if len({status for status, _ in parts}) == 1:
        ks = " and ".join(f"k = {k}" for _, k in parts)
        return f"Against the dense MLP of {what}, the MoE is faster {parts[0][0]}, with {ks}."
    return f"Against the dense MLP of {what}, the MoE is faster {' and '.join(f'{s} with k = {k}' for s, k in parts)}."


def stage_table(ratios: pd.DataFrame) -> pd.DataFrame:
    """Q2: each stage's time with k = 2 over its time with k = 1, at the largest T."""
    if ratios.empty:
        return pd.DataFrame()
    largest = int(ratios["tokens"].max())
    at = ratios[ratios["tokens"] == largest]
    order = [name for name in STAGE_NAMES.values() if name in set(at["stage"])]
    at = at.set_index("stage").loc[order].reset_index()

    def verdict(row) -> str:
        if row.stage == "expert MLPs":
            return "twice the FLOPs"
        if row.stage in ("permute", "combine"):
            return "twice the rows"
        return "the same work for k = 1 and 2" if row.stage in ("router",) else ""

    return pd.DataFrame({"stage": at["stage"], f"k = 1 (ms, T = {largest:,})": 1e3 * at["k1_s"],
                         f"k = 2 (ms, T = {largest:,})": 1e3 * at["k2_s"], "k = 2 / k = 1": at["ratio"],
                         "why it changes": [verdict(r) for r in at.itertuples()]})


def weight_bytes(D: int, F: int, E: int, itemsize: int, activation: str) -> dict:
    """Bytes of the weights each arm keeps in memory: the MoE's E experts and router, and the
    dense MLPs of equal active FLOPs (width k·F) and of equal parameters (width E·F)."""
    matrices = 3 if activation == "swiglu" else 2
    return {"MoE, k = 1": (E * matrices * D * F + D * E) * itemsize,
            "MoE, k = 2": (E * matrices * D * F + D * E) * itemsize,
            "dense, F' = 1·F (equal active FLOPs, k = 1)": matrices * D * F * itemsize,
            "dense, F' = 2·F (equal active FLOPs, k = 2)": matrices * D * 2 * F * itemsize,
            "dense, F' = E·F (equal parameters)": matrices * D * E * F * itemsize}


def memory_with_weights(answer: MemoryAnswer, preset: str = "cpu", itemsize: int = 4) -> pd.DataFrame:
    """Q2's memory table: per arm at the largest T, the weights (the MoE's defining cost), the
    activations' peak by the formula and as measured, and weights plus activations."""
    shape = sweep_plan.PRESETS[preset]
    weights = weight_bytes(shape.d_model, shape.d_ff, shape.n_experts, itemsize, shape.activation)
    table = memory_table(answer)
    table.insert(1, "weights (MiB)", table["arm"].map(weights) / 2**20)
    table["weights + activations by formula (MiB)"] = table["weights (MiB)"] + table["peak by formula, whole hidden (MiB)"]
    return table.rename(columns={"peak by formula, whole hidden (MiB)": "activations by formula (MiB)",
                                 "measured peak, CPU backend (MiB)": "activations measured, CPU (MiB)"})


def accuracy_compact_table(answer: AccuracyAnswer) -> pd.DataFrame:
    """Q3: each comparison's mean paired difference, its 95% interval and the verdict."""
    c = answer.comparisons

    def verdict(row) -> str:
        if not row.supported:
            return "within noise"
        return "first arm better" if row.mean < 0 else "first arm worse"

    return pd.DataFrame({
        "comparison": [f"{accuracy.arm_label(a)} − {accuracy.arm_label(b)}" for a, b in zip(c["arm"], c["baseline"])],
        "difference (bits/byte)": c["mean"],
        "95% interval": [f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(c["low"], c["high"])],
        "seeds": c["n"], "verdict": [verdict(r) for r in c.itertuples()]})


def inference_table(k_summary: pd.DataFrame, capacity: pd.DataFrame) -> pd.DataFrame:
    """Q3's inference-time results: changing k at inference, and a capacity factor of 1,
    each against the model as trained (paired by seed, 95% interval), from the Accuracy
    chapter's functions."""
    rows = []
    # Per arm and k at inference other than the trained k: the better of the two weightings
    # (renormalised or not), so that the row shows the best that changing k can do.
    changed = k_summary[~k_summary["as_trained"] & (k_summary["eval_k"] != k_summary["trained_k"])]
    best = changed.loc[changed.groupby(["arm", "eval_k"])["change_mean"].idxmin()]
    best = best.assign(rank=best["arm"].map(lambda a: accuracy.ARM_ORDER.index(a))).sort_values("rank")
    for row in best.itertuples():
        weighting = "renormalised" if row.renormalize else "not renormalised"
        rows.append({"arm": accuracy.arm_label(row.arm),
                     "change at inference": f"k = {row.trained_k} → {row.eval_k} ({weighting})",
                     "bits/byte change": row.change_mean, "95% interval": _interval_text(row.change_low, row.change_high, 3),
                     "verdict": _change_verdict(row.change_mean, row.change_low, row.change_high)})
    if not capacity.empty:
        # The summary names factors as text ("1", "dropless") for its chart's axis.
        for row in capacity[capacity["capacity_factor"].astype(str).isin(["1", "1.0"])].itertuples():
            rows.append({"arm": accuracy.arm_label(row.arm),
                         "change at inference": f"capacity factor 1 ({row.drop_rate_mean:.1%} dropped)",
                         "bits/byte change": row.change_mean,
                         "95% interval": _interval_text(row.change_low, row.change_high, 3),
                         "verdict": _change_verdict(row.change_mean, row.change_low, row.change_high)})
    return pd.DataFrame(rows)


def _change_verdict(mean, low, high) -> str:
    if pd.isna(low) or pd.isna(high):
        return ""
    if low <= 0 <= high:
        return "within noise"
    return "worse" if mean > 0 else "better"


def routing_compact_table(answer: RoutingAnswer) -> pd.DataFrame:
    """Q4: per arm, the busiest expert's load over the mean (1 = balanced), and how often
    consecutive bytes keep their first-choice expert, on all pairs and on pairs of two
    different bytes, each beside its chance baseline. The same function and inputs as the
    Routing chapter, so the same numbers."""
    n = answer.numbers
    rows = []
    for arm in ROUTING_ARMS:
        key = arm.replace("-", "_")
        if f"{key}_load_max_over_mean" not in n:
            continue
        def share(name: str) -> str:
            value = n.get(name)
            return "\u2013" if value is None or pd.isna(value) else f"{value:.1%}"

        rows.append({"arm": accuracy.arm_label(arm), "busiest expert / mean load": n[f"{key}_load_max_over_mean"],
                     # 1/E is the same for every arm: it goes in the header, not in a constant column.
                     f"same expert, consecutive bytes (chance {share('uniform_same_expert')})":
                         share(f"{key}_same_expert_rate"),
                     "same expert, two different bytes": share(f"{key}_same_expert_different_bytes"),
                     "chance for these, from the load": share(f"{key}_same_expert_by_load")})
    return pd.DataFrame(rows)


def routing_sentences(answer: Optional[RoutingAnswer]) -> str:
    """Q4 in three short sentences."""
    if answer is None:
        return "No trained MoE checkpoints yet: `make train-cpu` trains them."
    n = answer.numbers
    same = routing.versus_chance(n["moe_k1_same_expert_rate"], n["uniform_same_expert"])
    different = routing.versus_chance(n["moe_k1_same_expert_different_bytes"], n["moe_k1_same_expert_by_load"])
    text = (f"The balancing loss keeps the top-1 MoE's busiest expert at {n['moe_k1_load_max_over_mean']:.2f}x the "
            f"mean load; without it, {n['moe_k1_nobal_load_max_over_mean']:.2f}x. "
            f"Consecutive bytes keep the top-1 MoE's first-choice expert {n['moe_k1_same_expert_rate']:.1%} of the "
            f"time, {same} the {n['uniform_same_expert']:.1%} of chance, much of it repeated bytes. "
            f"On two different bytes its rate, {n['moe_k1_same_expert_different_bytes']:.1%}, is {different} the "
            f"{n['moe_k1_same_expert_by_load']:.1%} that chance gives from its load.")
    return text


def sentences(text: str) -> list:
    """The sentences of ``text`` (split after . ! ? followed by a space and a capital, a
    digit or a backtick), for the page's sentence-length test."""
    import re  # noqa: PLC0415

    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9`(])", text.strip()) if s]


def longest_sentence_words(text: str) -> int:
    """The word count of the longest sentence in ``text``."""
    return max((len(s.split()) for s in sentences(text)), default=0)


def accuracy_sentences(answer: Optional[AccuracyAnswer], preset: str = "cpu") -> str:
    """Q3 in three short sentences: what the paired comparisons say, and the regime."""
    if answer is None:
        return NO_SCORES.format(preset=preset) + " (`make train-cpu` first, if no arm is trained.)"
    table = accuracy_compact_table(answer)
    supported = int((table["verdict"] != "within noise").sum())
    regime = accuracy.regime_sentence(accuracy.gap_over_training(accuracy.validation_curves(runs=answer.runs)),
                                      short=True)
    zlib = accuracy.regime_numbers(accuracy.compressor_table(accuracy.summary_table(answer.scores)))
    return (f"Paired by seed, {supported} of the {len(table)} differences below are larger than their noise "
            f"(negative: the first arm predicts better). Even the best model ({accuracy.arm_label(zlib['best_model'])}, "
            f"{zlib['best_model_bits']:.3f} bits/byte) scores worse than zlib ({zlib['zlib_bits']:.3f}) on the same "
            f"bytes, so these models are early in training. {regime}")


@dataclasses.dataclass
class CostAnswer:
    """Q3's speed-beside-accuracy table (accuracy.format_cost_table) and its figure."""

    table: pd.DataFrame
    chart: Optional[alt.TopLevelMixin]
    caption: str
    alt: str
    numbers: dict


def cost_answer(answer: AccuracyAnswer, results_dir=None, preset: str = "cpu") -> CostAnswer:
    """Each main arm's bits/byte with its interval, size, FLOPs, layer time and training step,
    from the Accuracy chapter's functions (the same table it prints)."""
    cost = accuracy.cost_records(results_dir, preset=preset)
    table = accuracy.cost_table(answer.scores, cost)
    numbers = accuracy.cost_numbers(table, cost)
    chart = accuracy.quality_time_chart(table) if cost else None
    caption = (f"Test bits per byte (95% interval over seeds) against the training step measured on this CPU "
               f"({numbers.get('cost_rounds', 0)} paired rounds, {numbers.get('cost_threads', 1)} torch thread). "
               f"Down and to the left is better.") if cost else ""
    alt_text = "Scatter chart, one point per arm: test bits per byte against milliseconds per training step."
    return CostAnswer(accuracy.format_cost_table(table), chart, caption, alt_text, numbers)


@dataclasses.dataclass
class InferenceAnswer:
    table: pd.DataFrame
    text: str


def inference_answer(answer: AccuracyAnswer, experiment_bytes: int) -> InferenceAnswer:
    """Q3's inference-time results: k changed at inference and capacity factor 1, through the
    Accuracy chapter's functions on the same ``experiment_bytes`` test bytes (its default)."""
    k_summary = accuracy.inference_k_summary(accuracy.inference_k_table(answer.runs, max_bytes=experiment_bytes))
    capacity = accuracy.capacity_summary(accuracy.capacity_sweep(answer.runs, max_bytes=experiment_bytes))
    table = inference_table(k_summary, capacity)
    worse = int((table["verdict"] == "worse").sum())
    k_rows = table[table["change at inference"].str.startswith("k =")]
    k_worse = int((k_rows["verdict"] == "worse").sum())
    text = (f"On {experiment_bytes:,} test bytes, {worse} of the {len(table)} changes below make the model "
            f"worse than as trained, paired by seed.")
    if len(k_rows) and k_worse == len(k_rows):
        text += " Every model scores best with the k it was trained with, even with the better weighting."
    text += " The Accuracy chapter gives every capacity factor and both weightings."
    return InferenceAnswer(table, text)


def skew_table(answer: Optional[SpeedAnswer]) -> pd.DataFrame:
    """Q4's speed side: the whole layer's time under each skewed routing over its time under
    uniform routing (the CPU sweep), beside how unequal the load is and how many experts
    receive any token."""
    if answer is None:
        return pd.DataFrame()
    preset, dtype = performance.main_shape(answer.data)
    skews = performance.skew_frame(answer.data, preset, dtype)
    if skews.empty:
        return pd.DataFrame()
    skews = skews[skews["skew"] != "uniform"].sort_values(["top_k", "time_vs_uniform"])
    return pd.DataFrame({"routing": skews["skew"], "k": skews["top_k"], "T (tokens)": skews["tokens"],
                         "busiest expert / mean load": skews["load_max_over_mean"],
                         "experts with tokens": skews["experts_used"].astype(int),
                         "time relative to uniform routing": skews["time_vs_uniform"]})


def skew_experts(answer: Optional[SpeedAnswer]) -> int:
    """E of the sweep's main layer."""
    preset, _ = performance.main_shape(answer.data)
    return sweep_plan.PRESETS[preset].n_experts


def skew_sentences(table: pd.DataFrame, n_experts: int) -> str:
    """Why skew speeds the CPU layer up, from the table's own columns."""
    if table.empty:
        return ""
    fastest = table.sort_values("time relative to uniform routing").iloc[0]
    return (f"On this CPU, skewed routing is faster than uniform, not slower: {fastest['routing']} routing "
            f"(k = {int(fastest['k'])}) takes {fastest['time relative to uniform routing']:.2f}x uniform's time. "
            f"It sends every token to {int(fastest['experts with tokens'])} of the {n_experts} experts, so the "
            f"backend reads fewer experts' weights and runs fewer, larger GEMMs. One core runs the experts one "
            f"after another, so the busiest expert does not set the time as it would on a GPU.")


def headline_lines(cpu: Optional[SpeedAnswer], gpu: Optional[SpeedAnswer], accuracy_answer: Optional[AccuracyAnswer],
                   routing: Optional[RoutingAnswer]) -> dict:
    """The landing page's three lines and its status (plain text, glued into book/intro.md)."""
    lines = {}
    if cpu is not None:
        table = speed_table(cpu)
        largest = table[table["T (tokens)"] == table["T (tokens)"].max()]
        params = largest[largest["against"] == "dense, equal parameters"]["MoE time / dense time"]
        active = largest[largest["against"] == "dense, equal active FLOPs"]["MoE time / dense time"]
        lines["headline_speed"] = (f"Speed (CPU, T = {int(largest['T (tokens)'].iloc[0]):,}): the MoE layer takes "
                                   f"{params.min():.2f}-{params.max():.2f}x the time of a dense MLP of equal "
                                   f"parameters, and {active.min():.2f}-{active.max():.2f}x that of one of "
                                   f"equal active FLOPs (k = 1 and 2).")
    else:
        lines["headline_speed"] = "Speed: no CPU timings yet."
    if accuracy_answer is not None:
        n = accuracy_answer.numbers
        lines["headline_accuracy"] = (
            f"Accuracy (small byte-level models, early in training): the top-2 MoE beats the top-1 MoE by "
            f"{-n['moe_k2_vs_moe_k1_mean']:.3f} bits/byte, and the top-1 MoE beats dense at equal active FLOPs by "
            f"{-n['moe_k1_vs_dense_mean']:.3f}, paired by seed.")
    else:
        lines["headline_accuracy"] = "Accuracy: no trained models scored yet."
    if routing is not None:
        n = routing.numbers
        lines["headline_routing"] = (
            f"Routing: with the balancing loss the busiest expert gets {n['moe_k1_load_max_over_mean']:.2f}x the "
            f"mean load (top-1 MoE); without it, {n['moe_k1_nobal_load_max_over_mean']:.2f}x.")
    else:
        lines["headline_routing"] = "Routing: no trained MoE checkpoints yet."
    lines["headline_status"] = ("a GPU has run the study; see the GPU chapter." if gpu is not None else
                                "no GPU run yet. Every speed number measured here is from a 2-core CPU; GPU numbers "
                                "in the book are predicted (model), and CUDA kernels run only in CPU emulation.")
    return lines


def dense_peak_note(answer: MemoryAnswer, preset: str = "cpu", itemsize: int = 4) -> str:
    """Why the CPU backend's measured peaks grow with the hidden width yet lie below the
    formula's; when the dense peaks equal the output alone at every width (records of the
    old measurement, which traced a second call), that the hidden activations were missed."""
    if answer.measured.empty:
        return ""
    shape = sweep_plan.PRESETS[preset]
    at = answer.measured[answer.measured["tokens"] == answer.measured["tokens"].max()]
    dense = at[at["arm"].str.startswith("dense")]["bytes"]
    T = int(at["tokens"].iloc[0])
    output = T * shape.d_model * itemsize
    if not dense.empty and ((dense - output).abs() < 0.01 * output).all():
        return (f"The measured dense peaks are all {dense.max() / 2**20:.2f} MiB, the output alone, at every "
                f"hidden width: these records missed the hidden activations, which the CPU backend keeps in "
                f"per-thread scratch buffers that an untimed first call had allocated.")
    return ("The CPU backend makes the hidden activations a block of rows at a time, in scratch buffers each "
            "worker thread keeps after the call, so its measured peak grows with the hidden width but stays "
            "below the whole hidden the formula counts.")


# ---------------------------------------------------------------- question 2 beyond what was measured

@dataclasses.dataclass
class PredictionAnswer:
    table: pd.DataFrame
    text: str


def gpu_prediction_answer(results_dir=None) -> Optional[PredictionAnswer]:
    """k = 1 -> 2 on a GPU as the GPU chapter's model predicts it (no GPU has run
    the study): the Mixtral-shaped layer's floor at decode and at T = 8192 on each
    device, and at most three short sentences; None without the model's records."""
    prediction = gpu_performance.prediction_data(results_dir)
    if prediction.empty:
        return None
    floors = gpu_performance.floors_frame(prediction, "mixtral")
    rows, changes = [], {}
    for device in ("H100 SXM", "A100 SXM"):
        changes[device] = gpu_performance.layer_change_numbers(floors, device)
        for T, numbers in changes[device].items():
            rows.append({"device": device, "T": T, "floor, k = 1 (µs)": numbers["k1_us"],
                         "floor, k = 2 (µs)": numbers["k2_us"], "k = 2 ÷ k = 1": numbers["ratio"],
                         "bound at k = 2": numbers["k2_bound"]})
    h100 = changes["H100 SXM"]
    sanity = sorted(prediction.sanity, key=lambda r: r["tokens"])
    sentences = [
        f"Predicted (model), not measured: at the Mixtral shape k = 2 multiplies the layer's floor by "
        f"{h100[1]['ratio']:.2f} at T = 1 and by {h100[8192]['ratio']:.2f} at T = 8192 on the H100 SXM.",
        f"At decode the weights of {h100[1]['k2_touched']:.1f} experts are read instead of "
        f"{h100[1]['k1_touched']:.1f}; at T = 8192 the expert FLOPs grow {h100[8192]['flops_ratio']:.1f} times; "
        f"occupancy does not change, since the same kernels run.",
    ]
    if sanity:
        below = all(r["floor_below_published"] for r in sanity)
        ratios = ", ".join(f"{r['published_over_floor']:.2f}" for r in sanity)
        sentences.append(f"The published vLLM times on an H100 are {ratios} times the floor at T = "
                         f"{', '.join(str(r['tokens']) for r in sanity)}"
                         + (", all above it as they must be." if below else ": one is below it, so the model is wrong."))
    return PredictionAnswer(pd.DataFrame(rows), " ".join(sentences))


def communication_answer(results_dir=None) -> Optional[str]:
    """What k costs in communication once the experts sit on several devices
    (the Beyond one device chapter): the counted loopback bytes and the modelled
    Mixtral-sized layer on 8 GPUs; None without expert-parallel records."""
    view = expert_parallel.loopback_view("records", results_dir)
    if not view.records:
        return None
    counted = expert_parallel.loopback_numbers(view)
    model = expert_parallel.model_numbers()
    return (f"With the experts on several devices, k = 2 sends twice the rows of k = 1 in each of the layer's "
            f"two all-to-alls ({counted['bytes_ratio_range']} times the bytes, counted over loopback). "
            f"For a Mixtral-sized layer on 8 GPUs at {model['model_prefill_tokens']} tokens per GPU, that exchange "
            f"is predicted (model) at {model['model_nvlink_share_k2']} of the expert GEMMs' floor over NVLink and "
            f"{model['model_ib_share_k2']} over InfiniBand NDR, for either k.")

