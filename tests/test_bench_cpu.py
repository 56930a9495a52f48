"""The CPU benchmark end to end on tiny shapes, and its goal judgement."""

from __future__ import annotations

import dataclasses
import json

import pytest

import kernels.cpu
from analysis.measure import bench_cpu, sweep_cells, timing
from analysis import records


def test_quick_run_prints_the_table(capsys):
    assert bench_cpu.main(["--quick", "--tokens", "1", "16", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "moe/dense_active" in out and "moe % SGEMM" in out
    assert "Goals: not judged" in out
    assert "Records appended" not in out


def test_quick_run_writes_records(tmp_path, capsys):
    argv = ["--quick", "--tokens", "2", "300", "--k", "2", "--results-dir", str(tmp_path)]
    assert bench_cpu.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Records appended" in printed

    written = records.read_records(bench_cpu.RECORD_KIND, results_dir=tmp_path)
    sgemm = [r for r in written if r["measurement"] == "sgemm-rate"]
    timed = [r for r in written if r["measurement"] == "forward-time"]
    assert len(sgemm) == 1 and sgemm[0]["flop_per_s"] > 0
    # Per T: dense K*F and dense E*F, the cpu MoE; the reference only for T <= 256.
    implementations = sorted((r["params"]["tokens"], r["implementation"], r["backend"]) for r in timed)
    assert implementations == [
        (2, "dense", "cpu"), (2, "dense", "cpu"), (2, "moe", "cpu"), (2, "moe", "reference"),
        (300, "dense", "cpu"), (300, "dense", "cpu"), (300, "moe", "cpu"),
    ]
    for record in timed:
        assert record["p20_s"] <= record["median_s"] <= record["p80_s"]
        assert record["rotation_sets"] >= 2
        assert record["git_dirty"] in (True, False, None)
    moe = next(r for r in timed if r["implementation"] == "moe" and r["params"]["tokens"] == 300)
    assert moe["kept_assignments"] == 600  # dropless: T*K
    # Every cpu MoE was validated before it was timed: all rows at T=2, 64 spread rows at T=300.
    validated = {r["params"]["tokens"]: r["validated_rows"] for r in timed if r["backend"] == "cpu"
                 and r["implementation"] == "moe"}
    assert validated == {2: 2, 300: sweep_cells.VALIDATION_MAX_ROWS}
    assert all(r["relative_error_vs_reference"] < 1e-5 for r in timed if r["implementation"] == "moe"
               and r["backend"] == "cpu")
    for line in (next(tmp_path.glob("*/bench-cpu.jsonl"))).read_text().splitlines():
        json.loads(line)
    # The records rebuild the table the run printed, digit for digit.
    rows, sgemm = bench_cpu.rows_from_records(written)
    assert sgemm == next(r["flop_per_s"] for r in written if r["measurement"] == "sgemm-rate")
    assert [(row["tokens"], row["top_k"]) for row in rows] == [(2, 2), (300, 2)]
    assert bench_cpu.format_table(rows) in printed


def test_a_wrong_moe_output_is_never_timed(monkeypatch):
    combine = kernels.cpu.combine
    monkeypatch.setattr(kernels.cpu, "combine", lambda *arguments: combine(*arguments) * 1.01)
    timed = []
    monkeypatch.setattr(timing, "time_within_budget", lambda *arguments, **options: timed.append(arguments))
    with pytest.raises(sweep_cells.ValidationError, match="T=300, k=2"):
        bench_cpu.measure_moe(300, 2, bench_cpu.PRESETS["quick"])
    assert timed == []


def test_quick_preset_yields_to_explicit_options():
    config, _ = bench_cpu.parse_config(["--quick", "--d-model", "32", "--k", "1", "--repeats", "2"])
    assert config.d_model == 32 and config.top_ks == (1,) and config.repeats == 2
    assert config.min_repeats <= 2
    assert config.d_ff == bench_cpu.PRESETS["quick"].d_ff
    full, _ = bench_cpu.parse_config([])
    assert full == bench_cpu.PRESETS["full"]


def test_dense_widths_are_timed_once_each():
    config = bench_cpu.PRESETS["quick"]
    comparisons = bench_cpu.dense_comparisons(config)
    assert sorted(comparisons) == [config.d_ff, 2 * config.d_ff, config.n_experts * config.d_ff]
    # E = K = 2: equal active FLOPs at k=2 and equal parameters are the same width.
    two_experts = bench_cpu.dense_comparisons(dataclasses.replace(config, n_experts=2))
    assert len(two_experts[2 * config.d_ff]) == 2


def _row(tokens, ratio, fraction):
    return {"tokens": tokens, "moe_over_dense_active": ratio, "moe_fraction_of_sgemm": fraction}


def test_goal_report_judges_only_large_token_counts():
    report = bench_cpu.goal_report
    met = report([_row(16, 5.0, 0.01), _row(4096, 1.10, 0.75), _row(16384, 1.05, 0.80)])
    assert "1.10x -> MET" in met[0] and "75.0% -> MET" in met[1]
    missed = report([_row(4096, 1.20, 0.60)])
    assert "NOT MET" in missed[0] and "NOT MET" in missed[1]
    assert "not judged" in report([_row(16, 1.0, 1.0)])[0]


def test_rotation_exceeds_the_cache():
    count = bench_cpu.rotation_count(1000, 1_000_000)
    assert count * 1_001_000 >= 2 * timing.last_level_cache_bytes()
