"""The accuracy chapter's tables and charts, and the checks around the trained models.

What the chapter scores: every committed checkpoint on the whole test split
(``accuracy-rescore`` records written by ``python -m analysis.study.evaluation``,
one of them re-checked live), compared arm against arm paired by seed
(analysis/study/paired.py); beside them, classic compressors on the same bytes
and the share of test text found verbatim in the train split. The scoring rule
is in analysis/study/evaluation.py, which this module re-exports.

Also here: the inference-time experiments (top-k and capacity at inference, on
a sample spread over every test file, with the causal per-position capacity),
the cross-check of the trained MoE layers against ``topk_moe.moe_forward``, and
the test loss computed with every FFN replaced by the kernels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F_nn

import topk_moe
from topk_moe import testing

from analysis import records
from analysis.display import Note
from analysis.study import compressors, contamination, corpus, paired
from analysis.study.evaluation import (CAPACITY_FACTORS, EVAL_KIND, RESCORE_KIND, TRAIN_LOG_KIND,  # noqa: F401
                                       all_records, collect_routing, eval_records, eval_windows, evaluate,
                                       evaluate_model, rescore_records)
from analysis.study.moe_model import ByteTransformer, MoELayer, load_checkpoint, to_kernels

#: The test loss through the kernels must equal PyTorch's within this many bits
#: per byte. Both run the same float32 model; they differ only in summation
#: order (BLAS against PyTorch's kernels, expert-order index_add against the
#: contract's j-order combine), about 1e-7 relative per operation, which moves
#: the mean loss over thousands of bytes by well under 1e-5 bits; a near-tie
#: routed to another expert moves one byte's loss, diluted by the byte count.
LOSS_TOLERANCE_BITS = 1e-4
#: Order and colours (Okabe-Ito) of the arms in every chart and table.
ARM_ORDER = ("dense", "moe-k1", "moe-k2-half", "moe-k2", "dense-wide", "moe-k1-nobal", "moe-k2-half-nobal")
ARM_COLOURS = ("#000000", "#0072B2", "#D55E00", "#E69F00", "#009E73", "#56B4E9", "#CC79A7")
MAIN_ARMS = ARM_ORDER[:5]
PRESETS = ("cpu", "gpu", "tiny")
SCORE_SOURCES = ("records", "live")
#: Presets whose numbers only show that the code runs.
SMOKE_TEST_PRESETS = ("tiny",)

#: The comparisons the chapter makes, each paired by seed: (name, arm, baseline, what differs).
COMPARISONS = (
    ("top-1 MoE vs dense", "moe-k1", "dense",
     "equal active FLOPs; the MoE has E times the FFN parameters"),
    ("top-2 half-width MoE vs dense", "moe-k2-half", "dense",
     "equal active FLOPs; the MoE has E/2 times the FFN parameters"),
    ("top-2 half-width vs top-1", "moe-k2-half", "moe-k1",
     "two changes at once: k = 2 instead of 1 at equal active FLOPs, and half the total FFN parameters"),
    ("top-2 vs top-1, equal expert size", "moe-k2", "moe-k1",
     "k = 2 at equal expert size: twice the FFN FLOPs per token, the same parameters"),
    ("dense of equal FFN parameters vs top-1", "dense-wide", "moe-k1",
     "the same FFN parameters, E times the FFN FLOPs per token"),
    ("top-1 without vs with the balancing loss", "moe-k1-nobal", "moe-k1", "only the balancing loss"),
    ("top-2 half-width without vs with the balancing loss", "moe-k2-half-nobal", "moe-k2-half",
     "only the balancing loss"),
)


def check_parameters(*, preset: str, scratch: bool, scores: Optional[str], experiment_bytes: int,
                     check_bytes: int) -> None:
    """Stop the chapter at once on a bad papermill parameter, with one sentence saying which."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    if not isinstance(scratch, bool):
        raise ValueError(f"scratch: expected True or False, got {scratch!r}")
    if scores is not None and scores not in SCORE_SOURCES:
        raise ValueError(f"scores: expected None or one of {SCORE_SOURCES}, got {scores!r}")
    if scratch and scores == "records":
        raise ValueError("scores: a scratch run has no accuracy-rescore records; expected None or 'live', "
                         "got 'records'")
    for name, value, least in (("experiment_bytes", experiment_bytes, 256), ("check_bytes", check_bytes, 256)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected a whole number of bytes, at least {least}, got {value!r}")


def score_source(scores: Optional[str], scratch: bool) -> str:
    """Where the held-out scores come from: as asked, or live for a scratch run, else the records."""
    return scores if scores is not None else ("live" if scratch else "records")


#: Bytes a smoke-test preset scores live (spread over every test file): the whole
#: split would take minutes for a run whose numbers mean nothing.
SMOKE_TEST_SCORE_BYTES = 1 << 16


def live_bytes(preset: str) -> Optional[int]:
    """None (the whole split) for a real preset; SMOKE_TEST_SCORE_BYTES for a smoke test."""
    return SMOKE_TEST_SCORE_BYTES if preset in SMOKE_TEST_PRESETS else None


def smoke_test_note(preset: str, scratch: bool) -> Optional[Note]:
    """A visible warning for a run whose numbers are a smoke test (None otherwise)."""
    if preset in SMOKE_TEST_PRESETS or scratch:
        return Note("Smoke test, not results",
                    f"This page was built from the '{preset}' preset"
                    + (" trained from scratch for this build" if scratch else "")
                    + ": models of a few thousand parameters trained for a few steps. Its numbers only show "
                      "that the chapter's code runs end to end; they say nothing about MoE against dense. The "
                      "book's results come from the 'cpu' preset.")
    return None


def _arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


def runs_table(results_dir=None, *, preset: str = "cpu") -> pd.DataFrame:
    """One row per trained (arm, seed): its test metrics, size, cost and checkpoint path."""
    rows = []
    root = records.results_root(results_dir)
    for record in eval_records(results_dir, preset=preset):
        params = record["params"]
        counts = params["parameters"]
        rows.append({
            "arm": params["arm"], "seed": int(params["seed"]), "comparison": params["comparison"],
            "top_k": params["model"]["top_k"] if params["model"]["ffn"] == "moe" else None,
            "d_ff": params["model"]["d_ff"], "ffn": params["model"]["ffn"],
            "n_experts": params["model"]["n_experts"] if params["model"]["ffn"] == "moe" else None,
            "params_total": counts["total"], "params_active": counts["active"],
            "ffn_params_total": counts.get("ffn_total"), "ffn_params_active": counts.get("ffn_active"),
            "steps": params["steps"], "tokens": record["tokens"], "train_seconds": record["train_seconds"],
            "seconds_per_step": record["seconds_per_step"], "bits_per_byte": record["bits_per_byte"],
            "accuracy": record["accuracy"], "eval_bytes": record["n_bytes"], "run_id": params["run_id"],
            "checkpoint": str(root / params["checkpoint"]), "device": record["device"], "utc": record["utc"],
            "git_commit": record["git_commit"], "git_dirty": record["git_dirty"],
            "cpu_count": record.get("cpu_count"), "threads": params.get("threads"),
            "corpus_python": params.get("corpus_python"), "corpus_sha256": params.get("corpus_sha256"),
        })
    if not rows:
        raise FileNotFoundError(f"no {EVAL_KIND!r} records of preset {preset!r} under {root}")
    table = pd.DataFrame(rows)
    table["arm_rank"] = table["arm"].map(_arm_rank)
    return table.sort_values(["arm_rank", "seed"]).drop(columns="arm_rank").reset_index(drop=True)


def provenance_note(runs: pd.DataFrame) -> dict:
    """Where the chapter's numbers come from: device, its core count, torch threads,
    dates and commits of the runs."""
    commits = sorted({f"{c[:10]}{' (dirty)' if d else ''}" for c, d in zip(runs["git_commit"].fillna("unknown"),
                                                                            runs["git_dirty"].fillna(False))})

    def distinct(column: str) -> str:
        values = sorted({str(int(v)) for v in runs[column].dropna()}, key=int) if column in runs else []
        return ", ".join(values) or "unknown"

    return {"device": ", ".join(sorted(runs["device"].unique())), "cpu_count": distinct("cpu_count"),
            "threads": distinct("threads"), "first_utc": runs["utc"].min()[:19],
            "last_utc": runs["utc"].max()[:19], "commits": ", ".join(commits), "n_runs": len(runs)}


def _corpus_label(python, sha256) -> str:
    python = "unknown" if python is None or pd.isna(python) else python
    sha256 = "unknown" if sha256 is None or pd.isna(sha256) else f"{sha256[:16]}…"
    return f"Python {python} (corpus sha256 {sha256})"


def corpus_note(runs: pd.DataFrame, manifest: dict) -> str:
    """One sentence for the chapter: which corpus the checkpoints were trained on, against
    this machine's (`manifest`, analysis.study.corpus), on which the chapter recomputes everything."""
    here = _corpus_label(manifest["python"], manifest["sha256"])
    other = runs[runs["corpus_sha256"] != manifest["sha256"]]
    if other.empty:
        return f"All {len(runs)} checkpoints were trained on this machine's corpus, the standard library of {here}."
    groups = other.groupby([other["corpus_python"].fillna("unknown"), other["corpus_sha256"].fillna("unknown")],
                           sort=True)
    trained = "; ".join(f"{_corpus_label(python, sha)}: {len(group)} run(s) "
                        f"({', '.join(f'{a} seed {s}' for a, s in zip(group['arm'], group['seed']))})"
                        for (python, sha), group in groups)
    return (f"Warning: {len(other)} of {len(runs)} checkpoints were trained on another corpus than this machine's: "
            f"{trained}. This machine's corpus is the standard library of {here}, and every number this "
            f"chapter computes from the checkpoints uses it, so for those runs they are not the numbers "
            f"recorded at training.")


def mean_std(table: pd.DataFrame, by: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """Mean and (sample) standard deviation over seeds of each column, per group."""
    grouped = table.groupby(list(by), sort=False, dropna=False)
    result = grouped[list(columns)].agg(["mean", "std"])
    result.columns = [f"{column}_{stat}" for column, stat in result.columns]
    result["n_seeds"] = grouped.size()
    return result.reset_index()


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: test bits per byte and accuracy as mean ± std over seeds, with sizes and cost."""
    summary = mean_std(runs, ["arm"], ["bits_per_byte", "accuracy", "seconds_per_step"])
    columns = [c for c in ("comparison", "ffn", "top_k", "d_ff", "n_experts", "params_total", "params_active",
                           "ffn_params_total", "ffn_params_active", "tokens") if c in runs]
    firsts = runs.groupby("arm", sort=False)[columns].first().reset_index()
    summary = firsts.merge(summary, on="arm")
    dense = summary.loc[summary["arm"] == "dense", "bits_per_byte_mean"]
    if len(dense):
        summary["vs_dense_percent"] = 100 * (summary["bits_per_byte_mean"] / float(dense.iloc[0]) - 1)
    return summary


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as the book prints it: mean ± std strings."""
    out = pd.DataFrame({
        "arm": summary["arm"],
        "comparison": summary["comparison"],
        "k": summary["top_k"].map(lambda k: "" if pd.isna(k) else str(int(k))),
        "F": summary["d_ff"],
        "parameters (total / active)": [f"{t:,} / {a:,}" for t, a in zip(summary["params_total"],
                                                                        summary["params_active"])],
        "test bits/byte (mean ± std)": [f"{m:.4f} ± {s:.4f}" for m, s in zip(summary["bits_per_byte_mean"],
                                                                 summary["bits_per_byte_std"].fillna(0))],
        "next-byte accuracy (mean ± std)": [f"{m:.4f} ± {s:.4f}" for m, s in zip(summary["accuracy_mean"],
                                                                     summary["accuracy_std"].fillna(0))],
        "seeds": summary["n_seeds"],
        "ms/step": (1e3 * summary["seconds_per_step_mean"]).round(1),
    })
    if "vs_dense_percent" in summary:
        out["mean vs dense"] = summary["vs_dense_percent"].map(lambda v: f"{v:+.2f}%")
    return out


def train_curves(results_dir=None, *, preset: str = "cpu", runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Logged training loss of the runs in `runs` (default: the newest per arm and seed)."""
    runs = runs if runs is not None else runs_table(results_dir, preset=preset)
    wanted = set(runs["run_id"])
    rows = []
    for record in all_records(TRAIN_LOG_KIND, results_dir):
        params = record["params"]
        if params["run_id"] in wanted:
            rows.append({"arm": params["arm"], "seed": int(params["seed"]), "step": record["step"],
                         "tokens": record["tokens"], "seconds": record["seconds"],
                         "train_bits_per_byte": record["train_bits_per_byte"],
                         "balance_loss": record.get("balance_loss"),
                         "load_fraction": record.get("load_fraction")})
    return pd.DataFrame(rows).sort_values(["arm", "seed", "step"]).reset_index(drop=True)


def curve_chart(curves: pd.DataFrame, x: str, arms: Sequence[str] = MAIN_ARMS) -> alt.TopLevelMixin:
    """Training bits per byte against tokens or seconds: the mean over seeds per arm, a band for ±1 std."""
    data = curves[curves["arm"].isin(arms)]
    data = data.groupby(["arm", "step"], as_index=False).agg(
        x=(x, "mean"), mean=("train_bits_per_byte", "mean"), std=("train_bits_per_byte", "std"))
    data["std"] = data["std"].fillna(0.0)
    data["low"], data["high"] = data["mean"] - data["std"], data["mean"] + data["std"]
    present = [arm_label(arm) for arm in ARM_ORDER if arm in set(data["arm"])]
    scale = alt.Scale(domain=present, range=[ARM_COLOURS[ARM_ORDER.index(a)] for a in ARM_ORDER
                                             if arm_label(a) in present])
    data = data.assign(arm=data["arm"].map(arm_label))
    colour = alt.Color("arm:N", scale=scale, sort=present, title="arm", legend=alt.Legend(labelLimit=320))
    title = {"tokens": "training bytes seen", "seconds": "training wall-clock seconds (CPU)"}.get(x, x)
    x_encoding = alt.X("x:Q", title=title)
    # The first steps fall from log2(256) = 8 bits; the y axis starts after the first fifth
    # of training, where the arms separate (earlier points are clipped at the top).
    later = data[data["step"] >= 0.2 * data["step"].max()]
    y_scale = alt.Scale(domain=[float(later["low"].min()), float(later["high"].max())], zero=False)
    band = alt.Chart(data).mark_area(opacity=0.2, clip=True).encode(
        x=x_encoding, y=alt.Y("low:Q", scale=y_scale), y2="high:Q",
        color=alt.Color("arm:N", scale=scale, sort=present, legend=None))
    line = alt.Chart(data).mark_line(clip=True).encode(
        x=x_encoding, y=alt.Y("mean:Q", title="training loss (bits per byte)", scale=y_scale), color=colour)
    # Independent legends: the band's (none) can't hide the line's.
    return alt.layer(band, line).resolve_legend(color="independent").properties(
        width=460, height=280, title=f"Training loss against {title} (mean of seeds, band ±1 std)")


def summary_chart(summary: pd.DataFrame) -> alt.TopLevelMixin:
    """Test bits per byte per arm: mean with ±1 std error bars."""
    data = summary.assign(low=summary["bits_per_byte_mean"] - summary["bits_per_byte_std"].fillna(0),
                          high=summary["bits_per_byte_mean"] + summary["bits_per_byte_std"].fillna(0))
    order = [arm_label(arm) for arm in ARM_ORDER if arm in set(data["arm"])]
    data = data.assign(arm=data["arm"].map(arm_label))
    y = alt.Y("arm:N", sort=order, title=None, axis=alt.Axis(labelLimit=320))
    points = alt.Chart(data).mark_point(filled=True, size=60, color="#0072B2").encode(
        x=alt.X("bits_per_byte_mean:Q", title="test bits per byte (lower is better)", scale=alt.Scale(zero=False)),
        y=y)
    bars = alt.Chart(data).mark_rule(color="#0072B2").encode(x="low:Q", x2="high:Q", y=y)
    return alt.layer(bars, points).properties(width=380, height=22 * len(order) + 20,
                                              title="Test loss per arm (mean ± std over seeds)")


def reevaluate(runs: pd.DataFrame, *, max_bytes: Optional[int] = None) -> pd.DataFrame:
    """`runs` with each checkpoint re-scored here: bits_per_byte, accuracy and n_bytes
    replaced by the new numbers, the recorded ones kept as recorded_bits_per_byte, and
    `difference` = new - recorded (zero up to float rounding when max_bytes is None,
    the bytes each run was scored on after training, and the corpus is the same)."""
    table = runs.copy()
    table["recorded_bits_per_byte"] = table["bits_per_byte"]
    results = [evaluate(path, max_bytes=max_bytes) for path in table["checkpoint"]]
    table["bits_per_byte"] = [r["bits_per_byte"] for r in results]
    table["accuracy"] = [r["accuracy"] for r in results]
    table["eval_bytes"] = [r["n_bytes"] for r in results]
    table["corpus_matches"] = [r["corpus_matches"] for r in results]
    table["difference"] = table["bits_per_byte"] - table["recorded_bits_per_byte"]
    return table


#: Re-scoring a checkpoint on the bytes it was scored on after training repeats the
#: same float32 computation; only the thread count's summation order may differ.
REPRODUCE_TOLERANCE_BITS = 1e-5


def assert_reproduced(scored: pd.DataFrame) -> None:
    """Stop when a re-scored checkpoint does not reproduce its recorded test loss.

    Runs trained on another corpus (e.g. another Python version) can't be compared and
    are left out here; reproduction_note says so in the chapter, naming them."""
    same_corpus = scored[scored["corpus_matches"]]
    off = same_corpus[same_corpus["difference"].abs() > REPRODUCE_TOLERANCE_BITS]
    if len(off):
        raise AssertionError("re-scored checkpoints differ from their records:\n"
                             + off[["arm", "seed", "bits_per_byte", "recorded_bits_per_byte"]].to_string())


def reproduction_note(scored: pd.DataFrame, manifest: dict, *, rescored_bytes: Optional[int] = None) -> str:
    """What the re-scoring (reevaluate) showed, for the chapter's prose: the checkpoints
    trained on this machine's corpus reproduce their records (after assert_reproduced), and
    those trained on another corpus were re-scored on this one and not compared.
    `rescored_bytes` not None: the checkpoints were scored on other bytes than after
    training, so nothing is compared."""
    here = _corpus_label(manifest["python"], manifest["sha256"])
    if rescored_bytes is not None:
        return (f"Here each checkpoint is re-scored on the first {int(rescored_bytes):,} test bytes of this "
                f"machine's corpus ({here}), not on the bytes it was scored on after training, so the numbers "
                f"are not compared with the recorded ones.")
    same, other = scored[scored["corpus_matches"]], scored[~scored["corpus_matches"]]
    sentences = []
    if len(same):
        which = f"All {len(same)}" if other.empty else f"{len(same)} of {len(scored)}"
        sentences.append(
            f"{which} checkpoints were trained on this machine's corpus and re-scored there, each reproducing "
            f"its recorded test loss: the largest difference is {float(same['difference'].abs().max()):.1e} "
            f"bits per byte (tolerance {REPRODUCE_TOLERANCE_BITS:.0e}).")
    if len(other):
        trained = ", ".join(sorted({_corpus_label(p, s) for p, s in zip(other["corpus_python"],
                                                                        other["corpus_sha256"])}))
        which = f"all {len(other)}" if same.empty else f"{len(other)} of {len(scored)}"
        sentences.append(
            f"Warning: {which} checkpoints were trained on another corpus ({trained}); their numbers here are "
            f"re-scored on this machine's corpus ({here}), so they are not the recorded ones (they differ by up "
            f"to {float(other['difference'].abs().max()):.2f} bits per byte) and are not a check of "
            f"reproduction.")
    return " ".join(sentences)


# ---------------------------------------------------------------- whole-split scores


#: Windows per batch when the chapter scores the whole split itself (source "live").
LIVE_BATCH_SIZE = 256


def held_out_scores(runs: pd.DataFrame, *, source: str = "records", results_dir=None,
                    live_bytes: Optional[int] = None) -> pd.DataFrame:
    """`runs` with bits_per_byte, accuracy and eval_bytes on the test split: the whole split
    from the ``accuracy-rescore`` records (source "records"), or scored here (source
    "live") on the whole split, or on `live_bytes` bytes spread over every file when given
    (a smoke test). The training-time score on the split's prefix is kept as
    prefix_bits_per_byte."""
    if source not in SCORE_SOURCES:
        raise ValueError(f"source: expected one of {SCORE_SOURCES}, got {source!r}")
    table = runs.copy()
    table["prefix_bits_per_byte"] = table["bits_per_byte"]
    table["prefix_bytes"] = table["eval_bytes"]
    if source == "records":
        found = {r["params"]["run_id"]: r for r in rescore_records(results_dir)}
        missing = table[~table["run_id"].isin(found)]
        if len(missing):
            raise FileNotFoundError(
                f"no {RESCORE_KIND!r} record for {len(missing)} run(s) "
                f"({', '.join(f'{a} seed {s}' for a, s in zip(missing['arm'], missing['seed']))}); "
                f"run `python -m analysis.study.evaluation --preset {table['checkpoint'].iloc[0].split('/')[-2]}`")
        results = [found[run_id] for run_id in table["run_id"]]
        table["score_utc"] = [r["utc"] for r in results]
        table["score_commit"] = [r["git_commit"] for r in results]
    else:
        # Dropless, a window's score doesn't depend on the other windows of its batch, so
        # large batches (fewer, bigger calls) give the same scores up to float rounding, faster.
        sample = "whole" if live_bytes is None else "spread"
        results = [evaluate(path, sample=sample, max_bytes=live_bytes, batch_size=LIVE_BATCH_SIZE)
                   for path in table["checkpoint"]]
    table["bits_per_byte"] = [r["bits_per_byte"] for r in results]
    table["accuracy"] = [r["accuracy"] for r in results]
    table["eval_bytes"] = [r["n_bytes"] for r in results]
    table["files_scored"] = [r["coverage"]["files_touched"] for r in results]
    table["split_files"] = [r["coverage"]["n_files"] for r in results]
    table["split_bytes"] = [r["coverage"]["split_bytes"] for r in results]
    return table




def verify_scores_live(scores: pd.DataFrame, source: str, arm: str = "dense") -> dict:
    """With scores from the records: re-score the lowest seed of `arm` here, on the whole
    split and on the training-time prefix, and stop unless both equal their records (when
    the corpus is this machine's). Returns the sentence for the chapter's prose."""
    if source != "records":
        return {"verification": "This build scored every checkpoint itself, on the whole split, and read no "
                                "accuracy-rescore records."}
    row = scores[scores["arm"] == arm].sort_values("seed").iloc[0]
    whole = evaluate(row["checkpoint"], sample="whole")
    prefix = evaluate(row["checkpoint"])
    checks = {"whole split": (whole["bits_per_byte"], row["bits_per_byte"]),
              "training-time prefix": (prefix["bits_per_byte"], row["prefix_bits_per_byte"])}
    worst = max(abs(a - b) for a, b in checks.values())
    run = f"{arm} seed {int(row['seed'])}"
    if not whole["corpus_matches"]:
        return {"verification": f"This build re-scored {run} here, but this machine's corpus is not the one it was "
                                f"trained on, so its scores here differ from the records by up to {worst:.2f} "
                                f"bits per byte and are no check of them."}
    if worst > REPRODUCE_TOLERANCE_BITS:
        raise AssertionError(f"{run}: re-scored here, {checks} (here, recorded) differ by more than "
                             f"{REPRODUCE_TOLERANCE_BITS} bits per byte")
    agreement = "exactly" if worst == 0 else f"within {worst:.1e} bits per byte"
    return {"verification": f"To show that the records are what the checkpoints give, this build re-scored {run} "
                            f"here, on the whole split and on the training-time prefix: both equal their records "
                            f"{agreement}."}


def coverage_numbers(scores: pd.DataFrame, manifest: dict) -> dict:
    """What was scored, for the prose: bytes and files of the whole split, and of the prefix."""
    data = corpus.load_corpus()["test"]
    prefix_bytes = int(scores["prefix_bytes"].iloc[0])
    from analysis.study.evaluation import sample_summary, window_starts
    seq_len = int(load_checkpoint(scores["checkpoint"].iloc[0])[0].cfg.seq_len)
    prefix = sample_summary(data, window_starts(data, seq_len, 1, sample="prefix", max_bytes=prefix_bytes), seq_len)
    whole = int(scores["eval_bytes"].iloc[0]) >= manifest["bytes"]["test"] - seq_len
    scored_what = ("the whole test split" if whole else
                   "a sample spread over every test file (a smoke test; a real preset scores the whole split)")
    return {"scored_what": scored_what,
            "scored_bytes": f"{int(scores['eval_bytes'].iloc[0]):,}", "split_bytes": f"{manifest['bytes']['test']:,}",
            "scored_files": int(scores["files_scored"].min()), "split_files": int(manifest["files"]["test"]),
            "prefix_bytes": f"{prefix_bytes:,}", "prefix_share": prefix["share_of_split"],
            "prefix_files": prefix["files_touched"]}


# ---------------------------------------------------------------- paired comparisons


def paired_comparisons(scores: pd.DataFrame, metric: str = "bits_per_byte",
                       comparisons: Sequence = COMPARISONS) -> pd.DataFrame:
    """One row per comparison whose two arms were both trained: `metric` of arm minus
    baseline, paired by seed over the seeds both have (analysis.study.paired): per-seed
    differences, mean, std, 95% interval, paired t-test p, relative change, whether the
    data support a difference, and the seeds a test would need to resolve it."""
    rows = []
    for name, arm, baseline, differs in comparisons:
        mine = scores[scores["arm"] == arm].set_index("seed")[metric]
        base = scores[scores["arm"] == baseline].set_index("seed")[metric]
        seeds = sorted(set(mine.index) & set(base.index))
        if len(seeds) < 2:
            continue
        result = paired.paired_difference(mine.loc[seeds].to_numpy(), base.loc[seeds].to_numpy())
        rows.append({"comparison": name, "arm": arm, "baseline": baseline, "what differs": differs,
                     "seeds": seeds, **result})
    return pd.DataFrame(rows)


def format_paired(comparisons: pd.DataFrame, unit: str = "bits/byte") -> pd.DataFrame:
    """The paired comparisons as the book prints them (per-seed differences spelled out;
    what each comparison changes is in COMPARISONS and the chapter's prose)."""
    def verdict(row) -> str:
        if row["supported"]:
            return "lower (supported)" if row["mean"] < 0 else "higher (supported)"
        return "within noise"

    return pd.DataFrame({
        "comparison": comparisons["comparison"],
        f"per-seed difference ({unit})": [", ".join(f"{d:+.3f}" for d in ds) for ds in comparisons["differences"]],
        f"mean ({unit})": comparisons["mean"],
        "95% interval": [f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(comparisons["low"], comparisons["high"])],
        "relative": comparisons["relative"].map(lambda v: f"{100 * v:+.1f}%"),
        "paired t-test p": comparisons["p_value"],
        "verdict": comparisons.apply(verdict, axis=1),
        "seeds for 80% power": comparisons["seeds_needed"].map(
            lambda n: "more than 1000" if not np.isfinite(n) else str(int(n))),
        "seeds": comparisons["n"],
    })


def paired_numbers(comparisons: pd.DataFrame) -> dict:
    """Glue for the prose: each comparison's mean, interval, p, verdict, seeds needed,
    keyed by arm_vs_baseline (dashes as underscores)."""
    numbers = {}
    for row in comparisons.itertuples():
        key = f"{row.arm}_vs_{row.baseline}".replace("-", "_")
        numbers.update({f"{key}_mean": row.mean, f"{key}_low": row.low, f"{key}_high": row.high,
                        f"{key}_p": row.p_value, f"{key}_percent": 100 * row.relative, f"{key}_n": row.n,
                        f"{key}_verdict": ("a supported difference" if row.supported else "within noise"),
                        f"{key}_seeds_needed": ("more than 1000" if not np.isfinite(row.seeds_needed)
                                                else f"{int(row.seeds_needed)}"),
                        f"{key}_differences": ", ".join(f"{d:+.3f}" for d in row.differences),
                        f"{key}_resolution": resolution_sentence(row)})
    return numbers


def resolution_sentence(row) -> str:
    """What more seeds would do for one comparison (a row of paired_comparisons), in words."""
    if row.supported:
        return f"The data of {row.n} seeds support this difference."
    if not np.isfinite(row.seeds_needed):
        return (f"No number of seeds up to {paired.MAX_SEEDS} would resolve a difference this small against "
                f"this spread; the study does not rank the two arms.")
    return (f"A difference of this size would need about {int(row.seeds_needed)} seeds to resolve with 80% "
            f"power; with {row.n}, the study does not rank the two arms.")


def paired_chart(comparisons: pd.DataFrame, scores: pd.DataFrame, metric: str = "bits_per_byte") -> alt.TopLevelMixin:
    """Each comparison: its per-seed differences (points), the mean and 95% interval (bar), zero dashed."""
    order = list(comparisons["comparison"])
    points = pd.DataFrame([{"comparison": row.comparison, "seed": str(seed), "difference": d}
                           for row in comparisons.itertuples() for seed, d in zip(row.seeds, row.differences)])
    y = alt.Y("comparison:N", sort=order, title=None, axis=alt.Axis(labelLimit=360))
    seeds = sorted(set(points["seed"]), key=int)
    colour = alt.Color("seed:N", sort=seeds, title="seed", scale=alt.Scale(
        domain=seeds, range=[ARM_COLOURS[1:][i % 6] for i in range(len(seeds))]))
    dots = alt.Chart(points).mark_point(size=70, filled=True, opacity=0.85).encode(
        x=alt.X("difference:Q", title="test bits per byte, arm minus baseline (negative: arm better)"),
        y=y, color=colour)
    bars = alt.Chart(comparisons).mark_rule(strokeWidth=2, color="#000000").encode(x="low:Q", x2="high:Q", y=y)
    means = alt.Chart(comparisons).mark_tick(thickness=3, size=20, color="#000000").encode(x="mean:Q", y=y)
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="#D55E00", strokeDash=[4, 3]).encode(x="zero:Q")
    return alt.layer(bars, dots, means, zero).properties(
        width=420, height=alt.Step(36),
        title="Paired by seed: points are seeds, black bars the 95% interval of the mean")


# ---------------------------------------------------------------- anchors: compressors and contamination


def compressor_table(summary: pd.DataFrame, data: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Classic compressors on the whole test split beside the arms' mean whole-split bits per byte."""
    data = corpus.load_corpus()["test"] if data is None else data
    rows = [{"what": f"{r['compressor']} ({r['setting']})", "kind": "compressor, whole split as one stream",
             "bits per byte": r["bits_per_byte"]} for r in compressors.bits_per_byte(data)]
    for row in summary.itertuples():
        if row.arm in MAIN_ARMS:
            rows.append({"what": row.arm, "kind": f"model, mean of {row.n_seeds} seeds",
                         "bits per byte": row.bits_per_byte_mean})
    return pd.DataFrame(rows).sort_values("bits per byte").reset_index(drop=True)


def regime_numbers(table: pd.DataFrame) -> dict:
    """Glue: each compressor's bits per byte, the best model's, and the regime in words."""
    numbers = {}
    for name in compressors.COMPRESSORS:
        numbers[f"{name}_bits"] = float(table.loc[table["what"].str.startswith(name + " "), "bits per byte"].iloc[0])
    models = table[table["kind"].str.startswith("model")]
    best = models.sort_values("bits per byte").iloc[0]
    numbers["best_model"], numbers["best_model_bits"] = best["what"], float(best["bits per byte"])
    beaten = [name for name in compressors.COMPRESSORS if numbers[f"{name}_bits"] < numbers["best_model_bits"]]
    if beaten:
        numbers["regime"] = (f"every model compresses the test text worse than {' and '.join(beaten)}: these are "
                             f"small, briefly trained models, in the regime where a model has not yet learned what a "
                             f"general-purpose compressor finds by matching repeats. Differences between arms here "
                             f"say how the FFN choice changes an under-trained small model, not a large one")
    else:
        numbers["regime"] = ("the best model compresses the test text better than every classic compressor here, "
                             "so the models have learned more than repeats")
    return numbers


def contamination_numbers(result: Optional[dict] = None, *, top: int = 5) -> tuple:
    """(glue numbers, table of the `top` most contaminated test files) from
    analysis.study.contamination.corpus_overlap (computed here when not given)."""
    result = contamination.corpus_overlap() if result is None else result
    chunks, found = np.array(result["file_chunks"]), np.array(result["file_found"])
    rates = np.divide(found, chunks, out=np.zeros(len(chunks)), where=chunks > 0)
    order = np.argsort(-rates, kind="stable")[:top]
    worst = pd.DataFrame({"test file": [result["files"][i] for i in order],
                          f"{result['width']}-byte chunks": chunks[order],
                          "found verbatim in train": found[order],
                          "share": [f"{r:.1%}" for r in rates[order]]})
    # The most affected file of some size: a three-chunk file at 67% says little.
    sizable = np.flatnonzero(chunks >= SIZABLE_FILE_CHUNKS)
    pick = sizable[np.argmax(rates[sizable])] if sizable.size else order[0]
    numbers = {"contamination_rate": result["rate"], "contamination_chunks": f"{result['n_chunks']:,}",
               "contamination_found": f"{result['n_found']:,}", "contamination_width": result["width"],
               "contamination_sizable_chunks": SIZABLE_FILE_CHUNKS,
               "contamination_worst_file": result["files"][pick],
               "contamination_worst_share": float(rates[pick]),
               "contamination_worst_found": int(found[pick]), "contamination_worst_chunks": int(chunks[pick])}
    return numbers, worst


#: Files with at least this many chunks count as sizable for the chapter's "most affected file".
SIZABLE_FILE_CHUNKS = 20


def cross_check_all(runs: pd.DataFrame, *, check_bytes: int, batch_size: int = 4) -> tuple:
    """For the lowest seed of every arm: the MoE layers against topk_moe.moe_forward
    (kernels_cross_check) and the test loss through the kernels (loss_through_kernels).
    Returns (layer table, loss table), each with an `arm` column."""
    data = corpus.load_corpus()["test"]
    layer_tables, loss_tables = [], []
    for arm in [a for a in ARM_ORDER if a in set(runs["arm"])]:
        model, _ = load_checkpoint(checkpoint_for(runs, arm))
        if model.cfg.is_moe:
            tokens = first_window_batch(data, model.cfg.seq_len, batch_size)
            layer_tables.append(kernels_cross_check(model, tokens).assign(arm=arm))
        loss_tables.append(loss_through_kernels(model, data, batch_size=batch_size,
                                                max_bytes=check_bytes).assign(arm=arm))
    layers = pd.concat(layer_tables, ignore_index=True) if layer_tables else pd.DataFrame()
    losses = pd.concat(loss_tables, ignore_index=True)
    return layers[["arm"] + [c for c in layers if c != "arm"]], losses[["arm"] + [c for c in losses if c != "arm"]]


def cross_check_summary(layer_checks: pd.DataFrame) -> pd.DataFrame:
    """Per arm and implementation, over the MoE layers: the largest error against the
    float64 reference, the largest error as a share of its bound, the smallest share of
    tokens routed as PyTorch routed them, and whether every layer passed."""
    table = layer_checks.assign(error_over_bound=layer_checks["max_error_vs_float64"] / layer_checks["bound"])
    summary = table.groupby(["arm", "implementation"], sort=False).agg(
        layers=("layer", "count"), max_error_vs_float64=("max_error_vs_float64", "max"),
        max_error_over_bound=("error_over_bound", "max"),
        min_tokens_routed_as_pytorch=("tokens_routed_as_pytorch", "min"),
        max_diff_from_pytorch=("max_diff_from_pytorch", "max"), all_passed=("passed", "all"))
    return summary


# ---------------------------------------------------------------- inference-time experiments

EXPERIMENT_ARMS = ("moe-k1", "moe-k2-half", "moe-k2")


def inference_k_table(runs: pd.DataFrame, *, max_bytes: int = 1 << 16,
                      arms: Sequence[str] = EXPERIMENT_ARMS) -> pd.DataFrame:
    """Each MoE arm evaluated with k = 1 and k = 2 at inference, with and without renormalising
    the k weights, on `max_bytes` test bytes spread over every file; one row per
    (arm, seed, eval k, renormalize)."""
    rows = []
    data = corpus.load_corpus()["test"]
    for run in runs[runs["arm"].isin(arms)].itertuples():
        model, meta = load_checkpoint(run.checkpoint)
        for eval_k in (1, 2):
            for renormalize in (False, True):
                result = evaluate_model(model, data, batch_size=meta["batch_size"], max_bytes=max_bytes,
                                        sample="spread", top_k=eval_k, renormalize=renormalize)
                rows.append({"arm": run.arm, "seed": run.seed, "trained_k": model.cfg.top_k,
                             "trained_renormalize": model.cfg.renormalize, "eval_k": eval_k,
                             "renormalize": renormalize,
                             "as_trained": eval_k == model.cfg.top_k and renormalize == model.cfg.renormalize,
                             "bits_per_byte": result["bits_per_byte"], "accuracy": result["accuracy"],
                             "n_bytes": result["n_bytes"], "files": result["coverage"]["files_touched"]})
    return pd.DataFrame(rows)


def _paired_against(table: pd.DataFrame, keys: Sequence[str], reference: pd.Series) -> pd.DataFrame:
    """Per group of `keys` (arm first): mean ± std of bits per byte over seeds and the change
    against the `reference` rows of the same arm, paired by seed (mean, 95% interval, p)."""
    rows = []
    for group, rows_of_group in table.groupby(list(keys), sort=False):
        arm = group[0]
        base = table[reference & (table["arm"] == arm)].set_index("seed")["bits_per_byte"]
        mine = rows_of_group.set_index("seed")["bits_per_byte"]
        seeds = sorted(set(mine.index) & set(base.index))
        row = dict(zip(keys, group))
        row.update({"bits_per_byte_mean": float(mine.mean()), "bits_per_byte_std": float(mine.std(ddof=1))
                    if len(mine) > 1 else float("nan"), "n_seeds": len(mine)})
        if "drop_rate" in rows_of_group:
            row["drop_rate_mean"] = float(rows_of_group["drop_rate"].mean())
        if len(seeds) >= 2 and not np.allclose(mine.loc[seeds].to_numpy(), base.loc[seeds].to_numpy(), rtol=0,
                                               atol=0):
            result = paired.paired_difference(mine.loc[seeds].to_numpy(), base.loc[seeds].to_numpy())
            row.update({"change_mean": result["mean"], "change_low": result["low"], "change_high": result["high"],
                        "change_p": result["p_value"], "change_supported": result["supported"]})
        else:
            row.update({"change_mean": float(mine.loc[seeds].mean() - base.loc[seeds].mean()) if seeds else
                        float("nan"), "change_low": float("nan"), "change_high": float("nan"),
                        "change_p": float("nan"), "change_supported": False})
        rows.append(row)
    return pd.DataFrame(rows)


def inference_k_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds, and the change against the model as trained, paired by seed."""
    summary = _paired_against(table, ["arm", "trained_k", "eval_k", "renormalize", "as_trained"],
                              table["as_trained"])
    summary["change_vs_trained"] = summary["change_mean"]
    return summary


def _change_text(row) -> str:
    if pd.isna(row.change_low):
        return "0 (the reference)" if row.change_mean == 0 else f"{row.change_mean:+.4f}"
    return f"{row.change_mean:+.4f} [{row.change_low:+.4f}, {row.change_high:+.4f}]"


def format_k_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The inference-time top-k table as the book prints it."""
    return pd.DataFrame({
        "arm": summary["arm"], "trained k": summary["trained_k"], "k at inference": summary["eval_k"],
        "renormalise": summary["renormalize"].map({True: "yes", False: "no"}),
        "as trained": summary["as_trained"].map({True: "yes", False: ""}),
        "test bits/byte (mean ± std)": [f"{m:.4f} ± {0 if pd.isna(s) else s:.4f}"
                                        for m, s in zip(summary["bits_per_byte_mean"], summary["bits_per_byte_std"])],
        "change vs as trained [95% interval]": [_change_text(r) for r in summary.itertuples()],
        "seeds": summary["n_seeds"],
    })


def capacity_sweep(runs: pd.DataFrame, *, factors: Iterable = CAPACITY_FACTORS, max_bytes: int = 1 << 16,
                   arms: Sequence[str] = EXPERIMENT_ARMS) -> pd.DataFrame:
    """Test loss and drop rate with a capacity at inference, per arm, seed and capacity factor
    (None: dropless), on `max_bytes` test bytes spread over every file. The capacity is
    causal: each position of a batch is one call (moe_model.CAPACITY_SCOPES)."""
    rows = []
    data = corpus.load_corpus()["test"]
    for run in runs[runs["arm"].isin(arms)].itertuples():
        model, meta = load_checkpoint(run.checkpoint)
        for factor in factors:
            result = evaluate_model(model, data, batch_size=meta["batch_size"], max_bytes=max_bytes,
                                    sample="spread", capacity_factor=factor, capacity_scope="position")
            rows.append({"arm": run.arm, "seed": run.seed, "k": model.cfg.top_k,
                         "capacity_factor": "dropless" if factor is None else f"{factor:g}",
                         "bits_per_byte": result["bits_per_byte"], "accuracy": result["accuracy"],
                         "drop_rate": result["drop_rate"], "tokens_per_call": meta["batch_size"]})
    return pd.DataFrame(rows)


def capacity_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per arm and factor: drop rate, bits per byte and its change against dropless, paired by seed."""
    return _paired_against(sweep, ["arm", "k", "capacity_factor"], sweep["capacity_factor"] == "dropless")


def _readable(data: pd.DataFrame, legend: bool = True) -> tuple:
    """``data`` with each arm under its readable name (ARM_LABELS), and a colour encoding
    that keeps each arm's colour."""
    present = [arm for arm in ARM_ORDER if arm in set(data["arm"])]
    labels = [arm_label(arm) for arm in present]
    colour = alt.Color("arm:N", sort=labels, title="arm",
                       legend=alt.Legend(labelLimit=320) if legend else None,
                       scale=alt.Scale(domain=labels, range=[ARM_COLOURS[ARM_ORDER.index(a)] for a in present]))
    return data.assign(arm=data["arm"].map(arm_label)), colour


def capacity_chart(summary: pd.DataFrame) -> alt.TopLevelMixin:
    """Drop rate and test loss against the inference capacity factor, per arm."""
    order = [f"{f:g}" if f is not None else "dropless" for f in CAPACITY_FACTORS]
    summary, colour = _readable(summary)
    x = alt.X("capacity_factor:O", sort=order, title="capacity factor at inference", axis=alt.Axis(labelAngle=0))
    base = alt.Chart(summary).encode(x=x, color=colour)
    drops = base.mark_line(point=True).encode(y=alt.Y("drop_rate_mean:Q", title="assignments dropped",
                                                      axis=alt.Axis(format="%"))).properties(
        width=250, height=220, title="Drop rate (mean of seeds)")
    loss = base.mark_line(point=True).encode(y=alt.Y("bits_per_byte_mean:Q", title="test bits per byte",
                                                     scale=alt.Scale(zero=False))).properties(
        width=250, height=220, title="Test loss (mean of seeds)")
    return alt.hconcat(drops, loss)


def format_capacity_summary(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "arm": summary["arm"], "k": summary["k"], "capacity factor": summary["capacity_factor"],
        "dropped": summary["drop_rate_mean"].map(lambda v: f"{v:.1%}"),
        "test bits/byte (mean ± std)": [f"{m:.4f} ± {0 if pd.isna(s) else s:.4f}"
                                        for m, s in zip(summary["bits_per_byte_mean"], summary["bits_per_byte_std"])],
        "change vs dropless [95% interval]": [_change_text(r) for r in summary.itertuples()],
        "seeds": summary["n_seeds"],
    })


def capacity_numbers(summary: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Glue: tokens per capacity call, and the per-call capacity C of each k at factor 1."""
    from analysis.study.moe_model import expert_capacity
    batch = int(runs["tokens"].iloc[0] // runs["steps"].iloc[0] // load_checkpoint(
        runs["checkpoint"].iloc[0])[0].cfg.seq_len)
    E = n_experts(runs)
    numbers = {"capacity_call_tokens": batch}
    if isinstance(E, int):
        numbers.update({f"capacity_c_k{k}": expert_capacity(1.0, batch, k, E) for k in (1, 2)})
    else:
        numbers.update({"capacity_c_k1": float("nan"), "capacity_c_k2": float("nan")})
    return numbers


# ---------------------------------------------------------------- kernels cross-check


@torch.no_grad()
def ffn_inputs(model: ByteTransformer, tokens: torch.Tensor) -> dict:
    """Each block's FFN input h (T, D) and PyTorch's FFN output, for `tokens` (B, S)."""
    captured = {}

    def capture(index, ffn, h):
        y = ffn(h)[0] if isinstance(ffn, MoELayer) else ffn(h)
        captured[index] = (h.clone(), y.clone())
        return y

    model.eval()
    model(tokens, ffn_override=capture)
    return captured


def kernels_cross_check(model: ByteTransformer, tokens: torch.Tensor,
                        backends: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Every MoE layer of `model` run through topk_moe.moe_forward on each backend, on the
    layer's real inputs for `tokens`, and PyTorch's own output, all against the float64
    reference under the project's tolerance rule (topk_moe.testing): one row per layer and
    implementation, with the error, the bound, whether it passed, the share of tokens
    routed as PyTorch routed them, and the largest difference from PyTorch's output."""
    backends = list(backends or topk_moe.available_backends())
    rows = []
    for index, (h, torch_y) in ffn_inputs(model, tokens).items():
        layer = model.blocks[index].ffn
        if not isinstance(layer, MoELayer):
            continue
        cfg, weights = to_kernels(layer)
        x = h.numpy().astype(np.float32)
        torch_y = torch_y.numpy()
        torch_experts = layer.route(h, layer.top_k, layer.renormalize)[0].numpy().astype(np.int32)
        torch_routing = topk_moe.Routing(experts=torch_experts, weights=None, probs=None)
        implementations = [("pytorch", torch_y, torch_routing)]
        for backend in backends:
            out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
            implementations.append((backend, testing.to_host(out.y), out.routing))
        for name, y, routing in implementations:
            expected = testing.expected_moe_forward(x, weights, cfg, routing)
            plain = testing.plain_moe_forward(x, weights, cfg, routing)
            error = float(np.max(np.abs(y.astype(np.float64) - expected)))
            bound = testing.error_bound(expected, plain, np.float32)
            same_route = np.all(testing.to_host(routing.experts) == torch_experts, axis=1)
            rows.append({"layer": index, "implementation": name, "max_error_vs_float64": error,
                         "bound": bound, "passed": error <= bound,
                         "tokens_routed_as_pytorch": float(same_route.mean()),
                         "max_diff_from_pytorch": float(np.max(np.abs(y[same_route].astype(np.float64)
                                                                      - torch_y[same_route])))
                         if same_route.any() else float("nan")})
    return pd.DataFrame(rows)


def kernels_ffn_override(model: ByteTransformer, backend: str):
    """An ffn_override that runs every FFN through the kernels (NumPy in, NumPy out)."""
    layers = {}
    for index, block in enumerate(model.blocks):
        if isinstance(block.ffn, MoELayer):
            layers[index] = ("moe", *to_kernels(block.ffn))
        else:
            ffn = block.ffn
            arrays = [None if p is None else p.detach().float().numpy() for p in (ffn.w1, ffn.w2, ffn.w3)]
            layers[index] = ("dense", ffn.activation, arrays)

    def override(index, ffn, h):
        x = h.detach().numpy().astype(np.float32)
        kind, *spec = layers[index]
        if kind == "moe":
            cfg, weights = spec
            y = topk_moe.moe_forward(x, weights, cfg, backend=backend).y
        else:
            activation, (w1, w2, w3) = spec
            y = topk_moe.dense_mlp(x, w1, w2, w3, activation=activation, backend=backend)
        return torch.from_numpy(np.ascontiguousarray(testing.to_host(y), dtype=np.float32))

    return override


@torch.no_grad()
def loss_through_kernels(model: ByteTransformer, data: np.ndarray, *, batch_size: int, max_bytes: int,
                         backends: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Test bits per byte with PyTorch's FFNs, then with every FFN replaced by the kernels
    on each backend; `difference` is kernels minus PyTorch, `passed` |difference| <= tolerance."""
    backends = list(backends or topk_moe.available_backends())
    model.eval()
    windows = eval_windows(data, model.cfg.seq_len, batch_size, max_bytes)

    def bits(override):
        nats, count = 0.0, 0
        for batch in windows:
            tensor = torch.from_numpy(batch)
            out = model(tensor[:, :-1], ffn_override=override)
            nats += float(F_nn.cross_entropy(out.logits.reshape(-1, model.cfg.vocab_size).float(),
                                             tensor[:, 1:].reshape(-1), reduction="sum"))
            count += tensor[:, 1:].numel()
        return nats / count / math.log(2), count

    reference_bits, count = bits(None)
    rows = [{"implementation": "pytorch", "bits_per_byte": reference_bits, "n_bytes": count,
             "difference": 0.0, "tolerance": LOSS_TOLERANCE_BITS, "passed": True}]
    for backend in backends:
        value, _ = bits(kernels_ffn_override(model, backend))
        rows.append({"implementation": f"kernels ({backend})", "bits_per_byte": value, "n_bytes": count,
                     "difference": value - reference_bits, "tolerance": LOSS_TOLERANCE_BITS,
                     "passed": abs(value - reference_bits) <= LOSS_TOLERANCE_BITS})
    return pd.DataFrame(rows)


def assert_all_passed(table: pd.DataFrame, what: str) -> None:
    """Stop the notebook (and `make book`) when a check fails."""
    failed = table[~table["passed"].astype(bool)]
    if len(failed):
        raise AssertionError(f"{what} failed:\n{failed.to_string()}")


def first_window_batch(data: np.ndarray, seq_len: int, batch_size: int) -> torch.Tensor:
    """The first evaluation batch's inputs (B, S), for the cross-check."""
    return torch.from_numpy(eval_windows(data, seq_len, batch_size)[0, :, :-1])


def checkpoint_for(runs: pd.DataFrame, arm: str, seed: Optional[int] = None) -> Path:
    """The checkpoint of `arm` (its lowest seed unless `seed` is given)."""
    chosen = runs[runs["arm"] == arm]
    if seed is not None:
        chosen = chosen[chosen["seed"] == seed]
    if chosen.empty:
        raise KeyError(f"no run of arm {arm!r}" + (f" seed {seed}" if seed is not None else ""))
    return Path(chosen.sort_values("seed").iloc[0]["checkpoint"])


# ---------------------------------------------------------------- prose and published figures


def _mean_bits(summary: pd.DataFrame, arm: str) -> Optional[float]:
    row = summary[summary["arm"] == arm]
    return None if row.empty else float(row["bits_per_byte_mean"].iloc[0])


def headline_numbers(summary: pd.DataFrame) -> dict:
    """Plain numbers for the chapter's prose (glue): each arm's mean test bits per byte and
    the relative differences the chapter discusses (NaN where an arm is missing)."""
    numbers = {}
    for arm in summary["arm"]:
        numbers[f"{arm.replace('-', '_')}_bits"] = _mean_bits(summary, arm)
    for name, arm, baseline in (("k1_vs_dense", "moe-k1", "dense"), ("k2_half_vs_dense", "moe-k2-half", "dense"),
                                ("k2_half_vs_k1", "moe-k2-half", "moe-k1"), ("k2_vs_k1", "moe-k2", "moe-k1"),
                                ("wide_vs_k1", "dense-wide", "moe-k1")):
        ours, base = _mean_bits(summary, arm), _mean_bits(summary, baseline)
        numbers[f"{name}_percent"] = float("nan") if ours is None or base is None else 100 * (ours / base - 1)
    # Cost ratios from the runs' recorded parameter counts: active parameters per token of
    # the whole model (embeddings, attention and router included), and of the FFNs alone.
    for name, arm, baseline in (("k2_vs_k1", "moe-k2", "moe-k1"), ("wide_vs_k1", "dense-wide", "moe-k1")):
        for suffix, column in (("active_ratio", "params_active"), ("ffn_active_ratio", "ffn_params_active")):
            ours, base = _first(summary, arm, column), _first(summary, baseline, column)
            numbers[f"{name}_{suffix}"] = float("nan") if ours is None or base is None else ours / base
    numbers["n_experts"] = n_experts(summary)
    return numbers


def _first(summary: pd.DataFrame, arm: str, column: str) -> Optional[float]:
    row = summary[summary["arm"] == arm]
    if row.empty or column not in row or pd.isna(row[column].iloc[0]):
        return None
    return float(row[column].iloc[0])


def n_experts(table: pd.DataFrame):
    """E of the MoE runs in `table` (runs_table or summary_table): one value, or NaN without MoE runs."""
    values = sorted({int(e) for e in table["n_experts"].dropna()}) if "n_experts" in table else []
    if len(values) > 1:
        raise ValueError(f"n_experts: the runs differ ({values}); the chapter compares one E")
    return values[0] if values else float("nan")


def beside_published(summary: pd.DataFrame, comparisons: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Our relative differences beside the published ones (labelled; far larger models, other data).
    With `comparisons` (paired_comparisons), ours are the paired mean differences by seed,
    marked where they are within noise; without, the differences of the arms' means."""
    from analysis.chapters import published

    numbers = headline_numbers(summary)
    verdicts = {}
    if comparisons is not None:
        for row in comparisons.itertuples():
            key = {("moe-k1", "dense"): "k1_vs_dense", ("moe-k2-half", "dense"): "k2_half_vs_dense",
                   ("moe-k2-half", "moe-k1"): "k2_half_vs_k1", ("moe-k2", "moe-k1"): "k2_vs_k1",
                   ("dense-wide", "moe-k1"): "wide_vs_k1"}.get((row.arm, row.baseline))
            if key:
                numbers[f"{key}_percent"] = 100 * row.relative
                verdicts[f"{key}_percent"] = "paired" if row.supported else "paired, within noise"
    dense_loss = published.entry("DeepSeekMoE", "Pile validation loss, dense")
    dense = published.value("DeepSeekMoE", "Pile validation loss, dense")
    top1 = published.value("DeepSeekMoE", "Pile validation loss, top-1 (Switch)")
    top2 = published.value("DeepSeekMoE", "Pile validation loss, top-2 (GShard)")
    switch_quality = published.entry("Switch Transformer", "top-1 MoE vs dense at matched compute per token")
    switch_speed = published.text("Switch Transformer", "throughput of the top-1 MoE relative to dense")
    st_moe = published.entry("ST-MoE", "top-2 over top-1 routing, gain in negative log perplexity")

    def ours(key: str) -> str:
        value = numbers.get(key, float("nan"))
        if value != value:
            return "not trained"
        return f"{value:+.2f}% bits/byte" + (f" ({verdicts[key]})" if key in verdicts else "")

    def cited(entry: dict) -> str:
        return f"{entry['source']}, {entry['where']}"

    rows = [
        ("top-1 MoE vs dense, equal active FLOPs", ours("k1_vs_dense_percent"),
         f"{100 * (top1 / dense - 1):+.1f}% loss ({top1:.3f} vs {dense:.3f})", cited(dense_loss)),
        ("top-1 MoE vs dense, equal active FLOPs", ours("k1_vs_dense_percent"),
         f"{switch_quality['value_text']}, at {switch_speed} the throughput", cited(switch_quality)),
        ("top-2 vs top-1, equal expert size (top-2: twice the FFN FLOPs)", ours("k2_vs_k1_percent"),
         f"{100 * (top2 / top1 - 1):+.1f}% loss ({top2:.3f} vs {top1:.3f})", cited(dense_loss)),
        ("top-2 vs top-1", ours("k2_vs_k1_percent"), f"{st_moe['value_text']} neg. log perplexity (better)",
         cited(st_moe)),
        ("top-2 vs top-1, equal active FLOPs (half-width experts)", ours("k2_half_vs_k1_percent"), "—", "—"),
        ("dense of equal total parameters vs top-1 MoE", ours("wide_vs_k1_percent"), "—", "—"),
    ]
    return pd.DataFrame(rows, columns=["comparison", "ours (this study)", "published (far larger models)",
                                       "source"])


# ---------------------------------------------------------------- speed beside accuracy (issue 23, item 1)

#: Readable names for the arms, for legends and tables (the record keys stay the short names).
ARM_LABELS = {
    "dense": "dense (width F_d)",
    "moe-k1": "top-1 MoE",
    "moe-k2-half": "top-2 MoE, half-width experts",
    "moe-k2": "top-2 MoE",
    "dense-wide": "dense, width E·F_d",
    "moe-k1-nobal": "top-1 MoE, no balancing loss",
    "moe-k2-half-nobal": "top-2 half-width, no balancing loss",
}
#: The records of ``python -m analysis.study.arm_costs``.
COST_KIND = "arm-cost"
#: The arm every measured step time is divided by, round by round.
COST_BASELINE = "moe-k1"


def arm_label(arm: str) -> str:
    """The arm's readable name (the short name itself for an arm not in ARM_LABELS)."""
    return ARM_LABELS.get(arm, arm)


def cost_records(results_dir=None, *, preset: str = "cpu") -> list:
    """The newest ``arm-cost`` run of ``preset`` (one utc), or [] without one."""
    try:
        found = [r for r in records.read_records(COST_KIND, results_dir=results_dir)
                 if r["params"]["preset"] == preset]
    except FileNotFoundError:
        return []
    if not found:
        return []
    newest = max(r["utc"] for r in found)
    return [r for r in found if r["utc"] == newest]


def measured_costs(cost: list) -> pd.DataFrame:
    """Per arm, from one arm-cost run: the median over rounds of the training step and of the
    FFN layer (kernels and torch), and the step's ratio to COST_BASELINE paired by round
    with its 95% interval (Student's t over rounds, analysis.intervals)."""
    from analysis.intervals import t_interval  # noqa: PLC0415

    rows = pd.DataFrame([{"arm": r["params"]["arm"], "round": r["params"]["round"],
                          "train_step_s": r["train_step"]["median_s"], "kernels_layer_s": r["kernels_layer"]["median_s"],
                          "torch_layer_s": r["torch_layer"]["median_s"],
                          "forward_flops_per_token": r["forward_flops_per_token"],
                          "ffn_layer_flops_per_token": r["ffn_layer_flops_per_token"],
                          "tokens": r["params"]["tokens"], "load": r["params"]["load_average_1min"]} for r in cost])
    baseline = rows[rows["arm"] == COST_BASELINE].set_index("round")["train_step_s"]
    out = []
    for arm, mine in rows.groupby("arm", sort=False):
        step = mine.set_index("round")["train_step_s"]
        ratios = (step / baseline).dropna()
        mean, _, half = t_interval(ratios.to_numpy()) if len(ratios) >= 2 else (float("nan"),) * 3
        out.append({"arm": arm, "rounds": len(mine), "train_step_s": float(step.median()),
                    "kernels_layer_s": float(mine["kernels_layer_s"].median()),
                    "torch_layer_s": float(mine["torch_layer_s"].median()),
                    "step_ratio": mean, "step_ratio_low": mean - half, "step_ratio_high": mean + half,
                    "forward_flops_per_token": float(mine["forward_flops_per_token"].iloc[0]),
                    "ffn_layer_flops_per_token": float(mine["ffn_layer_flops_per_token"].iloc[0]),
                    "tokens": int(mine["tokens"].iloc[0]),
                    "load_low": float(rows["load"].min()), "load_high": float(rows["load"].max())})
    frame = pd.DataFrame(out)
    frame["rank"] = frame["arm"].map(_arm_rank)
    return frame.sort_values("rank").drop(columns="rank").reset_index(drop=True)


def bits_intervals(scores: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean test bits per byte over seeds and its 95% interval (Student's t)."""
    from analysis.intervals import t_interval  # noqa: PLC0415

    rows = []
    for arm, mine in scores.groupby("arm", sort=False):
        values = mine["bits_per_byte"].to_numpy()
        mean, _, half = t_interval(values) if len(values) >= 2 else (float(values.mean()), 0.0, float("nan"))
        rows.append({"arm": arm, "seeds": len(values), "bits_per_byte": mean, "bits_low": mean - half,
                     "bits_high": mean + half, "params_total": int(mine["params_total"].iloc[0]),
                     "params_active": int(mine["params_active"].iloc[0]),
                     "recorded_step_s": float(mine["seconds_per_step"].median())})
    return pd.DataFrame(rows)


def cost_table(scores: pd.DataFrame, cost: list, arms: Sequence[str] = MAIN_ARMS) -> pd.DataFrame:
    """One row per main arm: quality, size, FLOPs, the FFN layer's time at the models' own
    shape and the training step, measured on this CPU (bits_intervals joined with
    measured_costs); an arm without cost records has NaN times."""
    table = bits_intervals(scores[scores["arm"].isin(arms)])
    if cost:
        table = table.merge(measured_costs(cost), on="arm", how="left")
    table["rank"] = table["arm"].map(_arm_rank)
    return table.sort_values("rank").drop(columns="rank").reset_index(drop=True)


def format_cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """The cost table as the book prints it: words and units in the headers."""
    tokens = int(table["tokens"].dropna().iloc[0]) if "tokens" in table and table["tokens"].notna().any() else None
    out = pd.DataFrame({
        "arm": table["arm"].map(arm_label),
        "test bits/byte (95% interval)": [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                                          zip(table["bits_per_byte"], table["bits_low"], table["bits_high"])],
        "parameters": table["params_total"],
        "active parameters per token": table["params_active"],
    })
    if tokens is not None:
        out["forward kFLOP per token"] = table["forward_flops_per_token"] / 1e3
        out[f"FFN layer, kernels (ms, {tokens:,} tokens)"] = 1e3 * table["kernels_layer_s"]
        out["training step (ms)"] = 1e3 * table["train_step_s"]
        out[f"step / {arm_label(COST_BASELINE)}'s (95% interval)"] = [
            "1 (the baseline)" if arm == COST_BASELINE else f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for arm, r, lo, hi in
            zip(table["arm"], table["step_ratio"], table["step_ratio_low"], table["step_ratio_high"])]
    out["training step, recorded (ms, median of seeds)"] = 1e3 * table["recorded_step_s"]
    return out


def quality_time_chart(table: pd.DataFrame) -> alt.TopLevelMixin:
    """Test bits per byte (95% interval) against the measured training step, one point per arm:
    down and to the left is better (Switch Transformer's Table 1, as a picture)."""
    data = table.dropna(subset=["train_step_s"]).assign(
        step_ms=lambda f: 1e3 * f["train_step_s"], label=lambda f: f["arm"].map(arm_label))
    order = [arm_label(a) for a in ARM_ORDER if a in set(data["arm"])]
    scale = alt.Scale(domain=order, range=[ARM_COLOURS[ARM_ORDER.index(a)] for a in ARM_ORDER if a in set(data["arm"])])
    colour = alt.Color("label:N", sort=order, title="arm", scale=scale)
    pad = 0.1 * (data["step_ms"].max() - data["step_ms"].min())
    x = alt.X("step_ms:Q", title="training step on this CPU (ms, measured paired)",
              scale=alt.Scale(domain=[max(0.0, data["step_ms"].min() - pad), data["step_ms"].max() + pad]))
    y_scale = alt.Scale(zero=False, domain=[float(data["bits_low"].min()) - 0.01, float(data["bits_high"].max()) + 0.01])
    base = alt.Chart(data)
    bars = base.mark_rule(strokeWidth=2).encode(x=x, y=alt.Y("bits_low:Q", scale=y_scale), y2="bits_high:Q",
                                                color=alt.Color("label:N", sort=order, legend=None, scale=scale))
    points = base.mark_point(filled=True, size=80).encode(
        x=x, y=alt.Y("bits_per_byte:Q", title="test bits per byte (lower is better)", scale=y_scale), color=colour)
    return alt.layer(bars, points).resolve_legend(color="independent").properties(
        width=420, height=260, title="Quality against training time per step (bars: 95% interval over seeds)")


def recorded_step_numbers(runs: pd.DataFrame, arm: str = "moe-k2-half") -> dict:
    """Why an arm's recorded ms/step is what it is: its seeds' ms/step grouped by the day
    they were trained, beside the arms trained the same day (glue for the prose)."""
    mine = runs[runs["arm"] == arm].assign(day=lambda f: f["utc"].str[:10])
    if mine.empty:
        return {}
    days = sorted(set(mine["day"]))
    numbers = {"slow_arm": arm_label(arm), "slow_arm_mean_ms": 1e3 * float(mine["seconds_per_step"].mean()),
               "slow_arm_days": len(days)}
    first = mine[mine["day"] == days[0]]
    later = mine[mine["day"] != days[0]]
    numbers["first_day"], numbers["first_day_seeds"] = days[0], ", ".join(str(s) for s in first["seed"])
    numbers["first_day_ms"] = (f"{1e3 * first['seconds_per_step'].min():.0f} to "
                               f"{1e3 * first['seconds_per_step'].max():.0f} ms")
    numbers["later_seeds"] = ", ".join(f"seed {s} on {d} ({1e3 * t:.0f} ms)" for s, d, t in
                                       zip(later["seed"], later["day"], later["seconds_per_step"]))
    same_day = runs[runs["utc"].str[:10] == days[0]]
    k2 = same_day[same_day["arm"] == "moe-k2"]["seconds_per_step"]
    numbers["k2_same_day_ms"] = f"{1e3 * k2.min():.0f} to {1e3 * k2.max():.0f} ms" if len(k2) else "not trained"
    return numbers


def cost_numbers(table: pd.DataFrame, cost: list) -> dict:
    """Glue: the measurement's setting and each arm's paired step ratio to top-1 MoE."""
    if not cost:
        return {"cost_measured": False}
    numbers = {"cost_measured": True, "cost_rounds": int(table["rounds"].max()),
               "cost_load": f"{table['load_low'].min():.1f} to {table['load_high'].max():.1f}",
               "cost_tokens": f"{int(table['tokens'].iloc[0]):,}", "cost_utc": cost[0]["utc"][:16].replace("T", " "),
               "cost_threads": cost[0]["params"]["torch_threads"]}
    for row in table.itertuples():
        key = row.arm.replace("-", "_")
        numbers[f"{key}_step_ms"] = 1e3 * row.train_step_s
        numbers[f"{key}_step_ratio"] = (f"{row.step_ratio:.2f}x [{row.step_ratio_low:.2f}, "
                                        f"{row.step_ratio_high:.2f}]")
        numbers[f"{key}_layer_ms"] = 1e3 * row.kernels_layer_s
    return numbers


# ---------------------------------------------------------------- the regime over training (issue 23, item 9)

#: The comparisons followed through training (arm, baseline), as in COMPARISONS.
REGIME_PAIRS = (("moe-k1", "dense"), ("moe-k2-half", "dense"), ("moe-k2", "moe-k1"), ("dense-wide", "moe-k1"))


def validation_curves(results_dir=None, *, preset: str = "cpu", runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The validation bits per byte logged during training (every val_every steps), per run."""
    runs = runs if runs is not None else runs_table(results_dir, preset=preset)
    wanted = set(runs["run_id"])
    rows = [{"arm": r["params"]["arm"], "seed": int(r["params"]["seed"]), "step": r["step"],
             "validation_bits_per_byte": r["validation_bits_per_byte"]}
            for r in all_records(TRAIN_LOG_KIND, results_dir)
            if r["params"]["run_id"] in wanted and r.get("validation_bits_per_byte") is not None]
    return pd.DataFrame(rows, columns=["arm", "seed", "step", "validation_bits_per_byte"])


def gap_over_training(validation: pd.DataFrame, pairs=REGIME_PAIRS) -> pd.DataFrame:
    """For each (arm, baseline) and validation step: the mean over shared seeds of arm minus
    baseline validation bits per byte, with the number of seeds where the arm is lower."""
    rows = []
    for arm, baseline in pairs:
        mine = validation[validation["arm"] == arm].set_index(["seed", "step"])["validation_bits_per_byte"]
        base = validation[validation["arm"] == baseline].set_index(["seed", "step"])["validation_bits_per_byte"]
        joined = pd.concat({"arm": mine, "base": base}, axis=1).dropna()
        for step, group in joined.groupby(level="step"):
            difference = group["arm"] - group["base"]
            rows.append({"arm": arm, "baseline": baseline, "step": int(step), "gap": float(difference.mean()),
                         "seeds": len(difference), "seeds_arm_lower": int((difference < 0).sum())})
    return pd.DataFrame(rows, columns=["arm", "baseline", "step", "gap", "seeds", "seeds_arm_lower"])


def regime_table(gaps: pd.DataFrame) -> pd.DataFrame:
    """Per comparison: the gap at each validation step (columns), whether its sign holds and
    whether it widens or narrows from the first validation to the last."""
    rows = []
    for (arm, baseline), group in gaps.groupby(["arm", "baseline"], sort=False):
        group = group.sort_values("step")
        first, last = group["gap"].iloc[0], group["gap"].iloc[-1]
        holds = bool((group["gap"] < 0).all() or (group["gap"] > 0).all())
        row = {"comparison": f"{arm_label(arm)} − {arm_label(baseline)}"}
        for step, gap in zip(group["step"], group["gap"]):
            row[f"step {step:,}"] = gap
        previous = group["gap"].iloc[-2] if len(group) > 1 else first
        row["sign holds"] = "yes" if holds else "no"
        row["first to last"] = "widens" if abs(last) > abs(first) else "narrows"
        row["last interval"] = "widens" if abs(last) > abs(previous) else "narrows"
        rows.append(row)
    return pd.DataFrame(rows)


def regime_sentence(gaps: pd.DataFrame, *, short: bool = False) -> str:
    """Whether each ordering holds through training and how its gap moves: two sentences,
    or one with ``short``."""
    if gaps.empty:
        return "The training records hold no validation scores, so the orderings during training are unknown."
    table = regime_table(gaps)
    steps = sorted(set(gaps["step"]))
    held = int((table["sign holds"] == "yes").sum())
    widening = int((table["first to last"] == "widens").sum())
    still = int((table["last interval"] == "widens").sum())
    if short:
        return (f"Through training, {held} of the {len(table)} orderings keep their sign at every validation "
                f"step, and {still} of the {len(table)} gaps still widen at the end.")
    return (f"On the validation bytes scored every {steps[1] - steps[0]:,} steps, {held} of the {len(table)} "
            f"orderings keep their sign from step {steps[0]:,} to {steps[-1]:,}. {widening} of the {len(table)} "
            f"gaps are wider at the end than at the start, and {still} still widen over the last "
            f"{steps[-1] - steps[-2]:,} steps, so the gaps are not yet settled.")


# ---------------------------------------------------------------- tables that fit the page (issue 23, item 6)


def arms_views(arms_table: pd.DataFrame) -> tuple:
    """train.arms_table as two tables that fit the page: what each arm is, and its size."""
    table = arms_table.reset_index() if "arm" not in arms_table.columns else arms_table
    table = table.assign(arm=table["arm"].map(arm_label))
    what = table[["arm", "comparison", "FFN", "k", "F", "experts", "renormalise", "balancing loss weight"]]
    size = table[["arm", "FFN parameters (total)", "FFN parameters (active per token)", "all parameters (total)"]]
    return what, size


def summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    """format_summary narrowed to the page: the arm's readable name, k, parameters and scores
    (width and comparison are in the arms tables, the step time in the cost table)."""
    table = format_summary(summary)
    table["arm"] = table["arm"].map(arm_label)
    return table.drop(columns=["comparison", "F", "ms/step", "parameters (total / active)"])


def paired_view(comparisons: pd.DataFrame) -> pd.DataFrame:
    """format_paired without the per-seed differences (the figure draws them, the prose
    quotes them), the relative change and the seeds a test would need (the prose gives
    them), so that it fits the page."""
    return format_paired(comparisons).drop(columns=["per-seed difference (bits/byte)", "relative",
                                                    "seeds for 80% power", "seeds"]).rename(
        columns={"paired t-test p": "p"})


def paired_caption(comparisons: pd.DataFrame) -> str:
    """How many seeds each comparison pairs, for the caption of paired_view's table."""
    counts = comparisons.groupby("n")["comparison"].apply(list)
    usual = max(counts.index, key=lambda n: len(counts[n]))
    if len(counts) == 1:
        return f"Every comparison pairs {int(usual)} seeds."
    others = "; ".join(f"{', '.join(names)}: {int(n)}" for n, names in counts.items() if n != usual)
    return f"Each comparison pairs {int(usual)} seeds, except {others}."


def cost_views(formatted: pd.DataFrame) -> tuple:
    """format_cost_table as two tables that fit the page: quality and size, then cost."""
    quality = [c for c in formatted.columns if c in ("arm", "test bits/byte (95% interval)", "parameters",
                                                      "active parameters per token", "forward kFLOP per token")]
    cost = ["arm"] + [c for c in formatted.columns if c not in quality]
    return formatted[quality], formatted[cost]


def published_view() -> pd.DataFrame:
    """The published accuracy figures, narrow (the citations are on the References page)."""
    from analysis.chapters import published  # noqa: PLC0415

    return published.anchors("accuracy")[["source", "where", "quantity", "published"]]


def k_summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    """format_k_summary narrowed: the reference row says "0 (the reference)" in its change."""
    table = format_k_summary(summary)
    table["arm"] = table["arm"].map(arm_label)
    return table.drop(columns=["as trained", "seeds"])


def cross_check_view(summary: pd.DataFrame) -> pd.DataFrame:
    """cross_check_summary in words."""
    table = summary.reset_index()
    return pd.DataFrame({"arm": table["arm"].map(arm_label), "implementation": table["implementation"],
                         "layers": table["layers"], "worst error / bound": table["max_error_over_bound"],
                         "fewest tokens routed as PyTorch": table["min_tokens_routed_as_pytorch"],
                         "every layer passed": table["all_passed"].map({True: "yes", False: "no"})})


def loss_check_view(loss_checks: pd.DataFrame) -> pd.DataFrame:
    """The test loss through the kernels against PyTorch's, in words."""
    table = loss_checks.copy()
    names = {"arm": "arm", "implementation": "implementation", "bits_per_byte": "test bits/byte",
             "n_bytes": "bytes scored", "difference": "difference from PyTorch (bits/byte)", "passed": "passed"}
    if "arm" in table:
        table["arm"] = table["arm"].map(arm_label)
    if "passed" in table:
        table["passed"] = table["passed"].map({True: "yes", False: "no"})
    return table[[c for c in names if c in table.columns]].rename(columns=names)
