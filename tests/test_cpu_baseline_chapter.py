"""The CPU chapter's bench-cpu section: the newest run's note, tables and chart,
rebuilt from records a tiny run wrote; and the chapter's parameter checks."""

from __future__ import annotations

import pytest

pytest.importorskip("altair", reason="the book extra is not installed")

from analysis import charts  # noqa: E402
from analysis.chapters import cpu_baseline  # noqa: E402
from analysis.measure import bench_cpu  # noqa: E402


def test_without_records_the_section_says_so(tmp_path):
    view = cpu_baseline.bench_cpu_view(tmp_path)
    assert cpu_baseline.NO_BENCH_CPU_RECORDS in view.note and view.empty and view.ceilings is None
    assert cpu_baseline.bench_numbers(view)["bench_sgemm"] == "\u2013"
    assert cpu_baseline.ratio_frame(view, "pytorch").empty and cpu_baseline.ratio_frame(view, "ours").empty
    assert set(cpu_baseline.goals_frame(view)["verdict"]) == {"not judged"}


def test_the_section_shows_the_newest_run(tmp_path, capsys):
    for tokens in ("2", "4"):
        argv = ["--quick", "--tokens", tokens, "--k", "1", "--no-torch", "--results-dir", str(tmp_path)]
        assert bench_cpu.main(argv) == 0
    printed = capsys.readouterr().out.split("Records appended")[-2]  # the second run's output
    view = cpu_baseline.bench_cpu_view(tmp_path)
    assert [(row["tokens"], row["top_k"]) for row in view.rows] == [(4, 1)]  # the newest run only
    assert bench_cpu.format_table(view.rows) in printed
    assert "newest committed bench-cpu run" in view.note and "bench-cpu.jsonl" in view.note
    assert "D = 64, F = 128, E = 4, swiglu, float32" in view.note
    assert "PyTorch not timed" in view.note and "our kernels on" in view.note

    numbers = cpu_baseline.bench_numbers(view)
    assert numbers["bench_sgemm"].endswith("GFLOP/s") and numbers["bench_copy"].endswith("GB/s")
    peers, ours = cpu_baseline.ratio_frame(view, "pytorch"), cpu_baseline.ratio_frame(view, "ours")
    assert list(ours["T"]) == [4] and ours["MoE time (ms)"].iloc[0] == pytest.approx(view.rows[0]["moe_s"] * 1e3)
    assert (peers["÷ PyTorch loop"] == "–").all()  # not timed: a dash, not zero
    assert "±" in ours["÷ our dense K·F"].iloc[0]  # two rounds: a mean and its interval
    assert "GB/s with 4 rows" in numbers["bench_few_row"]
    fastest_read = max(view.ceilings["few_row_read_bytes_per_s"].values())
    assert float(numbers["bench_decode_floor"]) == pytest.approx(view.ceilings["copy_bytes_per_s"] / fastest_read,
                                                                  rel=0.01)
    goals = cpu_baseline.goals_frame(view)
    assert len(goals) == 4 and goals["verdict"].iloc[3] in ("met", "missed")  # decode is judged at T = 4
    ceilings = cpu_baseline.ceilings_frame(view)
    assert ceilings["value"].notna().all() and len(ceilings) == 4 + len(bench_cpu.FEW_ROWS)
    assert "<svg" in charts.to_svg(cpu_baseline.ratio_chart(view))


def test_the_ratio_chart_has_a_legend_of_every_comparison():
    rows = [{"activation": a, "tokens": T, "top_k": k, "moe_over_torch_eager": 0.5, "moe_over_torch_grouped": 0.7,
             "moe_over_torch_dense": 1.2, "moe_over_dense_active": 1.05}
            for a in ("relu", "swiglu") for T in (1, 256) for k in (1, 2)]
    chart = cpu_baseline.ratio_chart(cpu_baseline.BenchCpuView("note", rows))
    spec = chart.to_dict()
    color = spec["spec"]["layer"][0]["encoding"]["color"]
    assert color["scale"]["domain"] == [label for _, label in cpu_baseline.CHART_RATIOS]
    assert color["legend"]["title"] == "MoE compared with"
    assert "<svg" in charts.to_svg(chart)


@pytest.mark.parametrize("arguments, message", [
    (("everything", None, None), "source: expected 'auto', 'live' or 'records', got 'everything'"),
    (("live", "gpu-default", None), "plan: expected None or one of the CPU plans"),
    (("auto", None, "/no/such/folder"), "results_dir: expected None or an existing folder"),
])
def test_bad_parameters_are_one_clear_sentence(arguments, message):
    with pytest.raises(ValueError, match=message):
        cpu_baseline.validate_parameters(*arguments)
    cpu_baseline.validate_parameters("auto", None, None)


# ---------------------------------------------------------------- the shape grid (issue 24)


def test_without_grid_records_the_grid_section_names_the_command(tmp_path):
    view = cpu_baseline.grid_view(tmp_path)
    assert view.empty and cpu_baseline.NO_GRID_RECORDS in view.note
    assert 'make bench-cpu BENCH_ARGS="--grid"' in view.note
    assert cpu_baseline.grid_frame(view).empty and cpu_baseline.fixed_cost_frame(view).empty
    goals = cpu_baseline.grid_goals_frame(view)
    assert len(goals) == 4 and set(goals["verdict"]) == {"not judged"}
    assert cpu_baseline.grid_numbers(view)["grid_points"] == bench_cpu.GRID_POINTS
    numbers = cpu_baseline.grid_numbers(view)
    assert cpu_baseline.gemm_rows_frame(view).empty and numbers["grid_dense_worst_gemm"] == "–"
    assert numbers["grid_decode_worst_floor"] == numbers["grid_fixed_besides_mlps"] == "–"
    assert numbers["grid_decode_worst_rows"] == "–"


def test_the_grid_section_shows_the_newest_grid_run(tmp_path, monkeypatch, capsys):
    points = [bench_cpu.GridPoint(64, 128, 16, 1, "swiglu", 2), bench_cpu.GridPoint(32, 64, 4, 260, "gelu", 1)]
    monkeypatch.setattr(bench_cpu, "grid_points", lambda count: points[:count])
    monkeypatch.setattr(bench_cpu, "LARGE_TOKENS", 260)  # the T = 260 point stands for the T >= 4096 ones
    assert bench_cpu.main(["--grid", "--quick", "--grid-points", "2", "--no-torch", "--results-dir",
                           str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    view = cpu_baseline.grid_view(tmp_path)
    assert "newest committed bench-cpu grid run" in view.note and "bench-cpu-grid.jsonl" in view.note
    assert "2 shapes, 2 round(s) each" in view.note and "PyTorch not timed" in view.note
    frame = cpu_baseline.grid_frame(view)
    assert list(frame["T"]) == [1, 260] and [layer.split(", ")[3] for layer in frame["layer"]] == ["E 16", "E 4"]
    assert "±" in frame["÷ read floor"].iloc[0] and frame["÷ read floor"].iloc[1] == "–"
    assert (frame["÷ PyTorch loop"] == "–").all()  # not timed: a dash
    assert frame["MoE (ms)"].iloc[0] == pytest.approx(view.rows[0]["moe_s"] * 1e3)
    goals = cpu_baseline.grid_goals_frame(view)
    assert goals["verdict"].iloc[3] in ("met", "missed", "met (interval reaches across)",
                                        "missed (interval reaches across)")
    assert "T=1" in goals["at"].iloc[3]
    assert goals["verdict"].iloc[0] == "not judged"  # no PyTorch loop
    fixed = cpu_baseline.fixed_cost_frame(view)
    assert list(fixed["step"]) == [*bench_cpu.FIXED_COST_STEPS, "whole call"] * 2
    assert set(fixed["k"]) == {1, 2} and (fixed["time (µs)"] > 0).sum() >= 2 * 5
    for step, microseconds in zip(fixed["step"], fixed["time (µs)"]):  # the printed breakdown is the one shown
        assert f"{step:<17} {microseconds:8.1f} us" in printed
    assert "<svg" in charts.to_svg(cpu_baseline.grid_chart(view))
    gemm = cpu_baseline.gemm_rows_frame(view)  # the dense gap's explanation: the large point only
    assert list(gemm["T"]) == [260] and list(gemm["rows per expert"]) == [round(260 / 4)]
    assert gemm["GEMMs alone: slowdown"].iloc[0] == bench_cpu.ratio_text(view.rows[1], "gemm_rows_slowdown")
    numbers = cpu_baseline.grid_numbers(view)
    assert "rows per expert against blocks of" in numbers["grid_dense_worst_gemm"]
    floor_us = view.rows[0]["moe_s"] / view.rows[0]["moe_over_weight_floor"] * 1e6  # the one decode point
    assert numbers["grid_decode_worst_floor"].startswith(f"{floor_us:.0f} µs (swiglu, T = 1, k = 2")
    assert numbers["grid_decode_worst_rows"] == "one row, the floor's own product"  # T = 1, k = 2: two experts
    whole = [us for k, step, us in zip(fixed["k"], fixed["step"], fixed["time (µs)"]) if k == 1]
    assert numbers["grid_fixed_besides_mlps"] == f"{whole[-1] - whole[list(fixed['step']).index('expert MLPs')]:.0f} " \
                                                 f"µs of its {whole[-1]:.0f} µs"
    assert f"#1  {round(260 / 4):>5} rows per expert" in printed  # the printed line is the one shown


def test_the_activation_table_sets_our_activation_beside_the_loop():
    def row(index, tokens, loop, activation=None):
        found = {"grid_point": index, "tokens": tokens, "top_k": 2, "activation": "gelu", "d_model": 256,
                 "d_ff": 896, "n_experts": 8, "moe_over_torch_eager": loop, "moe_over_torch_eager_interval": None}
        if activation is not None:
            found.update(activation_rows=tokens * 2 // 8, activation_over_torch=activation,
                         activation_over_torch_interval=[activation * 0.9, activation * 1.2])
        return found

    view = cpu_baseline.GridView("note", [row(0, 16, 0.7), row(1, 256, 0.9, 5.0), row(2, 4096, 1.1, 5.5)])
    frame = cpu_baseline.activation_frame(view)
    assert list(frame["T"]) == [256, 4096] and list(frame["rows"]) == [64, 1024]
    assert list(frame["activation: ours ÷ PyTorch's"]) == ["5.00±1.00", "5.50±1.10"]
    worst = cpu_baseline.grid_numbers(view)["grid_loop_worst_activation"]
    assert worst.startswith("5.50±1.10 times PyTorch's (gelu, T = 4096, k = 2")
    assert worst.endswith("MoE ÷ loop 1.10)")
    empty = cpu_baseline.GridView("note", [row(0, 256, 0.9)])
    assert cpu_baseline.activation_frame(empty).empty
    assert cpu_baseline.grid_numbers(empty)["grid_loop_worst_activation"] == "–"


def test_the_decode_sentence_names_the_worst_points_rows():
    row = {"grid_point": 8, "tokens": 16, "top_k": 2, "activation": "gelu", "d_model": 256, "d_ff": 512,
           "n_experts": 8, "moe_s": 0.002, "moe_over_weight_floor": 4.0, "moe_over_weight_floor_interval": None,
           "decode_product_rows": 4, "decode_rows_slowdown": 1.7, "decode_rows_slowdown_interval": [1.5, 1.8]}
    numbers = cpu_baseline.grid_numbers(cpu_baseline.GridView("note", [row]))
    assert numbers["grid_decode_worst_floor"] == "500 µs (gelu, T = 16, k = 2, D 256, F 512, E 8)"
    assert numbers["grid_decode_worst_rows"] == "4 rows, whose weights one thread's BLAS reads 1.70±0.20 times " \
                                                "slower than one row's"
    assert numbers["grid_fixed_besides_mlps"] == "–"  # no fixed-cost records in this view


def test_the_sweep_note_names_its_conditions():
    text = cpu_baseline.sweep_conditions("Note: AMD EPYC, commit abc.")
    assert text.startswith("Note: AMD EPYC, commit abc.") and "older backend" in text and "in cache" in text
    assert "not shown" in text


def test_the_torch_overhead_section_names_the_command_without_records(tmp_path):
    view = cpu_baseline.torch_overhead_view(tmp_path)
    assert view.frame.empty and cpu_baseline.TORCH_OVERHEAD_COMMAND in view.note
    assert all(cpu_baseline.TORCH_OVERHEAD_COMMAND in text for text in view.numbers.values())


def test_the_torch_overhead_section_reads_the_newest_run(tmp_path):
    from analysis.measure import torch_overhead

    torch_overhead.run("tiny", (1, 8), rounds=3, repeats=2, results_dir=tmp_path, echo=lambda message: None)
    view = cpu_baseline.torch_overhead_view(tmp_path)
    # one column per entry and T (in words), one row per quantity, so the table fits the page
    assert set(view.frame.columns) == {"quantity", "functions on tensors, T = 1", "MoELayer, T = 1",
                                       "functions on tensors, T = 8", "MoELayer, T = 8"}
    spread = view.frame.set_index("quantity").loc["overhead, 20th to 80th percentile (µs)"]
    assert all(" to " in text for text in spread)
    assert "torch-overhead.jsonl" in view.note and "load average" in view.note
    assert set(view.numbers) == {"torch_overhead_t1", "torch_overhead_t4096", "torch_overhead_layer_t1"}
    assert view.numbers["torch_overhead_t4096"] == "not measured"  # the run had no T = 4096
    for text in (view.numbers["torch_overhead_t1"], view.numbers["torch_overhead_layer_t1"]):
        assert " per call" in text and "NumPy call's" in text


@pytest.mark.parametrize("low, high, verdict", [(-1e-6, 3e-6, "none that the run could tell from noise"),
                                                (1e-6, 3e-6, "2 µs per call")])
def test_an_overhead_whose_spread_holds_zero_is_not_stated_as_a_cost(tmp_path, low, high, verdict):
    from analysis import records as record_io

    record = {"measurement": "overhead", "entry": "torch-function", "overhead_median_s": 2e-6,
              "overhead_p20_s": low, "overhead_p80_s": high, "overhead_fast_calls_s": 1e-6,
              "numpy_median_s": 1e-4, "torch_median_s": 1.02e-4, "overhead_fraction": 0.02, "rounds": 3,
              "run_id": "r", "params": {"tokens": 1, "entry": "torch-function", "machine": "idle"}}
    record_io.write_records("torch-overhead", [record], device_kind="cpu", results_dir=tmp_path)
    assert cpu_baseline.torch_overhead_view(tmp_path).numbers["torch_overhead_t1"].startswith(verdict)
