"""The CPU benchmark end to end on tiny shapes (its two worker processes, its
records, its table) and its judgement of the four targets."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from scipy import stats

import topk_moe.cpu
from analysis import records
from analysis.measure import bench_cpu, peers, sweep_cells, timing

HAS_TORCH = peers.torch_unavailable_reason("cpu") is None


def test_quick_run_without_torch_prints_the_table(capsys):
    assert bench_cpu.main(["--quick", "--tokens", "1", "16", "--k", "1", "--no-torch", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "/dense K*F" in out and "% SGEMM" in out and "/weight read" in out
    assert "PyTorch: left out (--no-torch)" in out
    assert f"our kernels [{topk_moe.cpu.threads()}]" in out  # default: the threads BLAS has here
    assert "MoE / our dense at equal active FLOPs <= 1.1 for T >= 4096: not judged" in out
    assert "decode: MoE / reading the touched weights" in out and "-> " in out
    assert "Records appended" not in out


@pytest.mark.skipif(not HAS_TORCH, reason="the PyTorch implementations need the torch extra")
def test_quick_run_writes_records_of_every_implementation(tmp_path, capsys):
    argv = ["--quick", "--tokens", "2", "300", "--k", "2", "--threads", "1", "--results-dir", str(tmp_path)]
    assert bench_cpu.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Records appended" in printed

    written = records.read_records(bench_cpu.RECORD_KIND, results_dir=tmp_path)
    assert {r["measurement"] for r in written} == {"sgemm-rate", "copy-bandwidth", "few-row-read-rate",
                                                   "forward-time"}
    few_rows = [r for r in written if r["measurement"] == "few-row-read-rate"]
    assert sorted(r["params"]["rows"] for r in few_rows) == list(bench_cpu.FEW_ROWS)
    assert all(r["bytes_per_s"] == max(r["bytes_per_s_at_start_and_end"]) > 0 for r in few_rows)
    assert len({r["utc"] for r in written}) == 1  # one run
    (sgemm,) = [r for r in written if r["measurement"] == "sgemm-rate"]
    (copy,) = [r for r in written if r["measurement"] == "copy-bandwidth"]
    # Measured at the start and at the end; the higher is the ceiling.
    assert len(sgemm["flop_per_s_at_start_and_end"]) == 2 and len(copy["bytes_per_s_at_start_and_end"]) == 2
    assert sgemm["flop_per_s"] == max(sgemm["blas_threads_flop_per_s"], sgemm["one_per_worker_flop_per_s"])
    assert sgemm["flop_per_s"] >= max(sgemm["flop_per_s_at_start_and_end"])
    assert copy["bytes_per_s"] == max(copy["bytes_per_s_at_start_and_end"])
    timed = [r for r in written if r["measurement"] == "forward-time"]
    grouped = [] if peers.grouped_mm_unavailable_reason("cpu") else [("moe", "torch-grouped-mm", 2)]
    per_T = sorted([("dense", "cpu", 256), ("dense", "cpu", 512), ("dense", "torch", 256), ("moe", "cpu", 2),
                    ("moe", "torch-eager", 2), *grouped])
    rounds = bench_cpu.PRESETS["quick"].rounds
    assert rounds >= 2
    for T in (2, 300):
        for round_ in range(rounds):  # every implementation once per round
            found = sorted((r["implementation"], r["backend"], r["params"].get("top_k") or r["params"]["d_ff"])
                           for r in timed if r["params"]["tokens"] == T and r["round"] == round_)
            assert found == per_T
    for record in timed:
        assert record["p20_s"] <= record["median_s"] <= record["p80_s"]
        assert record["rotation_sets"] >= 2
        assert record["threads"] == 1  # --threads 1 reached both workers
        assert record["thread_settings"]["OPENBLAS_NUM_THREADS"] == "1"
        assert record["validated_rows"] >= 1 and record["relative_error_vs_reference"] < 1e-5
    moe = next(r for r in timed if r["backend"] == "cpu" and r["implementation"] == "moe"
               and r["params"]["tokens"] == 300)
    assert moe["kept_assignments"] == 600  # dropless: T*K
    assert moe["validated_rows"] == sweep_cells.VALIDATION_MAX_ROWS
    assert moe["touched_weight_bytes"] == 4 * bench_cpu.expert_bytes(bench_cpu.PRESETS["quick"], "swiglu")
    for line in (next(tmp_path.glob("*/bench-cpu.jsonl"))).read_text().splitlines():
        json.loads(line)
    # The records rebuild the table the run printed, digit for digit, with every ratio present.
    rows, ceilings = bench_cpu.rows_from_records(written)
    assert ceilings["sgemm_flop_per_s"] == next(r["flop_per_s"] for r in written if r["measurement"] == "sgemm-rate")
    assert [(row["tokens"], row["top_k"]) for row in rows] == [(2, 2), (300, 2)]
    assert rows[0]["moe_over_weight_read"] > 0 and rows[1]["moe_over_weight_read"] is None  # decode only
    assert all(row["moe_over_torch_eager"] and row["moe_over_torch_dense"] and row["moe_over_dense_params"]
               for row in rows)
    for row in rows:
        assert row["rounds"] == rounds
        low, high = row["moe_over_torch_eager_interval"]
        assert low <= row["moe_over_torch_eager"] <= high
    assert bench_cpu.format_table(rows) in printed


def test_a_wrong_moe_output_is_never_timed(monkeypatch, cpu_forward_one_percent_off):
    timed = []
    monkeypatch.setattr(timing, "time_within_budget", lambda *arguments, **options: timed.append(arguments))
    config = bench_cpu.PRESETS["quick"]
    with pytest.raises(sweep_cells.ValidationError, match="T=300 k=2"):
        bench_cpu.measure_moe(config, "swiglu", 300, 2, bench_cpu.InputCache(config))
    assert timed == []


@pytest.mark.skipif(not HAS_TORCH, reason="the PyTorch implementations need the torch extra")
def test_a_wrong_peer_is_never_timed(monkeypatch):
    eager = peers.hf_eager_moe
    monkeypatch.setattr(peers, "hf_eager_moe", lambda *arguments: eager(*arguments) * 1.01)
    timed = []
    monkeypatch.setattr(timing, "time_within_budget", lambda *arguments, **options: timed.append(arguments))
    config = bench_cpu.PRESETS["quick"]
    with pytest.raises(sweep_cells.ValidationError, match="torch-eager relu T=40 k=1"):
        bench_cpu.measure_torch_moe(config, "torch-eager", "relu", 40, 1, bench_cpu.InputCache(config))
    assert timed == []


def test_the_implementations_see_the_same_inputs():
    config = bench_cpu.PRESETS["quick"]
    moe = bench_cpu.InputCache(config).moe_sets("gelu", 7, 3)
    again = bench_cpu.InputCache(config).moe_sets("gelu", 7, 5)
    dense = bench_cpu.InputCache(config).dense_sets("gelu", 7, 256, 2)
    assert (moe[0][0] == again[0][0]).all() and (moe[0][1].w1 == again[0][1].w1).all()
    assert (moe[0][0] == dense[0][0]).all()
    assert moe[1][1].w1 is not moe[0][1].w1 and (moe[1][1].w1 == moe[0][1].w1).all()  # copies, fresh memory


def test_decode_rotates_more_weight_copies_than_large_batches():
    config = bench_cpu.PRESETS["full"]
    decode = bench_cpu.moe_rotation_count(config, "swiglu", 1, 1)
    touched = bench_cpu.expert_bytes(config, "swiglu") + 512 * 4
    assert decode * touched >= 2 * timing.last_level_cache_bytes() or decode == bench_cpu.MAX_ROTATION_SETS
    assert decode > bench_cpu.moe_rotation_count(config, "swiglu", 4096, 2) >= 2


def test_quick_preset_yields_to_explicit_options():
    config, _ = bench_cpu.parse_config(["--quick", "--d-model", "32", "--k", "1", "--max-repeats", "2",
                                        "--activations", "relu", "gelu", "--threads", "1", "--no-torch"])
    assert config.d_model == 32 and config.top_ks == (1,) and config.max_repeats == 2
    assert config.min_repeats <= 2 and config.activations == ("relu", "gelu")
    assert config.threads == 1 and not config.torch_peers
    assert config.d_ff == bench_cpu.PRESETS["quick"].d_ff
    full, _ = bench_cpu.parse_config([])
    assert full == bench_cpu.PRESETS["full"] and full.threads is None
    assert full.activations == ("relu", "gelu", "swiglu") and full.top_ks == (1, 2)
    assert min(full.tokens) == 1 and max(full.tokens) == 16384


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "tokens"), (["--k", "3"], "top_ks"), (["--threads", "0"], "threads"),
    (["--min-repeats", "5", "--max-repeats", "2"], "repeats"), (["--rounds", "0"], "rounds"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_cpu.parse_config(argv)
    assert message in capsys.readouterr().err


def test_thread_environment_sets_and_restores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with bench_cpu.thread_environment(3):
        assert [os.environ[v] for v in records.THREAD_VARIABLES] == ["3", "3", "3"]
    assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ
    with bench_cpu.thread_environment(None):
        assert os.environ["OMP_NUM_THREADS"] == "7"


def _row(tokens, top_k=1, **ratios):
    row = {"activation": "relu", "tokens": tokens, "top_k": top_k, "moe_over_torch_eager": None,
           "moe_over_dense_active": None, "moe_fraction_of_sgemm": None, "moe_over_weight_read": None}
    row.update(ratios)
    return row


def test_goals_judge_only_the_rows_they_cover():
    rows = [_row(1, moe_over_weight_read=1.2), _row(16, 2, moe_over_weight_read=1.25, moe_over_torch_eager=3.0),
            _row(256, moe_over_torch_eager=0.85), _row(4096, 2, moe_over_torch_eager=0.5, moe_over_dense_active=1.08,
                                                     moe_fraction_of_sgemm=0.8)]
    eager, dense, sgemm, decode = bench_cpu.goals(rows)
    assert eager.met and eager.worst == 0.85 and "T=256" in eager.where  # T=16's 3.0 is not covered
    assert dense.met and sgemm.met and decode.met and decode.worst == 1.25 and "k=2" in decode.where
    missed = bench_cpu.goals([_row(4096, moe_over_torch_eager=0.95, moe_over_dense_active=1.2,
                                   moe_fraction_of_sgemm=0.6), _row(4, moe_over_weight_read=2.0)])
    assert [goal.met for goal in missed] == [False, False, False, False]
    assert "NOT MET" in missed[2].line() and "0.6" in missed[2].line()
    unjudged = bench_cpu.goals([_row(64)])
    assert all(goal.met is None and "not judged" in goal.line() for goal in unjudged)


def test_table_rows_pair_each_moe_with_its_baselines():
    config = dataclasses.replace(bench_cpu.PRESETS["quick"], tokens=(8,), top_ks=(1,))
    ceilings = {"sgemm_flop_per_s": 1e9, "copy_bytes_per_s": 1e9}

    def record(implementation, backend, seconds, **params):
        return {"implementation": implementation, "backend": backend, "median_s": seconds, "flops": 1e6,
                "threads": 2, "touched_weight_bytes": 2e6,
                "params": {"activation": "relu", "tokens": 8, "d_model": config.d_model, **params}}

    F, E = config.d_ff, config.n_experts
    moe = dict(d_ff=F, n_experts=E, top_k=1)
    measurements = [record("moe", "cpu", 0.004, **moe), record("dense", "cpu", 0.002, d_ff=F),
                    record("dense", "cpu", 0.008, d_ff=E * F), record("moe", "torch-eager", 0.008, **moe),
                    record("dense", "torch", 0.001, d_ff=F)]
    (row,) = bench_cpu.table_rows(measurements, ceilings)
    assert row["moe_over_dense_active"] == pytest.approx(2.0) and row["moe_over_dense_params"] == pytest.approx(0.5)
    assert row["moe_over_torch_eager"] == pytest.approx(0.5) and row["moe_over_torch_dense"] == pytest.approx(4.0)
    assert row["moe_over_torch_grouped"] is None  # not timed: no ratio, not a zero
    assert row["moe_over_weight_read"] == pytest.approx(0.004 / 0.002)
    assert row["moe_fraction_of_sgemm"] == pytest.approx(1e6 / 0.004 / 1e9)


def test_decode_counts_only_the_experts_it_routes_to():
    config = dataclasses.replace(bench_cpu.PRESETS["quick"], n_experts=8)
    one_token = bench_cpu.measure_moe(config, "relu", 1, 1, bench_cpu.InputCache(config))
    assert one_token["touched_weight_bytes"] == bench_cpu.expert_bytes(config, "relu")  # one expert, every set
    two_choices = bench_cpu.measure_moe(config, "relu", 1, 2, bench_cpu.InputCache(config))
    assert two_choices["touched_weight_bytes"] == 2 * bench_cpu.expert_bytes(config, "relu")


def test_ratios_pair_the_times_of_one_round_and_give_an_interval():
    """Round 1 is twice as slow for everything (a noisy moment): the paired
    ratio does not move, and its interval is a point; unpaired medians would mix rounds."""
    ceilings = {"sgemm_flop_per_s": 1e9, "copy_bytes_per_s": 1e9}

    def record(implementation, backend, seconds, round_, **params):
        return {"implementation": implementation, "backend": backend, "median_s": seconds, "flops": 1e6,
                "threads": 2, "touched_weight_bytes": 2e6, "round": round_,
                "params": {"activation": "relu", "tokens": 4096, "d_model": 64, **params}}

    moe = dict(d_ff=128, n_experts=4, top_k=1)
    steady = [record(name, backend, seconds * slow, round_, **params)
              for round_, slow in ((0, 1.0), (1, 2.0), (2, 1.0))
              for name, backend, seconds, params in (("moe", "cpu", 0.010, moe), ("dense", "cpu", 0.008,
                                                                                  {"d_ff": 128}))]
    (row,) = bench_cpu.table_rows(steady, ceilings)
    assert row["rounds"] == 3 and row["moe_s"] == pytest.approx(0.010)  # the median over the rounds
    assert row["moe_over_dense_active"] == pytest.approx(1.25)
    assert row["moe_over_dense_active_interval"] == pytest.approx([1.25, 1.25])

    # Ratios 1.0, 1.2 and 1.1 over three rounds: the geometric mean, inside a t interval on the logs.
    varied = [record(name, backend, seconds, round_, **params)
              for round_, dense_s in ((0, 0.010), (1, 0.010 / 1.2), (2, 0.010 / 1.1))
              for name, backend, seconds, params in (("moe", "cpu", 0.010, moe), ("dense", "cpu", dense_s,
                                                                                 {"d_ff": 128}))]
    (row,) = bench_cpu.table_rows(varied, ceilings)
    logs = np.log([1.0, 1.2, 1.1])
    assert row["moe_over_dense_active"] == pytest.approx(np.exp(logs.mean()))
    half = stats.t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    assert row["moe_over_dense_active_interval"] == pytest.approx(np.exp([logs.mean() - half, logs.mean() + half]))
    (goal,) = [g for g in bench_cpu.goals([row]) if "our dense" in g.name]
    assert goal.met is True and goal.within_noise  # 1.097 <= 1.10, but the interval reaches past it
    assert "interval reaches across" in goal.line()
    assert bench_cpu.ratio_text(row, "moe_over_dense_active").startswith("1.10±")


# ---------------------------------------------------------------- the shape grid (issue 24)


def test_grid_points_are_a_latin_hypercube_over_the_issue_axes():
    points = bench_cpu.grid_points()
    assert len(points) == bench_cpu.GRID_POINTS == len(set(points)) == 30
    assert points == bench_cpu.grid_points()  # a fixed seed
    for axis, levels in bench_cpu.GRID_AXES.items():
        values = [point.d_ff / point.d_model if axis == "ff_ratio" else getattr(point, axis) for point in points]
        counts = [sum(1 for value in values if value == pytest.approx(level, abs=0.01)) for level in levels]
        assert sum(counts) == 30 and max(counts) - min(counts) <= 1, (axis, counts)  # each level count/levels times
    assert {(p.tokens, p.activation) for p in points} == {(T, a) for T in (1, 16, 256, 4096)
                                                          for a in ("relu", "gelu", "swiglu")}
    assert all(p.d_ff == round(p.d_model * r) for p in points for r in [p.d_ff / p.d_model])
    other = bench_cpu.grid_points(seed=bench_cpu.GRID_SEED + 1)
    assert other != points  # the seed decides the sample
    with pytest.raises(ValueError, match="count: expected at least 1"):
        bench_cpu.grid_points(0)


def test_the_grid_caps_the_weight_copies_of_large_layers():
    large = dataclasses.replace(bench_cpu.PRESETS["full"], d_model=1024, d_ff=3584, n_experts=64)
    layer_bytes = 64 * bench_cpu.expert_bytes(large, "swiglu")
    count = bench_cpu.moe_rotation_count(large, "swiglu", 1, 1)
    assert count >= 1 and count * layer_bytes <= max(layer_bytes, bench_cpu.MAX_ROTATION_WEIGHT_BYTES)
    # The one-shape run's layer is far under the cap: as many copies as before.
    assert bench_cpu.moe_rotation_count(bench_cpu.PRESETS["full"], "swiglu", 1, 1) > 2


TINY_POINTS = [bench_cpu.GridPoint(64, 128, 4, 2, "gelu", 2), bench_cpu.GridPoint(32, 112, 8, 300, "relu", 1)]


@pytest.mark.parametrize("with_torch", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_TORCH, reason="the PyTorch implementations need the torch extra"))])
def test_the_grid_run_writes_its_own_records_and_judges_its_targets(tmp_path, capsys, monkeypatch, with_torch):
    monkeypatch.setattr(bench_cpu, "grid_points", lambda count: TINY_POINTS[:count])
    monkeypatch.setattr(bench_cpu, "LARGE_TOKENS", 300)  # the T = 300 point stands for the T >= 4096 ones
    argv = ["--grid", "--quick", "--grid-points", "2", "--results-dir", str(tmp_path)] + \
        ([] if with_torch else ["--no-torch"])
    assert bench_cpu.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Grid: 2 points" in printed and "Fixed cost of a T = 1 call by step" in printed

    assert not list(tmp_path.glob(f"*/{bench_cpu.RECORD_KIND}.jsonl"))  # its own kind, its own file
    written = records.read_records(bench_cpu.GRID_KIND, results_dir=tmp_path)
    rounds = bench_cpu.PRESETS["quick"].rounds
    timed = [r for r in written if r["measurement"] == "forward-time"]
    implementations = {("moe", "cpu"), ("dense", "cpu")} | ({("moe", "torch-eager")} if with_torch else set())
    for index, point in enumerate(TINY_POINTS):
        for round_ in range(rounds):
            found = {(r["implementation"], r["backend"]) for r in timed
                     if r["grid_point"] == index and r["round"] == round_}
            assert found == implementations
            assert all(r["params"]["d_model"] == point.d_model for r in timed if r["grid_point"] == index)
    reads = [r for r in written if r["measurement"] == "one-row-read-rate"]
    assert {r["grid_point"] for r in reads} == {0} and len(reads) == rounds  # decode points only
    assert reads[0]["params"]["d_ff"] == 128 and reads[0]["bytes_per_s"] > 0
    # T = 2, k = 2, E = 4: four assignments over four experts, one row each: the floor's own product
    assert reads[0]["product_rows"] == 1 and reads[0]["product_rows_bytes_per_s"] == reads[0]["bytes_per_s"]
    gemm_rates = [r for r in written if r["measurement"] == "gemm-rate-by-rows"]
    assert {r["grid_point"] for r in gemm_rates} == {1} and len(gemm_rates) == rounds  # large points only
    assert gemm_rates[0]["expert_rows"] == round(300 * 1 / 8)  # T K / E
    assert gemm_rates[0]["dense_rows"] == topk_moe.cpu._block_rows(300)
    assert gemm_rates[0]["expert_flop_per_s"] > 0 and gemm_rates[0]["dense_flop_per_s"] > 0
    activations = [r for r in written if r["measurement"] == "activation-time"]
    if with_torch:  # T >= 256 points only, ours and PyTorch's in each round
        assert sorted((r["grid_point"], r["backend"]) for r in activations) == sorted([(1, "cpu"), (1, "torch")] * rounds)
        assert all(r["rows"] == round(300 * 1 / 8) and r["median_s"] > 0 for r in activations)
    else:
        assert activations == []
    dense = [r for r in timed if r["implementation"] == "dense" and r["grid_point"] == 0]
    assert {r["dense_d_ff"] for r in dense} == {2 * 128}  # equal active FLOPs: width K·F

    fixed = [r for r in written if r["measurement"] == "fixed-cost"]
    assert sorted(r["params"]["top_k"] for r in fixed) == sorted([1, 2] * rounds)
    for record in fixed:
        assert list(record["steps_s"]) == list(bench_cpu.FIXED_COST_STEPS)
        # The steps add up to the whole call by construction ("the rest" and "checks" are differences).
        assert sum(record["steps_s"].values()) == pytest.approx(record["whole_s"])
        assert all(record["steps_s"][step] > 0 for step in ("routing", "plan", "gather and store", "expert MLPs"))

    rows = bench_cpu.grid_rows(written)
    assert [row["grid_point"] for row in rows] == [0, 1] and all(row["rounds"] == rounds for row in rows)
    assert rows[0]["moe_over_weight_floor"] is not None and rows[1]["moe_over_weight_floor"] is None
    assert (rows[1]["moe_over_torch_eager"] is not None) == with_torch
    goals = bench_cpu.grid_goals(rows)
    assert goals[3].met is not None and "T=2" in goals[3].where  # decode judged at the T = 2 point
    assert goals[2].met is not None and "T=300" in goals[2].where  # the dense target, at the large point
    assert "gemm_rows_slowdown" not in rows[0] and rows[1]["gemm_rows_slowdown"] > 0
    assert ("activation_over_torch" in rows[1]) == with_torch and "activation_over_torch" not in rows[0]
    assert rows[1]["gemm_rows_slowdown_interval"][0] <= rows[1]["gemm_rows_slowdown"]
    assert (goals[0].met is not None) == with_torch and (goals[1].met is not None) == with_torch
    assert bench_cpu.format_grid(rows, bench_cpu.fixed_cost_rows(written)) in printed


def test_decode_product_rows_and_their_read_rate():
    assert [bench_cpu.decode_product_rows(T, K, E) for T, K, E in ((1, 1, 8), (16, 2, 8), (16, 1, 64), (16, 1, 8))] \
        == [1, 4, 1, 2]
    small = dataclasses.replace(bench_cpu.PRESETS["quick"], d_model=32, d_ff=64, n_experts=8)
    result = bench_cpu.measure_weight_read(small, 16, 2, None)
    assert result["product_rows"] == 4 and result["bytes_per_s"] > 0 and result["product_rows_bytes_per_s"] > 0
    rounds = [{bench_cpu.WEIGHT_READ: {"bytes_per_s": 2.0, "product_rows": 4, "product_rows_bytes_per_s": rate}}
              for rate in (1.0, 1.0)]
    assert bench_cpu.decode_rows_slowdown(rounds) == {"decode_product_rows": 4, "decode_rows_slowdown": 2.0,
                                                       "decode_rows_slowdown_interval": [2.0, 2.0]}
    old = [{bench_cpu.WEIGHT_READ: {"bytes_per_s": 2.0}}]  # a record from before the measurement
    assert bench_cpu.decode_rows_slowdown(old) == {} and bench_cpu.decode_rows_slowdown([{}]) == {}


def _grid_row(index, tokens, eager=None, dense=None, floor=None):
    row = {"grid_point": index, "tokens": tokens, "top_k": 1, "activation": "relu", "d_model": 256, "d_ff": 512,
           "n_experts": 8, "rounds": 2}
    for field, values in (("moe_over_torch_eager", eager), ("moe_over_dense_active", dense),
                          ("moe_over_weight_floor", floor)):
        if values is None:
            row[field] = row[f"{field}_interval"] = row[f"{field}_rounds"] = None
        else:
            row[field], row[f"{field}_interval"] = bench_cpu.geometric_mean_interval(values)
            row[f"{field}_rounds"] = values
    return row


def test_grid_goals_take_the_median_within_each_round_and_the_worst_point():
    rows = [_grid_row(0, 1, floor=[1.2, 1.4]), _grid_row(1, 16, eager=[3.0, 3.0], floor=[1.6, 1.6]),
            _grid_row(2, 256, eager=[0.8, 0.9]), _grid_row(3, 4096, eager=[0.7, 1.1], dense=[1.05, 1.07]),
            _grid_row(4, 4096, eager=[0.85, 0.7], dense=[1.2, 1.0])]
    median, worst, dense, decode = bench_cpu.grid_goals(rows)
    # Round medians over the three T >= 256 points: median(0.8, 0.7, 0.85) = 0.8 and median(0.9, 1.1, 0.7) = 0.9.
    assert median.worst == pytest.approx(np.sqrt(0.8 * 0.9)) and median.met and "3 points" in median.where
    assert median.interval is not None and median.interval[0] < median.worst < median.interval[1]
    assert worst.worst == pytest.approx(np.sqrt(0.7 * 1.1)) and "T=4096" in worst.where and worst.met
    assert dense.worst == pytest.approx(np.sqrt(1.2 * 1.0)) and dense.met and dense.within_noise
    assert decode.worst == pytest.approx(1.6) and not decode.met and "T=16" in decode.where  # T=16's loop not covered
    assert "D=256 F=512 E=8" in decode.where


def test_grid_refuses_the_one_shape_options(capsys):
    with pytest.raises(SystemExit):
        bench_cpu.parse_config(["--grid", "--tokens", "4"])
    assert "the grid sets the shapes; drop tokens" in capsys.readouterr().err
    config, arguments = bench_cpu.parse_config(["--grid"])
    assert arguments.grid and config.rounds == bench_cpu.GRID_PRESET.rounds
    assert config.seconds_per_measurement == bench_cpu.GRID_PRESET.seconds_per_measurement


def test_later_rounds_reuse_the_first_check_of_the_same_output(monkeypatch):
    config = bench_cpu.PRESETS["quick"]
    inputs = bench_cpu.InputCache(config)
    calls = []
    check = sweep_cells.check_moe_output
    monkeypatch.setattr(sweep_cells, "check_moe_output", lambda *a, **k: calls.append(1) or check(*a, **k))
    first = bench_cpu.measure_moe(config, "relu", 4, 2, inputs)
    second = bench_cpu.measure_moe(config, "relu", 4, 2, inputs)
    assert len(calls) == 1 and first["validated_rows"] == second["validated_rows"]
    bench_cpu.measure_moe(config, "relu", 4, 1, inputs)  # another k: checked again
    assert len(calls) == 2
    # An output that differs from the checked one on the same inputs is never timed.
    forward = topk_moe.moe_forward
    monkeypatch.setattr(topk_moe, "moe_forward", lambda *a, **k: dataclasses.replace(
        forward(*a, **k), y=forward(*a, **k).y * np.float32(1.5)))
    with pytest.raises(sweep_cells.ValidationError, match="differs from the checked one"):
        bench_cpu.measure_moe(config, "relu", 4, 2, inputs)
