"""The chapter "Beyond one device" (book/notebooks/expert_parallel.ipynb).

Three views of expert parallelism: the bytes each rank sends, counted by
``topk_moe.expert_parallel`` and set beside the formula; the time of each
phase across processes on this machine over loopback (``expert-parallel``
records, or a live run); and the Mixtral-sized layer on 8 GPUs as a model
(``analysis.measure.expert_parallel.mixtral_model``), labelled as such.
"""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from typing import Sequence

import altair as alt
import pandas as pd

from analysis import charts
from analysis import records as record_io
from analysis.chapters.performance import newest_folder, newest_run, provenance_text
from analysis.measure import expert_parallel as measure

SOURCES = ("auto", "records", "live")
#: The phases in the order they run, as the tables and the chart show them.
PHASES = ("check", "route", "count_exchange", "row_exchange", "experts", "return", "combine")
EXCHANGES = ("row_exchange", "return")
#: Tokens per GPU the model's table shows (the chart draws them all).
MODEL_TABLE_TOKENS = (1, 128, 4096, 16384)
PREFILL_TOKENS = 4096


def validate_parameters(source: str, results_dir, ranks: Sequence[int], tokens: Sequence[int],
                        top_k: Sequence[int], shape: Sequence[int], repeats: int) -> None:
    """The chapter's parameters, one clear sentence each (ValueError)."""
    if source not in SOURCES:
        raise ValueError(f"source: expected 'auto', 'records' or 'live', got {source!r}")
    if results_dir is not None and not Path(results_dir).is_dir():
        raise ValueError(f"results_dir: expected None or an existing folder, got {results_dir!r}")
    if len(shape) != 3 or not all(_positive(n) for n in shape):
        raise ValueError(f"shape: expected three positive integers (D, F, E), got {shape!r}")
    experts = shape[2]
    if not ranks or not all(_positive(p) and p >= 2 and experts % p == 0 for p in ranks):
        raise ValueError(f"ranks: expected integers >= 2 that divide E = {experts}, got {ranks!r}")
    if not tokens or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
                             for t in tokens):
        raise ValueError(f"tokens: expected integers >= 0 (tokens per rank), got {tokens!r}")
    if not top_k or not all(k in (1, 2) and not isinstance(k, bool) for k in top_k) or max(top_k) > experts:
        raise ValueError(f"top_k: expected values 1 or 2 (at most E), got {top_k!r}")
    if not _positive(repeats):
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats!r}")


def _positive(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass
class LoopbackView:
    """The ``expert-parallel`` records the chapter shows and a note saying where they come from."""

    note: str
    records: list

    @property
    def empty(self) -> bool:
        return not self.records


def loopback_view(source: str = "auto", results_dir=None, *, ranks=(2, 4), tokens=(128, 1024, 4096),
                  top_k=(1, 2), shape=(256, 512, 8), repeats: int = 15) -> LoopbackView:
    """``"records"``: the newest committed run on a CPU; ``"live"``: run
    ``measure.measure`` now with the given sizes (processes spawned from here);
    ``"auto"``: records where there are some, else live."""
    folder = newest_folder("cpu", results_dir, kind=measure.RECORD_KIND)
    if source == "records" or (source == "auto" and folder is not None):
        if folder is None:
            return LoopbackView(f"no {measure.RECORD_KIND} records yet: run "
                                f"`python -m analysis.measure.expert_parallel` to measure them.", [])
        run = newest_run(record_io.read_records(measure.RECORD_KIND, results_dir=results_dir, device=folder))
        note = (f"The newest committed run, not measured while this chapter ran: "
                f"{provenance_text(run[0], folder, measure.RECORD_KIND)}. {_setting(run)}")
        return LoopbackView(note, run)
    D, F, E = shape
    config = measure.MeasureConfig(ranks=tuple(ranks), tokens=tuple(tokens), top_k=tuple(top_k),
                                   d_model=D, d_ff=F, n_experts=E, repeats=repeats)
    rows = [dict(row, device="this machine") for row in measure.measure(config)]
    note = f"Measured live while this chapter ran, at the sizes of its parameters. {_setting(rows)}"
    return LoopbackView(note, rows)


def _setting(run: list) -> str:
    """The run's layer and setting, in words (its P values, and the note of its largest P)."""
    params = max((record["params"] for record in run), key=lambda p: p["ranks"])
    ranks = " and ".join(str(p) for p in sorted({record["params"]["ranks"] for record in run}))
    return (f"Layer D = {params['d_model']}, F = {params['d_ff']}, E = {params['n_experts']}, "
            f"{params['activation']}, {params['dtype']}, capacity factor {params['capacity_factor']}; "
            f"P = {ranks}; {params['transport']}, {params['threads_per_rank']} thread per rank; "
            f"at P = {params['ranks']}: {params['note']}.")


def _frame(view: LoopbackView) -> pd.DataFrame:
    rows = [{**{key: record["params"][key] for key in ("ranks", "tokens_per_rank", "top_k", "d_model", "dtype")},
             **{key: record[key] for key in ("rank", "phase", "median_s", "p20_s", "p80_s", "bytes_sent",
                                              "kept_rows", "expected_row_bytes")},
             "rows_to_others": sum(n for q, n in enumerate(record["rows_to"]) if q != record["rank"])}
            for record in view.records]
    return pd.DataFrame(rows)


KEYS = ["ranks", "tokens_per_rank", "top_k"]
READABLE = {"ranks": "P", "tokens_per_rank": "T_r", "top_k": "k"}


def bytes_frame(view: LoopbackView) -> pd.DataFrame:
    """Per (P, T_r, k): the row bytes each rank sent out (mean, min and max over
    the ranks), the formula's T_r·K·D·s·(P-1)/P beside them, the returned bytes
    (only where they differ from the bytes out somewhere: ``bytes_caption`` says
    when they are equal) and the counts, all counted by the code from its split sizes."""
    frame = _frame(view)
    if frame.empty:
        return frame
    sent = frame.pivot_table(index=KEYS + ["rank"], columns="phase", values="bytes_sent").reset_index()
    formula = frame.groupby(KEYS)["expected_row_bytes"].first()
    table = sent.groupby(KEYS).agg(rows_mean=("row_exchange", "mean"), rows_min=("row_exchange", "min"),
                                   rows_max=("row_exchange", "max"), returned_mean=("return", "mean"),
                                   counts=("count_exchange", "first"))
    table["counts"] = table["counts"].astype(int)
    table["formula"] = formula
    table["counted_over_formula"] = table["rows_mean"] / table["formula"]
    table = table.reset_index().rename(columns={
        **READABLE, "rows_mean": "rows out, mean (B)", "rows_min": "min (B)", "rows_max": "max (B)",
        "formula": "formula (B)", "counted_over_formula": "mean ÷ formula", "returned_mean": "rows back, mean (B)",
        "counts": "counts (B)"})
    columns = ["P", "T_r", "k", "rows out, mean (B)", "min (B)", "max (B)", "formula (B)", "mean ÷ formula",
               "rows back, mean (B)", "counts (B)"]
    if _rows_back_equal_rows_out(table):
        columns.remove("rows back, mean (B)")  # the same numbers twice would only widen the table
    return table[columns]


def _rows_back_equal_rows_out(table: pd.DataFrame) -> bool:
    return bool((table["rows back, mean (B)"] == table["rows out, mean (B)"]).all())


def bytes_caption(view: LoopbackView) -> str:
    """The bytes table's caption: what its columns count, and whether the return
    all-to-all sent back as many bytes as went out (then the table leaves it out)."""
    caption = ("Bytes per rank counted from the split sizes handed to all_to_all_single; min and max are over "
               "the ranks.")
    table = bytes_frame(view)
    if not table.empty and "rows back, mean (B)" not in table.columns:
        caption += " The return all-to-all sent back exactly the bytes that went out, in every case."
    return caption


def phase_frame(view: LoopbackView) -> pd.DataFrame:
    """Per (P, T_r, k, phase): the slowest rank's median time, since a phase that
    ends in a collective is over only when its last rank is; and its share of
    the phases' sum."""
    frame = _frame(view)
    if frame.empty:
        return frame
    frame = frame[frame["phase"].isin(PHASES)]
    slowest = frame.groupby(KEYS + ["phase"])["median_s"].max().reset_index()
    slowest["share"] = slowest["median_s"] / slowest.groupby(KEYS)["median_s"].transform("sum")
    slowest["order"] = slowest["phase"].map(PHASES.index)
    return slowest.sort_values(KEYS + ["order"]).drop(columns="order").reset_index(drop=True)


#: The phase table's two halves, so that each fits the page: the three exchanges, and
#: the local phases with the whole forward (timed on its own).
PHASE_GROUPS = {"exchanges": ("count_exchange", "row_exchange", "return"),
                "local": ("check", "route", "experts", "combine", "forward")}


def phase_table(view: LoopbackView, group: str = None) -> pd.DataFrame:
    """``phase_frame`` as the page shows it: one row per (P, T_r, k), a column
    per phase in milliseconds, and the whole forward (timed on its own);
    ``group`` ("exchanges" or "local", PHASE_GROUPS) keeps only those phases."""
    if group is not None and group not in PHASE_GROUPS:
        raise ValueError(f"group: expected one of {sorted(PHASE_GROUPS)} or None, got {group!r}")
    phases = phase_frame(view)
    if phases.empty:
        return phases
    table = phases.pivot_table(index=KEYS, columns="phase", values="median_s")[list(PHASES)] * 1e3
    frame = _frame(view)
    table["forward"] = frame[frame["phase"] == "forward"].groupby(KEYS)["median_s"].max() * 1e3
    if group is not None:
        table = table[list(PHASE_GROUPS[group])]
    table.columns = [f"{phase.replace('_', ' ')} (ms)" for phase in table.columns]
    return table.reset_index().rename(columns=READABLE)


def phase_chart(view: LoopbackView) -> alt.TopLevelMixin:
    """Stacked bars: each phase's time (slowest rank) per (P, T_r, k)."""
    phases = phase_frame(view)
    phases["case"] = [f"P = {p}, T_r = {t}, k = {k}" for p, t, k in
                      zip(phases["ranks"], phases["tokens_per_rank"], phases["top_k"])]
    phases["ms"] = phases["median_s"] * 1e3
    phases["order"] = phases["phase"].map(PHASES.index)
    # The legend names phases in words ("row exchange"), as the phase table's headers do.
    names = [phase.replace("_", " ") for phase in PHASES]
    phases["phase"] = phases["phase"].str.replace("_", " ")
    return alt.Chart(phases).mark_bar().encode(
        y=alt.Y("case:N", title=None, sort=None),
        x=alt.X("ms:Q", title="time per phase, slowest rank (ms)"),
        color=alt.Color("phase:N", scale=charts.palette(names), sort=names, title="phase"),
        order=alt.Order("order:Q"),
    ).properties(width=420, title="Loopback, processes on one machine: time per phase")


def exchange_chart(view: LoopbackView) -> alt.TopLevelMixin:
    """Each row exchange and return (slowest rank's median) against the bytes
    the busiest rank sent in it, k = 1 and 2 as colours, P as shapes, log-log."""
    frame = _frame(view)
    exchanged = frame[frame["phase"].isin(EXCHANGES)]
    points = exchanged.groupby(KEYS + ["phase"]).agg(ms=("median_s", "max"), bytes=("bytes_sent", "max")).reset_index()
    points["ms"] *= 1e3
    points["k"] = "k = " + points["top_k"].astype(str)
    points["P"] = "P = " + points["ranks"].astype(str)
    points["phase"] = points["phase"].map({"row_exchange": "rows out", "return": "rows back"})
    return alt.Chart(points).mark_point(filled=True, size=70).encode(
        x=alt.X("bytes:Q", scale=_fitting_log_scale(points["bytes"]), title="bytes sent by the busiest rank"),
        y=alt.Y("ms:Q", scale=_fitting_log_scale(points["ms"]), title="time, slowest rank (ms)"),
        color=alt.Color("k:N", scale=charts.palette(["k = 1", "k = 2"]), title=None),
        shape=alt.Shape("P:N", title=None),
        tooltip=["P", "k", "tokens_per_rank", "phase", "bytes", "ms"],
    ).properties(width=360, height=240, title="Loopback: the two row all-to-alls against their bytes")


def _fitting_log_scale(values: pd.Series) -> alt.Scale:
    """A log scale whose axis ends near the data, not at the next power of ten beyond it."""
    shown = values[values > 0]
    if shown.empty:
        return alt.Scale(type="log")
    return alt.Scale(type="log", domain=[float(shown.min()) / 1.2, float(shown.max()) * 1.2], nice=False)


def k_cost_frame(view: LoopbackView) -> pd.DataFrame:
    """What k = 2 costs over k = 1 at the same (P, T_r): the ratio of the row
    bytes sent and of the two row exchanges' time (slowest rank)."""
    frame = _frame(view)
    if frame.empty or set(frame["top_k"]) != {1, 2}:
        return pd.DataFrame()
    exchanged = frame[frame["phase"].isin(EXCHANGES)]
    times = exchanged.groupby(KEYS + ["phase"])["median_s"].max().groupby(level=KEYS).sum()
    row_bytes = frame[frame["phase"] == "row_exchange"].groupby(KEYS)["bytes_sent"].sum()
    both = pd.DataFrame({"time": times, "bytes": row_bytes}).reset_index()
    wide = both.pivot_table(index=["ranks", "tokens_per_rank"], columns="top_k", values=["time", "bytes"])
    result = pd.DataFrame({
        "bytes k = 2 ÷ k = 1": wide[("bytes", 2)] / wide[("bytes", 1)],
        "exchange time k = 1 (ms)": wide[("time", 1)] * 1e3,
        "exchange time k = 2 (ms)": wide[("time", 2)] * 1e3,
        "time k = 2 ÷ k = 1": wide[("time", 2)] / wide[("time", 1)],
    })
    return result.reset_index().rename(columns=READABLE)


def loopback_numbers(view: LoopbackView) -> dict:
    """Numbers for the prose (en dashes without records)."""
    numbers_ = {"bytes_ratio_range": "–", "time_ratio_range": "–", "formula_range": "–"}
    ratios = k_cost_frame(view)
    if not ratios.empty:
        numbers_["bytes_ratio_range"] = _range(ratios["bytes k = 2 ÷ k = 1"], 2)
        numbers_["time_ratio_range"] = _range(ratios["time k = 2 ÷ k = 1"], 2)
    counted = bytes_frame(view)
    if not counted.empty:
        numbers_["formula_range"] = _range(counted["mean ÷ formula"], 2)
    return numbers_


def _range(values: pd.Series, digits: int) -> str:
    low, high = float(values.min()), float(values.max())
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}–{high:.{digits}f}"


# ---------------------------------------------------------------- the model


def model_frame(tokens: Sequence[int] = MODEL_TABLE_TOKENS, part: str = None) -> pd.DataFrame:
    """``measure.mixtral_model`` for the page: per k and tokens per GPU, the bytes
    per layer, both links' all-to-all time and the expert GEMM floor, in ms, and
    each link's time over the floor. ``part``: "times" (without the ratios) or
    "ratios" (k, T and the ratios only), the two tables the page shows; None: all."""
    if part not in (None, "times", "ratios"):
        raise ValueError(f"part: expected 'times', 'ratios' or None, got {part!r}")
    rows = measure.mixtral_model(tokens_per_gpu=tokens)
    frame = pd.DataFrame(rows)
    links = list(measure.LINKS)
    table = pd.DataFrame({
        "k": frame["top_k"], "T per GPU": frame["tokens_per_gpu"],
        "bytes per layer (MB)": frame["bytes_per_layer"] / 1e6,
        **{f"{link} (ms)": frame[f"{link} s"] * 1e3 for link in links},
        "expert GEMM floor (ms)": frame["expert_floor_s"] * 1e3,
        "expert bound": frame["expert_bound"],
        **{f"{link} ÷ experts": frame[f"{link} / experts"] for link in links},
    })
    ratios = [f"{link} ÷ experts" for link in links]
    if part == "times":
        return table.drop(columns=ratios)
    if part == "ratios":
        return table[["k", "T per GPU", "expert bound"] + ratios]
    return table


def model_chart() -> alt.TopLevelMixin:
    """Time per layer against tokens per GPU, log-log: the all-to-alls over each
    link and the expert GEMM floor, for k = 1 and 2, all predicted (model)."""
    tokens = [2 ** n for n in range(0, 15)]
    lines = []
    for row in measure.mixtral_model(tokens_per_gpu=tokens):
        k = row["top_k"]
        for link in measure.LINKS:
            lines.append({"T": row["tokens_per_gpu"], "ms": row[f"{link} s"] * 1e3,
                          "series": f"all-to-alls, {link}", "k": f"k = {k}"})
        lines.append({"T": row["tokens_per_gpu"], "ms": row["expert_floor_s"] * 1e3,
                      "series": "expert GEMM floor (H100)", "k": f"k = {k}"})
    frame = pd.DataFrame(lines)
    series = sorted(set(frame["series"]))
    return alt.Chart(frame).mark_line().encode(
        x=alt.X("T:Q", scale=alt.Scale(type="log", base=2, nice=False), title="tokens per GPU (T_r)"),
        y=alt.Y("ms:Q", scale=_fitting_log_scale(frame["ms"]), title="time per layer (ms)"),
        color=alt.Color("series:N", scale=charts.palette(series), title=None),
        strokeDash=alt.StrokeDash("k:N", title=None, scale=alt.Scale(domain=["k = 1", "k = 2"],
                                                                        range=[[1, 0], [6, 3]])),
    ).properties(width=420, height=260,
                 title=f"Mixtral-sized layer on 8 GPUs: {measure.MODEL_LABEL}")


def model_numbers() -> dict:
    """Numbers for the model's prose, at prefill (``PREFILL_TOKENS`` per GPU) and decode (1)."""
    rows = {(r["top_k"], r["tokens_per_gpu"]): r for r in measure.mixtral_model(tokens_per_gpu=(1, PREFILL_TOKENS))}
    nvlink, infiniband = measure.LINKS
    prefill = {k: rows[k, PREFILL_TOKENS] for k in (1, 2)}
    return {
        "model_prefill_tokens": PREFILL_TOKENS,
        "model_bytes_k1": f"{prefill[1]['bytes_per_layer'] / 1e6:.0f} MB",
        "model_bytes_k2": f"{prefill[2]['bytes_per_layer'] / 1e6:.0f} MB",
        "model_nvlink_k2": f"{prefill[2][f'{nvlink} s'] * 1e3:.2f} ms",
        "model_ib_k2": f"{prefill[2][f'{infiniband} s'] * 1e3:.1f} ms",
        "model_experts_k2": f"{prefill[2]['expert_floor_s'] * 1e3:.1f} ms",
        "model_nvlink_share_k2": f"{100 * prefill[2][f'{nvlink} / experts']:.0f}%",
        "model_ib_share_k2": f"{100 * prefill[2][f'{infiniband} / experts']:.0f}%",
        "model_decode_experts": f"{rows[1, 1]['expert_floor_s'] * 1e6:.0f} µs",
        "model_decode_ib": f"{rows[1, 1][f'{infiniband} s'] * 1e6:.2f} µs",
    }


def sources_frame() -> pd.DataFrame:
    """Where the model's bandwidths and ceilings come from."""
    rows = [{"quantity": f"{link}, per GPU, one way", "value": f"{spec['bytes_per_s'] / 1e9:.0f} GB/s",
             "source": spec["source"]} for link, spec in measure.LINKS.items()]
    rows.append({"quantity": "H100 SXM, BF16 dense tensor peak / HBM3",
                 "value": f"{measure.H100.tensor_flop_per_s / 1e12:.1f} TFLOP/s / "
                          f"{measure.H100.hbm_bytes_per_s / 1e12:.2f} TB/s",
                 "source": measure.H100.source})
    rows.append({"quantity": "Mixtral 8x7B layer", "value": "D = 4096, F = 14336, E = 8, top-2, SwiGLU",
                 "source": "Jiang et al. 2024, Mixtral of Experts, Table 1"})
    return pd.DataFrame(rows)
