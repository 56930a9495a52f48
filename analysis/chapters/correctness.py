"""Tables, numbers and charts for the correctness chapter (book/notebooks/correctness.ipynb).

Everything here runs live on the CPU backends (``reference``, ``cpu``); the
tolerance is the project's one rule, ``topk_moe.testing`` (a result may have at
most twice the error of a plain implementation in its dtype, both against the
float64 reference, plus a floor of a few ulps of the summed terms). Dimension
letters as in the contract: T tokens, D model width, F expert hidden width,
E experts, K experts per token.

Every layer here is dropless (capacity_factor None), so that no token can take
another's place at an expert: batch invariance is then a property of the
arithmetic alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

import topk_moe
import topk_moe.testing
from analysis.display import Note

ACTIVATIONS = ("relu", "gelu", "swiglu")
DTYPES = ("float32", "float64")
TOP_KS = (1, 2)

# Okabe-Ito, colour-blind safe: the measured error, the plain error and the bound.
MEASURE_COLOURS = {"cpu error": "#0072B2", "plain error": "#009E73", "bound": "#D55E00"}


@dataclass(frozen=True)
class Case:
    """One dropless layer and its batch, in one dtype."""

    cfg: topk_moe.MoEConfig
    weights: topk_moe.MoEWeights
    x: np.ndarray  # (T, D)


def make_case(*, T: int, D: int, F: int, E: int, k: int, activation: str, seed: int,
              dtype="float32") -> Case:
    """Weights from topk_moe.init_weights in `dtype`; x standard normal (seeded (seed, 1)), cast to `dtype`."""
    cfg = topk_moe.MoEConfig(d_model=D, d_ff=F, n_experts=E, top_k=k, activation=activation)
    weights = topk_moe.init_weights(cfg, seed=seed, dtype=np.dtype(dtype))
    x = np.random.default_rng((seed, 1)).standard_normal((T, D)).astype(dtype)
    return Case(cfg=cfg, weights=weights, x=x)


def _max_abs(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# ---------------------------------------------------------------- (a) error per dtype


def error_table(*, T: int, D: int, F: int, E: int, seeds: Sequence[int],
                ks: Sequence[int] = TOP_KS, activations: Sequence[str] = ACTIVATIONS,
                dtypes: Sequence[str] = DTYPES, backend: str = "cpu") -> pd.DataFrame:
    """One row per (dtype, k, activation): the backend's largest error (column "cpu
    error" for the cpu backend, "<backend> error" for another) against the float64
    reference, the plain implementation's and the bound of topk_moe.testing, each the
    largest over `seeds`; `passed` when every seed was within its bound.

    The reference is routed like the cpu backend (topk_moe.testing's rule), so a
    near-tie that picks another expert in float32 does not count as error here;
    routing agreement is measured separately (routing_agreement)."""
    rows = []
    for dtype in dtypes:
        for k in ks:
            for activation in activations:
                error = plain_error = bound = 0.0
                passed = True
                for seed in seeds:
                    case = make_case(T=T, D=D, F=F, E=E, k=k, activation=activation, seed=seed, dtype=dtype)
                    out = topk_moe.moe_forward(case.x, case.weights, case.cfg, backend=backend)
                    expected = topk_moe.testing.expected_moe_forward(case.x, case.weights, case.cfg, out.routing)
                    plain = topk_moe.testing.plain_moe_forward(case.x, case.weights, case.cfg, out.routing)
                    scale = topk_moe.testing.moe_term_scale(case.x, case.weights, case.cfg, out.routing.experts)
                    case_bound = topk_moe.testing.error_bound(expected, plain, np.dtype(dtype), scale=scale)
                    case_error = _max_abs(topk_moe.testing.to_host(out.y), expected)
                    passed = passed and case_error <= case_bound
                    error = max(error, case_error)
                    plain_error = max(plain_error, _max_abs(plain, expected))
                    bound = max(bound, case_bound)
                rows.append({"dtype": dtype, "k": k, "activation": activation, f"{backend} error": error,
                             "plain error": plain_error, "bound": bound,
                             "error / bound": error / bound if bound else 0.0, "passed": passed})
    return pd.DataFrame(rows).set_index(["dtype", "k", "activation"])


def assert_errors_within_bound(table: pd.DataFrame, what: str = "cpu backend") -> None:
    """Fail the notebook (and so `make book`) when a case broke the tolerance rule."""
    failed = table.index[~table["passed"]].tolist()
    if failed:
        raise AssertionError(f"{what} outside the topk_moe.testing bound: {failed}")


# ---------------------------------------------------------------- (a') the CUDA kernels under CPU emulation

EMULATED_BACKEND = "cuda-emulated"
EMULATED_DTYPES = ("float32", "float16")


def emulated_error_table(*, T: int, D: int, F: int, E: int, seeds: Sequence[int]) -> Optional[pd.DataFrame]:
    """The error table of the real CUDA kernels run by the CPU emulator
    (kernels/topk_moe/cuda/emulator, backend "cuda-emulated") in float32 and float16: CPU
    emulation, not GPU results. None where the emulator cannot run (no C++ compiler)."""
    if EMULATED_BACKEND not in topk_moe.available_backends():
        return None
    table = error_table(T=T, D=D, F=F, E=E, seeds=seeds, dtypes=EMULATED_DTYPES, backend=EMULATED_BACKEND)
    return table.rename(columns={f"{EMULATED_BACKEND} error": "error (CPU emulation)"})


def emulated_error_text(table: Optional[pd.DataFrame]) -> str:
    """One sentence on the emulated cases, for the prose."""
    if table is None:
        from topk_moe.backends import emulator_unavailable_reason

        return f"The CPU emulator of the CUDA kernels cannot run here: {emulator_unavailable_reason()}."
    worst = float(table["error / bound"].max())
    return (f"{int(table['passed'].sum())} of {len(table)} cases are within the bound under CPU emulation; "
            f"the largest error is {worst:.3g} of its bound. These are CPU results of the CUDA source, "
            f"not GPU results.")


def error_numbers(table: pd.DataFrame) -> dict:
    """For the prose: cases, how many passed, and the largest error/bound ratio per dtype."""
    numbers = {"n_cases": int(len(table)), "n_passed": int(table["passed"].sum())}
    for dtype in DTYPES:
        part = table.xs(dtype, level="dtype") if dtype in table.index.get_level_values("dtype") else None
        numbers[f"{dtype}_max_error"] = float(part["cpu error"].max()) if part is not None else float("nan")
        numbers[f"{dtype}_max_ratio"] = float(part["error / bound"].max()) if part is not None else float("nan")
    return numbers


def error_chart(table: pd.DataFrame) -> alt.TopLevelMixin:
    """Error, plain error and bound per case on a log axis, one panel per dtype.
    Exact zeros have no place on a log axis and are left out (the table shows them)."""
    long = table.reset_index().melt(id_vars=["dtype", "k", "activation"],
                                    value_vars=list(MEASURE_COLOURS), var_name="measure", value_name="value")
    long["case"] = "k=" + long["k"].astype(str) + " " + long["activation"]
    long = long[long["value"] > 0]
    return alt.Chart(long).mark_point(filled=True, size=60).encode(
        x=alt.X("case:N", title=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("value:Q", title="max |y - y_ref64|", scale=alt.Scale(type="log")),
        # Colour and shape share field, title and domain, so Vega-Lite draws one legend for both.
        color=alt.Color("measure:N", title="measure", legend=alt.Legend(orient="top"),
                        scale=alt.Scale(domain=list(MEASURE_COLOURS), range=list(MEASURE_COLOURS.values()))),
        shape=alt.Shape("measure:N", title="measure", legend=alt.Legend(orient="top"),
                        scale=alt.Scale(domain=list(MEASURE_COLOURS))),
        column=alt.Column("dtype:N", title=None),
    ).properties(width=260, height=220, title="Error against the float64 reference, per case (log axis)"
                 ).resolve_scale(y="independent")


def bound_explanation(table: Optional[pd.DataFrame], error_column: str = "error (CPU emulation)") -> str:
    """Why a bound can be far above its error: the bound of the case with the smallest
    error/bound split into its two terms (twice the plain implementation's error, and the
    floor), from the table's own columns."""
    if table is None or table.empty:
        return ""
    row = table.sort_values("error / bound").iloc[0]
    dtype, k, activation = row.name
    plain_term = 2 * row["plain error"]
    floor = row["bound"] - plain_term
    start = (f"The loosest bound is {dtype}, k = {k}, {activation}: {row['bound']:.3g} for an error of "
             f"{row[error_column]:.3g}. It is {plain_term:.3g}, twice the plain {dtype} implementation's error, "
             f"plus a floor of {floor:.3g}.")
    if plain_term >= floor:
        return (start + f" The plain code adds its terms in {dtype}, while the kernels accumulate in float32, so "
                f"the kernels are far inside a bound set by naive {dtype} code.")
    eps = float(np.finfo(dtype).eps)
    scale = floor / (topk_moe.testing.FLOOR_ULPS * eps)
    return (start + f" The floor sets it: {topk_moe.testing.FLOOR_ULPS:g} {dtype} epsilons times the largest sum "
            f"of absolute terms added into one output, {scale:.3g} here. Those terms cancel into much smaller "
            f"outputs, so the floor is loose; scaling it per output element would tighten it.")


# ---------------------------------------------------------------- (b) routing agreement


def top_k_margins(logits: np.ndarray, k: int) -> np.ndarray:
    """Per token, the smallest gap between consecutive sorted logits among the first k+1:
    how far the ordered top-k choice is from a tie (float64)."""
    ordered = -np.sort(-np.asarray(logits, dtype=np.float64), axis=1)[:, :k + 1]
    return np.min(ordered[:, :-1] - ordered[:, 1:], axis=1)


def routing_agreement(*, T: int, D: int, E: int, k: int, seed: int) -> pd.DataFrame:
    """Per token: whether the cpu backend in float32 chose the same experts, in the same
    order, as the reference in float64 on the same (float32) values, and its top-k margin
    in the float64 logits."""
    case = make_case(T=T, D=D, F=1, E=E, k=k, activation="relu", seed=seed, dtype="float32")
    router = case.weights.router
    cpu = topk_moe.route(case.x, router, k, backend="cpu")
    x64, router64 = case.x.astype(np.float64), router.astype(np.float64)
    reference = topk_moe.route(x64, router64, k, backend="reference")
    same = np.all(np.asarray(cpu.experts) == np.asarray(reference.experts), axis=1)
    return pd.DataFrame({"token": np.arange(T), "agree": same, "margin": top_k_margins(x64 @ router64, k)})


def agreement_summary(agreement: pd.DataFrame) -> dict:
    """For the prose: tokens, disagreements, the agreeing fraction, and margins of the
    disagreeing tokens against all tokens (None where there is no disagreement)."""
    disagree = agreement.loc[~agreement["agree"], "margin"]
    return {
        "n_tokens": int(len(agreement)),
        "n_disagree": int(len(disagree)),
        "agree_fraction": float(agreement["agree"].mean()) if len(agreement) else 1.0,
        "max_disagree_margin": float(disagree.max()) if len(disagree) else None,
        "median_margin": float(agreement["margin"].median()) if len(agreement) else None,
        "min_margin": float(agreement["margin"].min()) if len(agreement) else None,
        # where the largest disagreeing margin sits among all tokens' margins
        "disagree_margin_quantile": (float((agreement["margin"] <= disagree.max()).mean())
                                     if len(disagree) else None),
    }


def agreement_text(summary: dict) -> str:
    """One sentence on the disagreements, true whether there are any or not."""
    if summary["n_disagree"] == 0:
        return (f"No token disagreed; the smallest top-k margin among these tokens was "
                f"{summary['min_margin']:.2e}, against a median of {summary['median_margin']:.2e}.")
    return (f"Every disagreeing token had a top-k margin of at most {summary['max_disagree_margin']:.2e}, "
            f"against a median of {summary['median_margin']:.2e} over all tokens: they lie in the smallest "
            f"{100 * summary['disagree_margin_quantile']:.3g}% of margins, near-ties that float32 rounding "
            f"can flip.")


def agreement_frame(*, T: int, D: int, E: int, seeds: Sequence[int], ks: Sequence[int] = TOP_KS) -> pd.DataFrame:
    """routing_agreement for every seed and k, stacked, with `seed` and `k` columns."""
    parts = [routing_agreement(T=T, D=D, E=E, k=k, seed=seed).assign(seed=seed, k=k)
             for k in ks for seed in seeds if k <= E]
    return pd.concat(parts, ignore_index=True)


def agreement_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per k: tokens, disagreements, agreeing fraction and the margins."""
    rows = []
    for k, part in frame.groupby("k"):
        summary = agreement_summary(part)
        rows.append({"k": k, "tokens": summary["n_tokens"], "disagreeing": summary["n_disagree"],
                     "agreeing fraction": summary["agree_fraction"],
                     "largest disagreeing margin": summary["max_disagree_margin"],
                     "median margin (all)": summary["median_margin"],
                     "smallest margin (all)": summary["min_margin"]})
    return pd.DataFrame(rows).set_index("k")


def margin_chart(frame: pd.DataFrame, bins: int = 40) -> alt.TopLevelMixin:
    """Per k, a histogram of the log10 top-k margins of all tokens (grey), with each
    disagreeing token as a vermilion rule at its margin."""
    frame = frame.assign(log_margin=np.log10(frame["margin"].clip(lower=1e-12)))
    edges = np.linspace(float(frame["log_margin"].min()), float(frame["log_margin"].max()) + 1e-9, bins + 1)
    panels = []
    for k, part in frame.groupby("k"):
        hist, _ = np.histogram(part["log_margin"], bins=edges)
        counts = pd.DataFrame({"start": edges[:-1], "end": edges[1:], "tokens": hist})
        layers = [alt.Chart(counts).mark_bar(color="#999999").encode(
            x=alt.X("start:Q", title="log10 top-k margin (float64 logits)"), x2="end:Q",
            y=alt.Y("tokens:Q", title="tokens"))]
        flipped = part.loc[~part["agree"], ["log_margin"]]
        if len(flipped):
            layers.append(alt.Chart(flipped).mark_rule(color="#D55E00", strokeWidth=2).encode(x="log_margin:Q"))
        # Promise the vermilion lines only where some are drawn.
        title = (f"k = {k}: {len(flipped)} disagreeing token(s) (vermilion)" if len(flipped)
                 else f"k = {k}: every token agrees")
        panels.append(alt.layer(*layers).properties(width=300, height=200, title=title))
    return alt.hconcat(*panels)


# ---------------------------------------------------------------- (c) determinism


def _differing_bits(a: np.ndarray, b: np.ndarray) -> tuple:
    """(elements that differ bitwise, bits that differ) between two equal-shaped arrays."""
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    as_bytes_a = a.view(np.uint8).reshape(a.size, -1) if a.size else np.zeros((0, 1), np.uint8)
    as_bytes_b = b.view(np.uint8).reshape(b.size, -1) if b.size else np.zeros((0, 1), np.uint8)
    xor = np.bitwise_xor(as_bytes_a, as_bytes_b)
    bits = int(np.unpackbits(xor).sum()) if xor.size else 0
    return int(np.count_nonzero(xor.any(axis=1))), bits


def determinism_table(*, T: int, D: int, F: int, E: int, seed: int, repeats: int = 3,
                      k: int = 2, activation: str = "swiglu", dtypes: Sequence[str] = DTYPES) -> pd.DataFrame:
    """Run the cpu backend `repeats` times on the same inputs; per dtype, the elements
    and bits of y, routing weights and experts that differ from the first run."""
    rows = []
    for dtype in dtypes:
        case = make_case(T=T, D=D, F=F, E=E, k=k, activation=activation, seed=seed, dtype=dtype)
        runs = [topk_moe.moe_forward(case.x, case.weights, case.cfg, backend="cpu") for _ in range(repeats)]
        first = runs[0]
        elements = bits = 0
        for run in runs[1:]:
            for a, b in ((run.y, first.y), (run.routing.weights, first.routing.weights),
                         (run.routing.experts, first.routing.experts)):
                e, n = _differing_bits(np.asarray(a), np.asarray(b))
                elements += e
                bits += n
        rows.append({"dtype": dtype, "runs": repeats, "elements compared": int(
            (repeats - 1) * (first.y.size + np.asarray(first.routing.weights).size + np.asarray(first.routing.experts).size)),
            "differing elements": elements, "differing bits": bits})
    return pd.DataFrame(rows).set_index("dtype")


# ---------------------------------------------------------------- (d) batch invariance


def batch_invariance_table(*, T: int, D: int, F: int, E: int, seed: int, batch_sizes: Sequence[int],
                           probes: int = 4, k: int = 2, activation: str = "swiglu",
                           dtypes: Sequence[str] = DTYPES) -> pd.DataFrame:
    """The first `probes` tokens run alone (T = 1), then each inside a batch of n tokens
    (itself plus the next n - 1 of a T-token pool, wrapping); per dtype and n, the largest
    difference of its y from the alone run and how many of its elements differ in any bit."""
    rows = []
    for dtype in dtypes:
        case = make_case(T=T, D=D, F=F, E=E, k=k, activation=activation, seed=seed, dtype=dtype)
        n_probes = min(probes, T)
        alone = [np.asarray(topk_moe.moe_forward(case.x[p:p + 1], case.weights, case.cfg, backend="cpu").y)[0]
                 for p in range(n_probes)]
        for n in batch_sizes:
            n = int(min(n, T))
            difference = 0.0
            differing = 0
            for p in range(n_probes):
                batch = np.ascontiguousarray(case.x[(p + np.arange(n)) % T])
                y = np.asarray(topk_moe.moe_forward(batch, case.weights, case.cfg, backend="cpu").y)[0]
                difference = max(difference, _max_abs(y, alone[p]))
                differing += _differing_bits(y, alone[p])[0]
            rows.append({"dtype": dtype, "batch size": n, "probe tokens": n_probes,
                         "max |y_batch - y_alone|": difference,
                         "differing elements": differing, "elements compared": n_probes * D})
    return pd.DataFrame(rows).set_index(["dtype", "batch size"])


def batch_invariance_numbers(table: pd.DataFrame) -> dict:
    """For the prose: the largest difference, and the batch sizes that changed any bit."""
    changed = table[table["differing elements"] > 0].reset_index()
    return {
        "max_difference": float(table["max |y_batch - y_alone|"].max()) if len(table) else 0.0,
        "n_settings": int(len(table)),
        "n_settings_changed": int(len(changed)),
        "verdict": ("bitwise batch-invariant at every batch size measured" if changed.empty else
                    "not bitwise batch-invariant: a token's output changed with its batch at "
                    + ", ".join(f"{row['dtype']} n={row['batch size']}" for _, row in changed.iterrows())),
    }


def gpu_tests_view(results_dir=None):
    """The newest committed gpu-tests record (make device-check) as a one-row table and a note,
    or (None, a note saying there is none)."""
    from analysis.measure.device_check import newest_gpu_check  # noqa: PLC0415

    record, same = newest_gpu_check(results_dir)
    if record is None:
        return None, Note("No GPU record", "No gpu-tests record is committed under results/ yet, so this "
                          "chapter can show no GPU result: test_batch_invariance has not been run on a GPU "
                          "for this code.")
    table = pd.DataFrame([{field: record.get(field) for field in
                           ("device", "utc", "passed", "failed", "errors", "skipped", "source_hash",
                            "git_commit", "git_dirty")}])
    note = Note("Newest committed GPU record",
                f"gpu-tests from {record.get('device')} on {str(record.get('utc', '?'))[:10]}: "
                f"{record.get('passed')} passed, {record.get('failed')} failed; "
                + ("made with these kernel sources." if same else
                   "made with other kernel sources than these (source hash differs)."))
    return table, note


def gpu_tests_text(table: Optional[pd.DataFrame]) -> str:
    """One sentence for the prose."""
    if table is None:
        return "No gpu-tests record has been committed yet, so there is no GPU result to show."
    row = table.iloc[0]
    return (f"The newest committed gpu-tests record ({row['device']}, {str(row['utc'])[:10]}) counts "
            f"{row['passed']} passed and {row['failed']} failed, source hash {str(row['source_hash'])[:12]}.")
