"""Tables and charts for the routing-behaviour chapter (book/notebooks/routing.ipynb).

The trained MoE checkpoints are run over a sample of the test split spread over
every test file (evaluation.spread_starts); each MoE layer's routing decisions
(accuracy.collect_routing) go through the metrics of
analysis.study.routing_stats. Expert identities are arbitrary per seed (expert 3 of
seed 0 has nothing to do with expert 3 of seed 1), so per-expert pictures
(specialisation, co-activation) show one seed, and only expert-agnostic
numbers (CV, max/mean, entropy, rates) are averaged over seeds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

from analysis.chapters import accuracy, published
from analysis.display import Note
from analysis.study import corpus
from analysis.study import routing_stats as stats
from analysis.study.moe_model import load_checkpoint

MOE_ARMS = ("moe-k1", "moe-k2-half", "moe-k2", "moe-k1-nobal", "moe-k2-half-nobal")
ABLATION_PAIRS = (("moe-k1", "moe-k1-nobal"), ("moe-k2-half", "moe-k2-half-nobal"))


def check_parameters(*, preset: str, scratch: bool, scores, routing_bytes: int) -> None:
    """Stop the chapter at once on a bad papermill parameter, with one sentence saying which."""
    accuracy.check_parameters(preset=preset, scratch=scratch, scores=scores, experiment_bytes=256, check_bytes=256)
    if isinstance(routing_bytes, bool) or not isinstance(routing_bytes, int) or routing_bytes < 256:
        raise ValueError(f"routing_bytes: expected a whole number of bytes, at least 256, got {routing_bytes!r}")


def moe_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["ffn"] == "moe"].reset_index(drop=True)


def collect_all(runs: pd.DataFrame, *, max_bytes: int, sample: str = "spread") -> dict:
    """(arm, seed) -> the routing of every MoE layer on `max_bytes` test bytes spread over
    every test file (``sample``: evaluation.SAMPLES), plus the model's E, K and tokens per
    training batch."""
    data = corpus.load_corpus()["test"]
    collected = {}
    for run in moe_runs(runs).itertuples():
        model, meta = load_checkpoint(run.checkpoint)
        routing = accuracy.collect_routing(model, data, batch_size=meta["batch_size"], max_bytes=max_bytes,
                                           sample=sample)
        routing.update({"n_experts": model.cfg.n_experts, "top_k": model.cfg.top_k,
                        "tokens_per_call": meta["batch_size"] * model.cfg.seq_len})
        collected[(run.arm, run.seed)] = routing
    return collected


def metrics_table(collected: dict) -> pd.DataFrame:
    """One row per (arm, seed, layer): load CV (whole sample, and per batch: mean and std
    over batches, with its bound sqrt(E / K - 1)), max/mean, sum of squared load, router
    entropy against log E, same-expert rate of consecutive bytes (all pairs, pairs of
    equal bytes, pairs of different bytes) against chance from the load, and the K = 2 metrics."""
    rows = []
    for (arm, seed), routing in collected.items():
        E, K = routing["n_experts"], routing["top_k"]
        batches = routing.get("batch", np.zeros(len(routing["sequence"]), dtype=np.int64))
        for layer, (experts, weights, probs) in enumerate(zip(routing["experts"], routing["weights"],
                                                              routing["probs"])):
            load = stats.load_fraction(experts, E)
            per_batch = stats.per_batch_cv(experts, batches, E)
            by_pair = stats.same_expert_by_byte_pair(experts, routing["bytes"], routing["sequence"])
            row = {"arm": arm, "seed": seed, "layer": layer, "k": K, "n_experts": E,
                   "load_cv": stats.coefficient_of_variation(load),
                   "batch_cv_mean": float(per_batch.mean()), "batch_cv_std": float(per_batch.std()),
                   "n_batches": int(per_batch.size), "max_cv": stats.max_cv(E, K),
                   "load_max_over_mean": stats.max_over_mean(load),
                   "sum_squared_load": stats.sum_squared_load(load), "top_expert_share": float(load.max() * K),
                   "entropy": stats.mean_entropy(probs), "log_E": math.log(E),
                   "same_expert_rate": stats.same_expert_rate(experts, routing["sequence"]),
                   "same_byte_share": by_pair["same_byte_share"], "space_pair_share": by_pair["space_pair_share"],
                   "same_expert_same_bytes": by_pair["rate_same_bytes"],
                   "same_expert_different_bytes": by_pair["rate_different_bytes"],
                   "same_expert_uniform": stats.random_same_expert_rate(E),
                   "same_expert_by_load": stats.random_same_expert_rate(E, stats.load_fraction(experts[:, 0], E))}
            if K == 2:
                row["second_weight_share"] = stats.second_weight_share(weights)
                row["shared_expert_rate"] = stats.shared_expert_rate(experts, routing["sequence"])
                row["shared_expert_uniform"] = stats.random_shared_expert_rate(E)
            rows.append(row)
    table = pd.DataFrame(rows)
    table["entropy_over_log_E"] = table["entropy"] / table["log_E"]
    return table


def metrics_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per arm and layer: each metric's mean and std over seeds."""
    columns = [c for c in ("load_cv", "batch_cv_mean", "load_max_over_mean", "sum_squared_load", "entropy",
                           "entropy_over_log_E", "same_expert_rate", "same_expert_different_bytes",
                           "same_expert_same_bytes", "same_byte_share", "same_expert_by_load",
                           "second_weight_share", "shared_expert_rate") if c in table]
    summary = accuracy.mean_std(table, ["arm", "layer"], columns)
    summary["arm_rank"] = summary["arm"].map(accuracy.ARM_ORDER.index)
    return summary.sort_values(["arm_rank", "layer"]).drop(columns="arm_rank").reset_index(drop=True)


def format_metrics(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-layer summary as the book prints it (mean ± std over seeds)."""
    def pm(column, digits=3):
        if f"{column}_mean" not in summary:
            return [""] * len(summary)
        return [("" if pd.isna(m) else f"{m:.{digits}f} ± {0 if pd.isna(s) else s:.{digits}f}")
                for m, s in zip(summary[f"{column}_mean"], summary[f"{column}_std"])]

    return pd.DataFrame({
        "arm": summary["arm"], "layer": summary["layer"],
        "load CV per batch": pm("batch_cv_mean"), "load max/mean": pm("load_max_over_mean"),
        "entropy / log E": pm("entropy_over_log_E"),
        "same expert, consecutive bytes": pm("same_expert_rate"),
        "same expert, different bytes": pm("same_expert_different_bytes"),
        "chance (from load)": pm("same_expert_by_load"),
        "2nd-expert weight share": pm("second_weight_share"),
        "seeds": summary["n_seeds"],
    })


def arm_averages(table: pd.DataFrame) -> pd.DataFrame:
    """Per arm: metrics averaged over layers, then mean ± std over seeds."""
    per_seed = table.groupby(["arm", "seed"], as_index=False).mean(numeric_only=True)
    columns = [c for c in ("load_cv", "batch_cv_mean", "batch_cv_std", "max_cv", "load_max_over_mean",
                           "sum_squared_load", "entropy_over_log_E", "same_expert_rate",
                           "same_expert_different_bytes", "same_expert_same_bytes", "same_byte_share",
                           "space_pair_share", "same_expert_by_load", "second_weight_share") if c in per_seed]
    return accuracy.mean_std(per_seed, ["arm"], columns)


def n_experts(table: pd.DataFrame) -> int:
    """E of the routing in `table` (metrics_table): the one value every run shares."""
    values = sorted({int(e) for e in table["n_experts"]})
    if len(values) != 1:
        raise ValueError(f"n_experts: expected one E over the runs, got {values}")
    return values[0]


def headline_numbers(table: pd.DataFrame) -> dict:
    """Plain numbers for the chapter's prose (glue), E taken from the runs in `table`."""
    averages = arm_averages(table).set_index("arm")
    E = n_experts(table)
    numbers = {"n_experts": E, "uniform_same_expert": 1.0 / E, "log_E": math.log(E),
               "max_cv_k1": stats.max_cv(E, 1), "max_cv_k2": stats.max_cv(E, 2)}
    for arm in averages.index:
        key = arm.replace("-", "_")
        for column in ("load_cv", "batch_cv_mean", "batch_cv_std", "load_max_over_mean", "same_expert_rate",
                       "same_expert_different_bytes", "same_expert_same_bytes", "same_byte_share",
                       "space_pair_share", "same_expert_by_load", "entropy_over_log_E"):
            if f"{column}_mean" in averages:
                numbers[f"{key}_{column}"] = float(averages.loc[arm, f"{column}_mean"])
        if "second_weight_share_mean" in averages and not pd.isna(averages.loc[arm, "second_weight_share_mean"]):
            numbers[f"{key}_second_weight_share"] = float(averages.loc[arm, "second_weight_share_mean"])
    return numbers


def first_run(collected: dict, arm: str):
    """The lowest seed's routing of `arm`, or None when the arm was not trained."""
    seeds = sorted(seed for a, seed in collected if a == arm)
    return (seeds[0], collected[(arm, seeds[0])]) if seeds else (None, None)


def specialisation_frame(routing: dict, layer: int) -> pd.DataFrame:
    """Long form (byte class, expert, share of the class's assignments, tokens of the class)."""
    classes = stats.byte_classes(routing["bytes"])
    matrix = stats.specialisation(routing["experts"][layer], classes, routing["n_experts"])
    class_counts = np.bincount(classes, minlength=len(stats.BYTE_CLASSES))
    rows = []
    for c, name in enumerate(stats.BYTE_CLASSES):
        for e in range(routing["n_experts"]):
            rows.append({"byte class": f"{name} ({class_counts[c]})", "expert": e, "share": matrix[c, e],
                         "relative to 1/E": matrix[c, e] * routing["n_experts"]})
    return pd.DataFrame(rows).dropna()


def _heatmap(frame: pd.DataFrame, y: str, value: str, midpoint: float, title: str, y_sort=None):
    """Cells coloured around `midpoint` (white), each labelled with its value (in white
    on the darkest cells, where black would not read)."""
    low, high = float(frame[value].min()), float(frame[value].max())
    frame = frame.assign(dark=(frame[value] < midpoint - 0.6 * (midpoint - low))
                         | (frame[value] > midpoint + 0.6 * (high - midpoint)))
    base = alt.Chart(frame).encode(x=alt.X("expert:O", title="expert", axis=alt.Axis(labelAngle=0)),
                                   y=alt.Y(f"{y}:N", title=None, sort=y_sort, axis=alt.Axis(labelLimit=220)))
    cells = base.mark_rect().encode(color=alt.Color(
        f"{value}:Q", title=value, scale=alt.Scale(scheme="blueorange", domainMid=midpoint)))
    text = base.mark_text(fontSize=12).encode(
        text=alt.Text(f"{value}:Q", format=".2f"),
        color=alt.condition(alt.datum.dark, alt.value("#FFFFFF"), alt.value("#000000")))
    return alt.layer(cells, text).properties(width=440, height=alt.Step(30), title=title)


def specialisation_chart(frame: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """Share of each byte class's assignments per expert, in units of 1/E (1 = no preference)."""
    return _heatmap(frame, "byte class", "relative to 1/E", 1.0, title,
                    y_sort=list(dict.fromkeys(frame["byte class"])))


def coactivation_frame(routing: dict, layer: int) -> pd.DataFrame:
    matrix = stats.coactivation(routing["experts"][layer], routing["n_experts"])
    E = routing["n_experts"]
    return pd.DataFrame([{"given expert a": f"a = {a}", "expert": b, "P(b | a)": matrix[a, b]}
                         for a in range(E) for b in range(E)]).dropna()


def coactivation_chart(frame: pd.DataFrame, n_experts: int, title: str) -> alt.TopLevelMixin:
    """P(b | a) with its midpoint at 1/(E-1), the value if the second expert were random."""
    return _heatmap(frame, "given expert a", "P(b | a)", 1.0 / (n_experts - 1), title,
                    y_sort=[f"a = {a}" for a in range(n_experts)])


def _not_trained(arm: str) -> alt.TopLevelMixin:
    return alt.Chart(pd.DataFrame({"text": [f"{arm}: not trained"]})).mark_text().encode(text="text:N").properties(
        width=260, height=40)


def specialisation_charts(collected: dict, arm: str) -> alt.TopLevelMixin:
    """Specialisation heatmaps of every layer of `arm`'s lowest seed, side by side."""
    seed, routing = first_run(collected, arm)
    if routing is None:
        return _not_trained(arm)
    return alt.vconcat(*[specialisation_chart(specialisation_frame(routing, layer),
                                              f"{arm} seed {seed}, layer {layer}")
                         for layer in range(len(routing["experts"]))]).resolve_scale(color="shared")


def coactivation_charts(collected: dict, arm: str) -> alt.TopLevelMixin:
    """Co-activation heatmaps P(b | a) of every layer of `arm`'s lowest seed (K = 2)."""
    seed, routing = first_run(collected, arm)
    if routing is None or routing["top_k"] != 2:
        return _not_trained(arm)
    return alt.vconcat(*[coactivation_chart(coactivation_frame(routing, layer), routing["n_experts"],
                                            f"{arm} seed {seed}, layer {layer}")
                         for layer in range(len(routing["experts"]))]).resolve_scale(color="shared")


def load_over_training(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, seed, step, layer): load CV and max/mean of the training batches since the last log."""
    rows = []
    for record in curves.dropna(subset=["load_fraction"]).itertuples():
        for layer, load in enumerate(record.load_fraction):
            rows.append({"arm": record.arm, "seed": record.seed, "step": record.step, "tokens": record.tokens,
                         "layer": layer, "load_cv": stats.coefficient_of_variation(load),
                         "load_max_over_mean": stats.max_over_mean(load)})
    return pd.DataFrame(rows)


def load_over_training_chart(load: pd.DataFrame, arms: Sequence[str] = MOE_ARMS) -> alt.TopLevelMixin:
    """Max/mean expert load during training, per layer, mean over seeds, per arm."""
    data = load[load["arm"].isin(arms)].groupby(["arm", "layer", "tokens"], as_index=False)["load_max_over_mean"].mean()
    data, colour = _readable_arms(data)
    lines = alt.Chart(data).mark_line().encode(
        x=alt.X("tokens:Q", title="training bytes seen"),
        y=alt.Y("load_max_over_mean:Q", title="max/mean expert load", scale=alt.Scale(zero=False)),
        color=colour)
    return lines.properties(width=220, height=180).facet(column=alt.Column("layer:O", title="layer")).properties(
        title="Load imbalance over training (1 = balanced, E = all on one expert)")


def _readable_arms(data: pd.DataFrame) -> tuple:
    """``data`` with each arm under its readable name (accuracy.ARM_LABELS), and the colour
    encoding that keeps every arm's colour of the Accuracy chapter."""
    present = [a for a in accuracy.ARM_ORDER if a in set(data["arm"])]
    labels = [accuracy.arm_label(a) for a in present]
    colour = alt.Color("arm:N", sort=labels, title="arm", legend=alt.Legend(labelLimit=320), scale=alt.Scale(
        domain=labels, range=[accuracy.ARM_COLOURS[accuracy.ARM_ORDER.index(a)] for a in present]))
    return data.assign(arm=data["arm"].map(accuracy.arm_label)), colour


def drop_rate_table(collected: dict, factors: Sequence = accuracy.CAPACITY_FACTORS) -> pd.DataFrame:
    """Per (arm, seed, layer, capacity factor): the share of the layer's assignments that
    topk_moe.dispatch would drop with that capacity, calls of one training batch each."""
    rows = []
    for (arm, seed), routing in collected.items():
        for layer, experts in enumerate(routing["experts"]):
            for factor in factors:
                if factor is None:
                    continue
                rows.append({"arm": arm, "seed": seed, "layer": layer, "k": routing["top_k"],
                             "capacity_factor": factor,
                             "drop_rate": stats.drop_rate(experts, routing["n_experts"], factor,
                                                          routing["tokens_per_call"])})
    return pd.DataFrame(rows)


def drop_rate_chart(drops: pd.DataFrame) -> alt.TopLevelMixin:
    data = drops.groupby(["arm", "layer", "capacity_factor"], as_index=False)["drop_rate"].mean()
    data, colour = _readable_arms(data)
    chart = alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("capacity_factor:Q", title="capacity factor", scale=alt.Scale(type="log")),
        y=alt.Y("drop_rate:Q", title="assignments dropped", axis=alt.Axis(format="%")),
        color=colour)
    return chart.properties(width=220, height=180).facet(column=alt.Column("layer:O", title="layer")).properties(
        title="Drop rate against capacity factor (topk_moe.dispatch, one call per training batch)")


def ablation_table(table: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Each balanced arm beside the same arm trained without the balancing loss: per-batch
    load CV, max/mean (averaged over layers, mean ± std over seeds), the most collapsed
    layer's CV, and the test loss's paired difference (ablated minus balanced, by seed)."""
    averages = arm_averages(table).set_index("arm")
    per_layer = table.groupby(["arm", "layer"])["batch_cv_mean"].mean()
    comparisons = accuracy.paired_comparisons(scores).set_index("arm")
    loss = accuracy.mean_std(scores, ["arm"], ["bits_per_byte"]).set_index("arm")
    rows = []
    for balanced, ablated in ABLATION_PAIRS:
        for arm, balance in ((balanced, "yes"), (ablated, "no")):
            if arm not in averages.index:
                continue
            difference = ""
            if balance == "no" and arm in comparisons.index:
                c = comparisons.loc[arm]
                difference = (f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] "
                              f"({'supported' if c['supported'] else 'within noise'}, {c['n']} seeds)")
            rows.append({"arm": accuracy.arm_label(arm),
                         "load CV per batch": f"{averages.loc[arm, 'batch_cv_mean_mean']:.2f} ± "
                                              f"{np.nan_to_num(averages.loc[arm, 'batch_cv_mean_std']):.2f}",
                         "CV, most uneven layer (bound)": f"{per_layer.loc[arm].max():.2f} "
                                                          f"({averages.loc[arm, 'max_cv_mean']:.2f})",
                         "load max/mean": f"{averages.loc[arm, 'load_max_over_mean_mean']:.2f} ± "
                                          f"{np.nan_to_num(averages.loc[arm, 'load_max_over_mean_std']):.2f}",
                         "test bits/byte": f"{loss.loc[arm, 'bits_per_byte_mean']:.4f} ± "
                                           f"{np.nan_to_num(loss.loc[arm, 'bits_per_byte_std']):.4f}",
                         "vs balanced, paired [95% interval]": difference})
    return pd.DataFrame(rows)


def collapse_numbers(table: pd.DataFrame, arm: str = "moe-k1-nobal") -> dict:
    """Glue: the most collapsed layer of `arm` (highest load CV over the whole sample,
    mean over seeds): its CV, the bound sqrt(E / K - 1), the sum of squared load, the share
    of the busiest expert, and the same for the most collapsed single seed."""
    rows = table[table["arm"] == arm]
    if rows.empty:
        return {"collapse_arm": arm, "collapse_layer": "not trained", "collapse_cv": float("nan"),
                "collapse_bound": float("nan"), "collapse_sum_squared": float("nan"),
                "collapse_top_share": float("nan"), "collapse_seed_cv": float("nan"), "collapse_seed": "none",
                "collapse_seed_layer": "none", "collapse_seed_sum_squared": float("nan"),
                "collapse_seed_top_share": float("nan")}
    by_layer = rows.groupby("layer")[["load_cv", "sum_squared_load", "top_expert_share", "max_cv"]].mean()
    layer = int(by_layer["load_cv"].idxmax())
    worst = rows.loc[rows["load_cv"].idxmax()]
    return {"collapse_arm": arm, "collapse_layer": layer, "collapse_cv": float(by_layer.loc[layer, "load_cv"]),
            "collapse_bound": float(by_layer.loc[layer, "max_cv"]),
            "collapse_sum_squared": float(by_layer.loc[layer, "sum_squared_load"]),
            "collapse_top_share": float(by_layer.loc[layer, "top_expert_share"]),
            "collapse_seed_cv": float(worst["load_cv"]), "collapse_seed": int(worst["seed"]),
            "collapse_seed_layer": int(worst["layer"]),
            "collapse_seed_sum_squared": float(worst["sum_squared_load"]),
            "collapse_seed_top_share": float(worst["top_expert_share"])}


def coverage_numbers(collected: dict) -> dict:
    """Glue: what the routing sample covers (the same windows for every run)."""
    for routing in collected.values():
        coverage = routing["coverage"]
        return {"routing_positions": f"{routing['bytes'].size:,}", "routing_windows": coverage["n_windows"],
                "routing_files": coverage["files_touched"], "routing_split_files": coverage["n_files"],
                "routing_largest_file_share": coverage["largest_file_share_of_inputs"],
                "routing_share_of_split": coverage["share_of_split"]}
    return {"routing_positions": "0", "routing_windows": 0, "routing_files": 0, "routing_split_files": 0,
            "routing_largest_file_share": float("nan"), "routing_share_of_split": float("nan")}


#: The published figures this chapter sits beside (keys of analysis.chapters.published.ANCHORS).
SHAZEER_NO_BALANCE_CV = ("Shazeer et al. 2017", "CV of expert load, no balancing loss")
SHAZEER_NO_BALANCE_MAX = ("Shazeer et al. 2017", "max/mean expert load, no balancing loss")
SHAZEER_BALANCED_CV = ("Shazeer et al. 2017", "CV of expert load, w_importance = w_load = 0.1")
SHAZEER_BALANCED_MAX = ("Shazeer et al. 2017", "max/mean expert load, w_importance = w_load = 0.1")
MIXTRAL_SAME_EXPERT = ("Mixtral", "consecutive tokens with the same first-choice expert")


def published_settings() -> dict:
    """The published models' settings, for the chapter's prose (glue), from the one table."""
    return {"shazeer_setting": published.entry(*SHAZEER_NO_BALANCE_CV)["setting"],
            "mixtral_setting": published.entry(*MIXTRAL_SAME_EXPERT)["setting"]}


def beside_published(table: pd.DataFrame) -> pd.DataFrame:
    """Our routing numbers next to the published ones (labelled; far larger models)."""
    averages = arm_averages(table).set_index("arm")
    mixtral = published.entry(*MIXTRAL_SAME_EXPERT)
    shazeer_experts = published.entry(*SHAZEER_NO_BALANCE_CV)["n_experts"]
    E = n_experts(table)

    def ours(arm: str, column: str, fmt: str) -> str:
        if arm not in averages.index or f"{column}_mean" not in averages:
            return f"{arm} not trained"
        return f"{format(averages.loc[arm, f'{column}_mean'], fmt)} ({arm})"

    def cv(arm: str) -> str:
        if arm not in averages.index:
            return f"{arm} not trained"
        return (f"{averages.loc[arm, 'batch_cv_mean_mean']:.2f} ± {averages.loc[arm, 'batch_cv_std_mean']:.2f} "
                f"over batches ({arm})")

    def theirs(key: tuple) -> tuple:
        entry = published.entry(*key)
        return entry["value_text"], f"{entry['source']}, {entry['where']}"

    bound = (f"largest possible with one expert per token: sqrt(E - 1) = {stats.max_cv(E):.2f} for our E = {E}, "
             f"{stats.max_cv(shazeer_experts):.1f} for their E = {shazeer_experts}")
    rows = [
        (f"load CV per batch, no balancing loss ({bound})", cv("moe-k1-nobal"), *theirs(SHAZEER_NO_BALANCE_CV)),
        ("load max/mean, no balancing loss", ours("moe-k1-nobal", "load_max_over_mean", ".2f"),
         *theirs(SHAZEER_NO_BALANCE_MAX)),
        ("load CV per batch, with balancing loss", cv("moe-k1"), *theirs(SHAZEER_BALANCED_CV)),
        ("load max/mean, with balancing loss", ours("moe-k1", "load_max_over_mean", ".2f"),
         *theirs(SHAZEER_BALANCED_MAX)),
        (f"consecutive tokens, same first-choice expert (random: {mixtral['baseline']:.1%} for Mixtral, "
         f"{1 / E:.1%} for ours); ours on all byte pairs",
         ours("moe-k2-half", "same_expert_rate", ".1%"), *theirs(MIXTRAL_SAME_EXPERT)),
        ("the same, ours on pairs of different bytes only (BPE tokens rarely repeat)",
         ours("moe-k2-half", "same_expert_different_bytes", ".1%"), *theirs(MIXTRAL_SAME_EXPERT)),
    ]
    return pd.DataFrame(rows, columns=["quantity", "ours (this study)", "published (far larger models)",
                                       "source"])


def tokens_collected(collected: dict) -> Optional[int]:
    """Token positions per run in `collected` (the same for every run)."""
    for routing in collected.values():
        return int(routing["bytes"].size)
    return None


def versus_chance(rate: float, chance: float) -> str:
    """How a same-expert rate compares with its chance baseline, in words: within 25% of
    chance (relative) is "barely above" it; more than twice chance "far above"."""
    if rate <= chance:
        return "no higher than"
    ratio = rate / chance
    return "barely above" if ratio < 1.25 else ("far above" if ratio > 2 else "above")


def chance_numbers(numbers: dict) -> dict:
    """Glue: for each arm, how its same-expert rates compare with their chance baselines."""
    out = {}
    for key in [k[:-len("_same_expert_rate")] for k in numbers if k.endswith("_same_expert_rate")]:
        out[f"{key}_same_vs_chance"] = versus_chance(numbers[f"{key}_same_expert_rate"], numbers["uniform_same_expert"])
        if f"{key}_same_expert_different_bytes" in numbers and f"{key}_same_expert_by_load" in numbers:
            out[f"{key}_different_vs_chance"] = versus_chance(numbers[f"{key}_same_expert_different_bytes"],
                                                              numbers[f"{key}_same_expert_by_load"])
    return out


#: The per-layer summary's columns, in two tables that each fit the page.
LOAD_COLUMNS = ("load CV per batch", "load max/mean", "entropy / log E", "seeds")
REUSE_COLUMNS = ("same expert, consecutive bytes", "same expert, different bytes", "chance (from load)",
                 "2nd-expert weight share")


def metrics_tables(formatted: pd.DataFrame) -> tuple:
    """format_metrics' table as two that fit the page: load balance and expert reuse, each
    with the arm's readable name and the layer; a column empty in every row is left out."""
    base = formatted.assign(arm=formatted["arm"].map(accuracy.arm_label))
    tables = []
    for columns in (LOAD_COLUMNS, REUSE_COLUMNS):
        kept = [c for c in columns if c in base and (base[c].astype(str) != "").any()]
        tables.append(base[["arm", "layer", *kept]])
    return tuple(tables)


def published_view() -> pd.DataFrame:
    """The published routing figures, narrow: source, table, quantity and value (the settings
    are in the prose, the citations on the References page)."""
    table = published.anchors("routing")
    return table[["source", "where", "quantity", "published"]]
