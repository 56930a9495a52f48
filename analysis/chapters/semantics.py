"""Tables, checks and the chart for the semantics chapter (book/notebooks/semantics.ipynb).

The chapter walks one tiny batch through route -> dispatch -> permute ->
expert MLPs -> combine. The kernels compute; this module only builds the
example's inputs and turns the kernels' results into tables a reader can
follow. Dimension letters as in the contract: T tokens, D model width, F expert
hidden width, E experts, K experts per token, C capacity, N kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import altair as alt
import numpy as np
import pandas as pd

import topk_moe
import topk_moe.testing

# Colour-blind-safe pair (Okabe-Ito): kept in blue, dropped in vermilion.
STATUS_COLOURS = {"kept": "#0072B2", "dropped": "#D55E00"}


@dataclass(frozen=True)
class Example:
    """One tiny MoE layer and a batch to push through it."""

    cfg: topk_moe.MoEConfig
    weights: topk_moe.MoEWeights
    x: np.ndarray  # (T, D) float32
    capacity: Optional[int]  # C, or None when dropless


def make_example(*, T: int, D: int, F: int, E: int, k: int, activation: str = "swiglu",
                 capacity_factor: Optional[float] = None, seed: int = 0) -> Example:
    """The chapter's layer (topk_moe.init_weights) and a standard-normal batch x (T, D).

    x is drawn from its own stream, seeded by (seed, 1), so that it is not a
    copy of the first numbers init_weights drew from `seed`.
    """
    cfg = topk_moe.MoEConfig(d_model=D, d_ff=F, n_experts=E, top_k=k,
                            activation=activation, capacity_factor=capacity_factor)
    weights = topk_moe.init_weights(cfg, seed=seed)
    x = np.random.default_rng((seed, 1)).standard_normal((T, D)).astype(np.float32)
    return Example(cfg=cfg, weights=weights, x=x, capacity=topk_moe.capacity(cfg, T))


def describe_capacity(capacity: Optional[int]) -> str:
    """C as prose: the number, or a note that nothing is dropped."""
    return "unlimited (dropless)" if capacity is None else str(int(capacity))


def config_table(example: Example) -> pd.DataFrame:
    """The example's parameters, one row each, with what they mean."""
    cfg = example.cfg
    T = example.x.shape[0]
    rows = [
        ("T", T, "tokens in the batch"),
        ("D", cfg.d_model, "model width"),
        ("F", cfg.d_ff, "hidden width of each expert"),
        ("E", cfg.n_experts, "experts"),
        ("k", cfg.top_k, "experts per token"),
        ("activation", cfg.activation, "expert nonlinearity"),
        ("renormalize", cfg.renormalize, "k weights divided by their sum"),
        ("capacity_factor", cfg.capacity_factor, "None: dropless"),
        ("C", describe_capacity(example.capacity), "ceil(capacity_factor * T * k / E)"),
    ]
    # Values of mixed types: show them as text so pandas keeps one column.
    return pd.DataFrame(
        [(name, str(value), meaning) for name, value, meaning in rows],
        columns=["parameter", "value", "meaning"],
    ).set_index("parameter")


def _assignments(routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> pd.DataFrame:
    """Every assignment (t, j) in j-major order: token, j, expert, weight, row (-1: dropped)."""
    experts = np.asarray(routing.experts)
    T, K = experts.shape
    # j-major: all first choices in token order, then all second choices.
    j = np.repeat(np.arange(K), T)
    token = np.tile(np.arange(T), K)
    return pd.DataFrame({
        "token": token,
        "j": j,
        "expert": experts.T.reshape(-1).astype(np.int64),
        "weight": np.asarray(routing.weights, dtype=np.float64).T.reshape(-1),
        "row": np.asarray(plan.row).T.reshape(-1).astype(np.int64),
    })


def routing_table(routing: topk_moe.Routing) -> pd.DataFrame:
    """The router's decision for each token and choice j (token-major).

    prob is the softmax probability of the chosen expert; weight is what
    combine uses (prob divided by the token's sum of chosen probs when
    renormalising).
    """
    experts = np.asarray(routing.experts)
    probs = np.asarray(routing.probs, dtype=np.float64)
    T, K = experts.shape
    token = np.repeat(np.arange(T), K)
    chosen = experts.reshape(-1).astype(np.int64)
    return pd.DataFrame({
        "token": token,
        "j": np.tile(np.arange(K), T),
        "expert": chosen,
        "prob": probs[token, chosen] if T else np.zeros(0),
        "weight": np.asarray(routing.weights, dtype=np.float64).reshape(-1),
    }).set_index(["token", "j"])


def weight_sum_error(routing: topk_moe.Routing) -> float:
    """Largest |sum_j weights[t, j] - 1| over tokens (0.0 for an empty batch)."""
    weights = np.asarray(routing.weights, dtype=np.float64)
    if weights.shape[0] == 0:
        return 0.0
    return float(np.max(np.abs(weights.sum(axis=1) - 1.0)))


def plan_summary(routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> pd.DataFrame:
    """Per expert: assignments routed to it, kept (plan.counts), dropped, and its
    rows offsets[e]:offsets[e+1] in the expert-sorted batch."""
    counts = np.asarray(plan.counts).astype(np.int64)
    offsets = np.asarray(plan.offsets).astype(np.int64)
    E = counts.shape[0]
    routed = np.bincount(np.asarray(routing.experts).reshape(-1), minlength=E).astype(np.int64)
    return pd.DataFrame({
        "expert": np.arange(E),
        "routed": routed,
        "kept (counts)": counts,
        "dropped": routed - counts,
        "first row (offsets[e])": offsets[:-1],
        "end row (offsets[e+1])": offsets[1:],
    }).set_index("expert")


def plan_rows(routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> pd.DataFrame:
    """The expert-sorted batch, one line per kept row: its expert, token and choice j."""
    kept = _assignments(routing, plan).query("row >= 0").sort_values("row", kind="stable")
    counts = np.asarray(plan.counts).astype(np.int64)
    table = pd.DataFrame({
        "row": kept["row"].to_numpy(),
        "expert": np.repeat(np.arange(counts.shape[0]), counts),
        "token": np.asarray(plan.token).astype(np.int64),
        "j": kept["j"].to_numpy(),
        "weight": kept["weight"].to_numpy(),
    })
    return table.set_index("row")


def dropped_assignments(routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> pd.DataFrame:
    """The assignments the capacity dropped (plan.row == -1), in j-major order."""
    dropped = _assignments(routing, plan).query("row < 0")
    return dropped[["token", "j", "expert", "weight", "row"]].reset_index(drop=True)


def dispatch_numbers(routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> dict:
    """Counts for the chapter's prose, as plain Python numbers (glue shows their repr)."""
    row = np.asarray(plan.row)
    T, K = row.shape
    n_dropped = int(np.count_nonzero(row < 0))
    return {
        "n_assignments": int(T * K),
        "n_kept": int(plan.n_kept),
        "n_dropped": n_dropped,
        "n_tokens_fully_dropped": int(np.count_nonzero(np.all(row < 0, axis=1))) if T else 0,
        "n_first_choices_dropped": int(np.count_nonzero(row[:, 0] < 0)) if T else 0,
    }


def expert_load(routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> pd.DataFrame:
    """Tokens routed to each expert, split into kept and dropped (long form, for the chart)."""
    summary = plan_summary(routing, plan)
    wide = pd.DataFrame({
        "expert": summary.index.to_numpy(),
        "kept": summary["kept (counts)"].to_numpy(),
        "dropped": summary["dropped"].to_numpy(),
    })
    return wide.melt(id_vars="expert", var_name="status", value_name="tokens")


def expert_load_chart(load: pd.DataFrame, capacity: Optional[int]) -> alt.TopLevelMixin:
    """Stacked bars of tokens per expert, kept below dropped, with the capacity C as a rule."""
    status_order = list(STATUS_COLOURS)
    load = load.assign(stack_order=load["status"].map(status_order.index))
    bars = alt.Chart(load).mark_bar().encode(
        x=alt.X("expert:O", title="expert", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("tokens:Q", title="tokens routed to the expert", stack="zero",
                axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("status:N", title=None,
                        scale=alt.Scale(domain=status_order, range=list(STATUS_COLOURS.values())),
                        legend=alt.Legend(orient="top")),
        order=alt.Order("stack_order:Q"),
    )
    chart = bars
    if capacity is not None:
        rule_data = pd.DataFrame({"capacity": [int(capacity)], "label": [f"capacity C = {int(capacity)}"]})
        rule = alt.Chart(rule_data).mark_rule(strokeDash=[4, 3], color="black").encode(y="capacity:Q")
        label = alt.Chart(rule_data).mark_text(align="left", dx=4, dy=-6, x=0).encode(
            y="capacity:Q", text="label:N")
        chart = alt.layer(bars, rule, label)
    return chart.properties(width=320, height=220, title="Tokens per expert")


def _max_abs_difference(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def formula_output(example: Example, routing: topk_moe.Routing, plan: topk_moe.DispatchPlan) -> np.ndarray:
    """y written straight from the contract, one token at a time:
    y[t] = sum over kept j of weights[t, j] * expert_{experts[t, j]}(x[t]),
    each expert evaluated with topk_moe.dense_mlp on the reference backend."""
    w = example.weights
    T, K = np.asarray(routing.experts).shape
    y = np.zeros(example.x.shape, dtype=np.float64)
    for t in range(T):
        for j in range(K):
            if plan.row[t, j] < 0:
                continue
            e = int(routing.experts[t, j])
            out = topk_moe.dense_mlp(example.x[t:t + 1], w.w1[e], w.w2[e],
                                    None if w.w3 is None else w.w3[e],
                                    activation=example.cfg.activation, backend="reference")
            y[t] += float(routing.weights[t, j]) * np.asarray(out, dtype=np.float64)[0]
    return y


def forward_checks(example: Example, routing: topk_moe.Routing, plan: topk_moe.DispatchPlan,
                   rows, y, forward: topk_moe.MoEOutput) -> pd.DataFrame:
    """The stage-by-stage results against topk_moe.moe_forward and the contract's formula.

    One line per check: what is compared, the largest difference (0 for
    integer arrays that must match exactly) and whether it passed.
    """
    x = np.asarray(example.x, dtype=np.float64)
    token = np.asarray(plan.token)
    row = np.asarray(plan.row)
    fully_dropped = np.all(row < 0, axis=1) if row.shape[0] else np.zeros(0, dtype=bool)

    def exact(a, b):
        return 0.0 if np.array_equal(np.asarray(a), np.asarray(b)) else float("inf")

    kept_t, kept_j = np.nonzero(row >= 0)
    checks = [
        ("routing.experts equals moe_forward's", exact(routing.experts, forward.routing.experts)),
        ("routing.weights equals moe_forward's", _max_abs_difference(routing.weights, forward.routing.weights)),
        ("plan.counts equals moe_forward's", exact(plan.counts, forward.plan.counts)),
        ("plan.offsets equals moe_forward's", exact(plan.offsets, forward.plan.offsets)),
        ("plan.token equals moe_forward's", exact(plan.token, forward.plan.token)),
        ("plan.row equals moe_forward's", exact(plan.row, forward.plan.row)),
        ("plan.token[row[t, j]] == t for every kept (t, j)", exact(token[row[kept_t, kept_j]], kept_t)),
        ("permuted rows equal x[plan.token]", _max_abs_difference(rows, x[token])),
        ("y equals moe_forward's y", _max_abs_difference(y, forward.y)),
        ("y equals the contract's formula", _max_abs_difference(y, formula_output(example, routing, plan))),
        ("y = 0 for tokens whose every assignment was dropped",
         _max_abs_difference(np.asarray(y)[fully_dropped], np.zeros((int(fully_dropped.sum()), x.shape[1])))),
    ]
    # The project's one tolerance rule (topk_moe.testing): both sides are the
    # float64 reference, so only its floor applies, a few ulps of the terms
    # summed into y; they may differ by summation order.
    allowed = topk_moe.testing.error_bound(
        forward.y, forward.y, np.float64,
        scale=topk_moe.testing.moe_term_scale(example.x, example.weights, example.cfg, routing.experts),
    )
    table = pd.DataFrame(checks, columns=["check", "max abs difference"])
    table["passed"] = table["max abs difference"] <= allowed
    return table.set_index("check")


def assert_checks_pass(checks: pd.DataFrame) -> None:
    """Fail the notebook (and so `make book`) when any check did not pass."""
    failed = checks.index[~checks["passed"]].tolist()
    if failed:
        raise AssertionError("semantics checks failed: " + "; ".join(failed))


def largest_difference(checks: pd.DataFrame) -> float:
    """The largest difference over all checks, for the chapter's prose."""
    return float(checks["max abs difference"].max())


def validate_parameters(*, T, D, F, E, k, activation, capacity_factor, seed) -> None:
    """The chapter's parameters, one clear sentence each (ValueError)."""
    for name, value, smallest in (("T", T, 0), ("D", D, 1), ("F", F, 1), ("E", E, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < smallest:
            raise ValueError(f"{name}: expected an integer >= {smallest}, got {value!r}")
    if k not in (1, 2) or isinstance(k, bool):
        raise ValueError(f"k: expected 1 or 2, got {k!r}")
    if k > E:
        raise ValueError(f"k: expected at most E = {E}, got {k}")
    if activation not in ("relu", "gelu", "swiglu"):
        raise ValueError(f"activation: expected 'relu', 'gelu' or 'swiglu', got {activation!r}")
    if capacity_factor is not None and (isinstance(capacity_factor, bool)
                                        or not isinstance(capacity_factor, (int, float))
                                        or not capacity_factor > 0 or capacity_factor == float("inf")):
        raise ValueError(f"capacity_factor: expected None or a finite number > 0, got {capacity_factor!r}")


def shape_text(array) -> str:
    """An array's shape as the prose writes it: "(20, 8): 20 rows of width 8"."""
    rows, width = array.shape
    return f"({rows}, {width}): {rows} rows of width {width}"
