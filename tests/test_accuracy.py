"""Training CLI, evaluation, the inference-time experiments and the kernels cross-check,
on the `tiny` preset trained into a temporary folder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import charts
from analysis.chapters import accuracy
from analysis.study import corpus, train
from analysis.study.moe_model import load_checkpoint

ARMS = ["dense", "moe-k1", "moe-k2-half"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accuracy")
    train.train_all(train.PRESETS["tiny"], ARMS, [0], results_dir=folder, progress=False,
                    echo=lambda message: None)
    return folder


def test_runs_are_recorded_with_checkpoints(results):
    runs = accuracy.runs_table(results, preset="tiny")
    assert list(runs["arm"]) == ARMS and set(runs["seed"]) == {0}
    for run in runs.itertuples():
        assert (results / "checkpoints" / "tiny" / f"{run.arm}-seed0.pt").is_file()
        assert run.tokens == train.PRESETS["tiny"].steps * train.PRESETS["tiny"].tokens_per_step
    manifest = corpus.manifest()
    assert (runs["corpus_sha256"] == manifest["sha256"]).all() and (runs["corpus_python"] == manifest["python"]).all()
    assert accuracy.corpus_note(runs, manifest).startswith(f"All {len(ARMS)} checkpoints were trained on this")
    curves = accuracy.train_curves(results, preset="tiny")
    assert set(curves["arm"]) == set(ARMS)
    moe = curves[curves["arm"] == "moe-k1"].iloc[-1]
    assert len(moe["load_fraction"]) == train.PRESETS["tiny"].n_layers
    assert sum(moe["load_fraction"][0]) == pytest.approx(1.0)


def test_evaluate_reproduces_the_recorded_test_metrics(results):
    runs = accuracy.runs_table(results, preset="tiny")
    for run in runs.itertuples():
        result = accuracy.evaluate(run.checkpoint, split="test")
        assert result["bits_per_byte"] == pytest.approx(run.bits_per_byte, abs=1e-6)
        assert result["accuracy"] == pytest.approx(run.accuracy, abs=1e-9)
        assert result["corpus_matches"]
        assert 0 < result["accuracy"] < 1 and 0 < result["bits_per_byte"] < 8.5


def test_training_resumes_by_skipping_finished_runs(results, capsys):
    assert train.main(["--preset", "tiny", "--arms", ",".join(ARMS), "--seeds", "0",
                       "--results-dir", str(results), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already, skipped") == len(ARMS)
    assert "trained 0 run(s)" in printed


def test_the_cli_rejects_unknown_arms():
    with pytest.raises(SystemExit):
        train.main(["--preset", "tiny", "--arms", "sparse"])


def test_every_arm_sees_the_same_data_order():
    a = train.batch_offsets(10_000, 16, 4, 5, seed=1)
    np.testing.assert_array_equal(a, train.batch_offsets(10_000, 16, 4, 5, seed=1))
    assert not np.array_equal(a, train.batch_offsets(10_000, 16, 4, 5, seed=2))


def test_arms_compare_what_they_say():
    preset = train.PRESETS["cpu"]
    from analysis.study.moe_model import parameter_counts
    count = {name: parameter_counts(train.model_config(preset, arm)) for name, arm in train.ARMS.items()}
    assert count["moe-k1"]["ffn_active"] == count["dense"]["ffn_active"] == count["moe-k2-half"]["ffn_active"]
    assert count["moe-k2"]["ffn_active"] == 2 * count["dense"]["ffn_active"]
    assert count["dense-wide"]["ffn_total"] == count["moe-k1"]["ffn_total"] == count["moe-k2"]["ffn_total"]
    assert train.model_config(preset, train.ARMS["moe-k1-nobal"]).balance_loss_weight == 0.0
    assert not train.model_config(preset, train.ARMS["moe-k1"]).renormalize
    assert train.model_config(preset, train.ARMS["moe-k2"]).renormalize


def test_inference_k_and_capacity_experiments(results):
    runs = accuracy.runs_table(results, preset="tiny")
    table = accuracy.inference_k_table(runs, max_bytes=1024)
    assert set(table["arm"]) == {"moe-k1", "moe-k2-half"} and len(table) == 2 * 4
    summary = accuracy.inference_k_summary(table)
    assert (summary.loc[summary["as_trained"], "change_vs_trained"] == 0).all()
    sweep = accuracy.capacity_sweep(runs, max_bytes=1024)
    dropless = sweep[sweep["capacity_factor"] == "dropless"]
    assert (dropless["drop_rate"] == 0).all()
    by_factor = sweep.groupby("capacity_factor")["drop_rate"].mean()
    # Causal scope: each position of a batch of 4 windows is one call of 4 tokens, so
    # C = ceil(0.5 * 4 * k / 8) = 1 for both k: at most E = 8 of 4k assignments kept.
    assert by_factor["0.5"] >= by_factor["2"] >= 0 and by_factor["0.5"] > 0
    assert dropless.set_index("arm")["bits_per_byte"].to_dict() == pytest.approx(
        runs.set_index("arm").loc[["moe-k1", "moe-k2-half"], "bits_per_byte"].to_dict(), abs=0.5)


def test_the_trained_moe_layers_match_the_kernels(results):
    runs = accuracy.runs_table(results, preset="tiny")
    model, _ = load_checkpoint(accuracy.checkpoint_for(runs, "moe-k2-half"))
    data = corpus.load_corpus()["test"]
    check = accuracy.kernels_cross_check(model, accuracy.first_window_batch(data, model.cfg.seq_len, 4))
    assert set(check["implementation"]) >= {"pytorch", "reference", "cpu"}
    accuracy.assert_all_passed(check, "kernels cross-check")
    loss = accuracy.loss_through_kernels(model, data, batch_size=4, max_bytes=512)
    accuracy.assert_all_passed(loss, "loss through the kernels")
    assert loss["difference"].abs().max() < accuracy.LOSS_TOLERANCE_BITS


def test_a_failing_check_stops_the_chapter():
    import pandas as pd
    with pytest.raises(AssertionError, match="cross-check"):
        accuracy.assert_all_passed(pd.DataFrame({"passed": [True, False]}), "cross-check")


def test_eval_windows_are_whole_batches():
    data = np.arange(1000, dtype=np.uint8)
    windows = accuracy.eval_windows(data, seq_len=10, batch_size=4, max_bytes=95)
    assert windows.shape == (2, 4, 11)  # 9 windows of 10 -> 2 whole batches of 4
    np.testing.assert_array_equal(windows[0, 1], np.arange(10, 21))
    with pytest.raises(ValueError, match="max_bytes"):
        accuracy.eval_windows(data, seq_len=10, batch_size=4, max_bytes=20)


def test_records_carry_provenance_and_the_corpus(results):
    path = next(results.glob("*/accuracy-eval.jsonl"))
    record = json.loads(path.read_text().splitlines()[0])
    for field in ("device", "utc", "git_commit", "torch", "python"):
        assert field in record
    assert record["params"]["corpus_sha256"] == corpus.manifest()["sha256"]
    assert record["kind"] == "accuracy-eval"
    torch.load(results / record["params"]["checkpoint"], weights_only=True)


def _scored(corpus_sha256, corpus_matches, difference):
    import pandas as pd
    n = len(corpus_matches)
    return pd.DataFrame({"arm": ["moe-k1"] * n, "seed": list(range(n)), "corpus_python": ["3.99.0"] * n,
                         "corpus_sha256": corpus_sha256, "corpus_matches": corpus_matches,
                         "difference": difference, "bits_per_byte": [2.0] * n,
                         "recorded_bits_per_byte": [2.0 - d for d in difference]})


def test_the_chapter_names_checkpoints_trained_on_another_corpus():
    here = {"python": "3.12.1", "sha256": "a" * 64}
    same = _scored(["a" * 64] * 2, [True, True], [1e-7, -3e-7])
    assert accuracy.corpus_note(same, here).startswith("All 2 checkpoints were trained on this machine's corpus")
    note = accuracy.reproduction_note(same, here)
    assert note.startswith("All 2 checkpoints") and "reproducing" in note and "3.0e-07" in note
    assert "Warning" not in note

    mixed = _scored(["a" * 64, "b" * 64], [True, False], [1e-7, 0.25])
    accuracy.assert_reproduced(mixed)  # the foreign run is not compared...
    corpus_note = accuracy.corpus_note(mixed, here)
    note = accuracy.reproduction_note(mixed, here)
    for text in (corpus_note, note):  # ...and the chapter says so, naming both corpora
        assert "Warning" in text and "Python 3.99.0" in text and "b" * 16 in text
        assert "Python 3.12.1" in text and "a" * 16 in text
    assert "moe-k1 seed 1" in corpus_note and "moe-k1 seed 0" not in corpus_note
    assert note.startswith("1 of 2 checkpoints were trained on this machine's corpus")
    assert "Warning: 1 of 2 checkpoints were trained on another corpus" in note
    assert "not a check of reproduction" in note and "0.25" in note

    with pytest.raises(AssertionError, match="differ from their records"):
        accuracy.assert_reproduced(_scored(["a" * 64], [True], [1e-3]))
    assert "not compared" in accuracy.reproduction_note(mixed, here, rescored_bytes=4096)


def test_cost_ratios_come_from_the_recorded_parameter_counts():
    import pandas as pd
    from analysis.study.moe_model import parameter_counts
    preset = train.PRESETS["cpu"]
    rows = []
    for arm in ("dense", "moe-k1", "moe-k2", "dense-wide"):
        cfg = train.model_config(preset, train.ARMS[arm])
        counts = parameter_counts(cfg)
        rows.append({"arm": arm, "bits_per_byte_mean": 2.0, "n_experts": cfg.n_experts if cfg.is_moe else None,
                     "params_active": counts["active"], "ffn_params_active": counts["ffn_active"]})
    numbers = accuracy.headline_numbers(pd.DataFrame(rows))
    assert numbers["wide_vs_k1_ffn_active_ratio"] == preset.n_experts  # FFN only: E by construction
    assert numbers["k2_vs_k1_ffn_active_ratio"] == 2
    assert numbers["wide_vs_k1_active_ratio"] == pytest.approx(516_992 / 131_456)  # whole model: far less
    assert numbers["k2_vs_k1_active_ratio"] == pytest.approx(186_752 / 131_456)
    assert numbers["n_experts"] == preset.n_experts
    missing = accuracy.headline_numbers(pd.DataFrame(rows[:2]))
    assert np.isnan(missing["wide_vs_k1_active_ratio"]) and np.isnan(missing["k2_vs_k1_percent"])


def test_published_figures_are_read_from_the_one_table(monkeypatch):
    import pandas as pd
    from analysis.chapters import published
    changed = [dict(entry) for entry in published.ANCHORS]
    for entry in changed:
        if entry["source"] == "ST-MoE":
            entry["value_text"] = "about +0.123 to +0.456"
        if entry["quantity"] == "throughput of the top-1 MoE relative to dense":
            entry["value_text"] = "~0.77x"
    monkeypatch.setattr(published, "ANCHORS", changed)
    summary = pd.DataFrame({"arm": ["dense", "moe-k1", "moe-k2"], "bits_per_byte_mean": [2.0, 1.9, 1.8]})
    table = accuracy.beside_published(summary)
    column = table["published (far larger models)"]
    assert column.str.contains(r"\+0\.123 to \+0\.456").any() and column.str.contains("~0.77x").any()
    assert not column.str.contains("0.62|0.004").any()


def test_whole_split_rescore_records_feed_the_chapter(results, capsys):
    from analysis.study import evaluation
    assert evaluation.main(["--preset", "tiny", "--results-dir", str(results), "--batch-size", "1024",
                            "--no-progress"]) == 0
    assert f"wrote {len(ARMS)} accuracy-rescore record(s)" in capsys.readouterr().out
    assert evaluation.rescore_all("tiny", results, progress=False, echo=lambda m: None) == []  # resumable
    runs = accuracy.runs_table(results, preset="tiny")
    scores = accuracy.held_out_scores(runs, source="records", results_dir=results)
    split = corpus.load_corpus()["test"]
    seq_len = train.PRESETS["tiny"].seq_len
    assert (scores["eval_bytes"] == (split.size - 1) // seq_len * seq_len).all()
    assert (scores["files_scored"] == scores["split_files"]).all()
    assert (scores["prefix_bits_per_byte"] == runs["bits_per_byte"]).all()
    assert "re-scored dense seed 0 here" in accuracy.verify_scores_live(scores, "records")["verification"]
    # A run without a record is named, with the command that writes one.
    with pytest.raises(FileNotFoundError, match="python -m analysis.study.evaluation --preset tiny"):
        accuracy.held_out_scores(runs.assign(run_id="unknown"), source="records", results_dir=results)


def test_paired_comparisons_pair_by_seed():
    import pandas as pd
    scores = pd.DataFrame({"arm": ["dense"] * 3 + ["moe-k1"] * 4, "seed": [0, 1, 2, 0, 1, 2, 3],
                           "bits_per_byte": [2.0, 2.1, 2.2, 1.9, 2.05, 2.05, 1.0]})
    table = accuracy.paired_comparisons(scores)
    assert list(table["comparison"]) == ["top-1 MoE vs dense"]  # the other arms were not trained
    row = table.iloc[0]
    assert row["seeds"] == [0, 1, 2]  # seed 3 has no dense partner
    np.testing.assert_allclose(row["differences"], [-0.1, -0.05, -0.15])
    assert row["mean"] == pytest.approx(-0.1) and row["low"] < row["mean"] < row["high"]
    numbers = accuracy.paired_numbers(table)
    assert numbers["moe_k1_vs_dense_differences"] == "-0.100, -0.050, -0.150"
    assert numbers["moe_k1_vs_dense_verdict"] == ("a supported difference" if row["supported"] else "within noise")
    printed = accuracy.format_paired(table)
    assert "comparison" in printed.columns and printed["seeds"].iloc[0] == 3


@pytest.mark.parametrize("parameters, message", [
    (dict(preset="big"), "preset: expected one of"),
    (dict(scratch="yes"), "scratch: expected True or False"),
    (dict(scores="cache"), "scores: expected None or one of"),
    (dict(scratch=True, scores="records"), "scratch run has no accuracy-rescore records"),
    (dict(experiment_bytes=10), "experiment_bytes: expected a whole number of bytes, at least 256, got 10"),
])
def test_bad_parameters_stop_the_chapter_with_one_sentence(parameters, message):
    good = dict(preset="cpu", scratch=False, scores=None, experiment_bytes=65536, check_bytes=4096)
    with pytest.raises(ValueError, match=message):
        accuracy.check_parameters(**{**good, **parameters})
    accuracy.check_parameters(**good)


def test_smoke_tests_say_so():
    assert "Smoke test" in repr(accuracy.smoke_test_note("tiny", False))
    assert "Smoke test" in repr(accuracy.smoke_test_note("cpu", True))
    assert accuracy.smoke_test_note("cpu", False) is None


# ---------------------------------------------------------------- issue 23: speed beside accuracy, the regime


def _cost_record(arm: str, round_index: int, step_s: float) -> dict:
    timing = {"median_s": step_s, "p20_s": step_s, "p80_s": step_s, "repeats": 3}
    return {"utc": "2026-12-07T00:00:00Z", "params": {"preset": "cpu", "arm": arm, "round": round_index,
                                                      "tokens": 2048, "load_average_1min": 3.0, "torch_threads": 1},
            "train_step": timing, "kernels_layer": {**timing, "median_s": step_s / 10},
            "torch_layer": {**timing, "median_s": step_s / 20}, "forward_flops_per_token": 3e5,
            "ffn_layer_flops_per_token": 1e5}


def test_measured_costs_pair_each_round_with_the_baseline():
    # Round 1 is twice as slow for both arms (load): the paired ratio stays 1.5 exactly.
    cost = [_cost_record("moe-k1", r, 0.05 * (1 + r)) for r in range(3)]
    cost += [_cost_record("moe-k2", r, 0.075 * (1 + r)) for r in range(3)]
    table = accuracy.measured_costs(cost)
    k2 = table.set_index("arm").loc["moe-k2"]
    assert k2["step_ratio"] == pytest.approx(1.5) and k2["step_ratio_high"] - k2["step_ratio_low"] < 1e-9
    assert k2["train_step_s"] == pytest.approx(0.15) and k2["rounds"] == 3


def test_cost_table_joins_quality_and_cost():
    scores = pd.DataFrame({"arm": ["moe-k1"] * 3 + ["moe-k2"] * 3, "seed": [0, 1, 2] * 2,
                           "bits_per_byte": [2.2, 2.1, 2.15, 2.0, 2.05, 2.1], "params_total": [10] * 6,
                           "params_active": [5] * 6, "seconds_per_step": [0.07, 0.08, 0.5, 0.09, 0.09, 0.09]})
    cost = [_cost_record(arm, r, s * (1 + r)) for arm, s in (("moe-k1", 0.05), ("moe-k2", 0.06)) for r in range(2)]
    table = accuracy.cost_table(scores, cost)
    row = table.set_index("arm").loc["moe-k1"]
    assert row["bits_per_byte"] == pytest.approx(2.15) and row["bits_low"] < 2.15 < row["bits_high"]
    assert row["recorded_step_s"] == pytest.approx(0.08)  # the median of seeds: one slow seed does not move it
    shown = accuracy.format_cost_table(table)
    assert list(shown["arm"]) == ["top-1 MoE", "top-2 MoE"]
    assert shown.iloc[0]["step / top-1 MoE's (95% interval)"] == "1 (the baseline)"
    assert "<svg" in charts.to_svg(accuracy.quality_time_chart(table))
    assert "FFN layer, kernels (ms, 2,048 tokens)" in shown.columns


def test_gap_over_training_says_whether_an_ordering_holds():
    rows = []
    for seed in (0, 1):
        for step, (a, b) in zip((400, 800, 1200), ((3.0, 3.1), (2.8, 3.0), (2.7, 2.75))):
            rows += [{"arm": "moe-k1", "seed": seed, "step": step, "validation_bits_per_byte": a},
                     {"arm": "dense", "seed": seed, "step": step, "validation_bits_per_byte": b}]
    gaps = accuracy.gap_over_training(pd.DataFrame(rows), pairs=(("moe-k1", "dense"),))
    assert list(gaps["gap"].round(3)) == [-0.1, -0.2, -0.05] and (gaps["seeds_arm_lower"] == 2).all()
    table = accuracy.regime_table(gaps)
    row = table.iloc[0]
    assert (row["sign holds"], row["first to last"], row["last interval"]) == ("yes", "narrows", "narrows")
    assert "1 of the 1 orderings keep their sign" in accuracy.regime_sentence(gaps)
    assert "no validation scores" in accuracy.regime_sentence(gaps.iloc[:0])


def test_recorded_step_numbers_separate_the_days():
    runs = pd.DataFrame({"arm": ["moe-k2-half"] * 3 + ["moe-k2"], "seed": [0, 1, 3, 0],
                         "seconds_per_step": [0.07, 0.075, 0.5, 0.087],
                         "utc": ["2026-11-26T07:00", "2026-11-26T08:00", "2026-11-29T13:00", "2026-11-26T09:00"]})
    numbers = accuracy.recorded_step_numbers(runs)
    assert numbers["first_day_seeds"] == "0, 1" and numbers["first_day_ms"] == "70 to 75 ms"
    assert numbers["later_seeds"] == "seed 3 on 2026-11-29 (500 ms)" and numbers["k2_same_day_ms"] == "87 to 87 ms"
    assert accuracy.recorded_step_numbers(runs, arm="dense") == {}


def test_arm_costs_measures_paired_rounds_on_the_tiny_preset():
    from analysis.study import arm_costs

    out = arm_costs.measure("tiny", rounds=2, arms=("dense", "moe-k1"))
    assert len(out) == 4
    assert [r["params"]["arm"] for r in out] == ["dense", "moe-k1", "moe-k1", "dense"]  # the order rotates
    for record in out:
        assert record["train_step"]["median_s"] > 0 and record["kernels_layer"]["median_s"] > 0
        assert record["params"]["tokens"] == train.PRESETS["tiny"].batch_size * train.PRESETS["tiny"].seq_len
    with pytest.raises(ValueError, match="rounds: expected at least 2"):
        arm_costs.measure("tiny", rounds=1)
    with pytest.raises(ValueError, match="arms: unknown"):
        arm_costs.measure("tiny", rounds=2, arms=("nope",))


def test_page_views_keep_every_column_once_and_name_arms():
    formatted = pd.DataFrame({"arm": ["top-1 MoE"], "test bits/byte (95% interval)": ["2.1 [2.0, 2.2]"],
                              "parameters": [10], "active parameters per token": [5],
                              "forward kFLOP per token": [1.0], "training step (ms)": [50.0],
                              "training step, recorded (ms, median of seeds)": [70.0]})
    quality, cost = accuracy.cost_views(formatted)
    assert list(quality.columns) == ["arm", "test bits/byte (95% interval)", "parameters",
                                     "active parameters per token", "forward kFLOP per token"]
    assert list(cost.columns) == ["arm", "training step (ms)", "training step, recorded (ms, median of seeds)"]
    checks = pd.DataFrame({"arm": ["moe-k1"], "implementation": ["pytorch"], "bits_per_byte": [2.1],
                           "n_bytes": [4096], "difference": [0.0], "passed": [True]})
    view = accuracy.loss_check_view(checks)
    assert list(view.columns) == ["arm", "implementation", "test bits/byte", "bytes scored",
                                  "difference from PyTorch (bits/byte)", "passed"]
    assert (view.loc[0, "arm"], view.loc[0, "passed"]) == ("top-1 MoE", "yes")
    what, size = accuracy.arms_views(train.arms_table(train.PRESETS["tiny"], ["dense", "moe-k1"]))
    assert list(what["arm"]) == ["dense (width F_d)", "top-1 MoE"] and "all parameters (total)" in size
