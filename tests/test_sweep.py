"""The sweep on the CPU at tiny sizes: its records, its tables, its plans and
the GPU goal table (from hand-made records: no GPU here)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import topk_moe
import topk_moe.cpu
import topk_moe.testing
from analysis.measure import peers, roofline, skew, sweep, sweep_cells, sweep_plan
from analysis import records

pytest.importorskip("torch", reason="the peers need the torch extra")

TINY = sweep_plan.with_overrides(sweep_plan.PLANS["cpu-tiny"], tokens=(1, 16))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    result = sweep.run_sweep(TINY, progress=False, results_dir=folder, echo=lambda message: None)
    return result, folder


def test_tiny_sweep_writes_tidy_records(tiny_run):
    result, folder = tiny_run
    assert result.problems == [] and result.skipped == []
    written = records.read_records(sweep.RECORD_KIND, results_dir=folder)
    assert written == result.records
    assert {r["measurement"] for r in written} == {"ceiling", "time", "run"}
    assert {r["run_id"] for r in written} == {result.run_id}
    for record in written:
        assert set(records.PROVENANCE_FIELDS) <= set(record)
        assert record["kind"] == "sweep" and record["device_kind"] == "cpu" and record["plan"] == "cpu-tiny"
    timed = [r for r in written if r["measurement"] == "time"]
    for record in timed:
        assert record["p20_s"] <= record["median_s"] <= record["p80_s"]
        assert record["roofline_s"] > 0 and record["fraction_of_roofline"] > 0
        assert record["bound"] in ("memory", "compute")
        assert {"preset", "tokens", "dtype", "d_model", "d_ff", "n_experts"} <= set(record["params"])
    kinds = {(r["implementation"], r["stage"]) for r in timed}
    assert {("moe", stage) for stage in ("router", "dispatch", "permute", "expert_mlp", "combine",
                                         "end_to_end")} <= kinds
    assert {("dense", "end_to_end"), ("gemm-same-flops", "end_to_end"), ("hf-eager", "end_to_end"),
            ("torch-grouped-mm", "end_to_end")} <= kinds
    # Dense per T at widths F (k=1), 2F (k=2) and E*F: three, shared by both k.
    dense_16 = sorted(r["params"]["width"] for r in timed if r["implementation"] == "dense"
                      and r["params"]["tokens"] == 16)
    shape = sweep_plan.PRESETS["tiny"]
    assert dense_16 == sorted([shape.d_ff, 2 * shape.d_ff, shape.n_experts * shape.d_ff])
    # Peers are checked against the layer before they are timed.
    for record in timed:
        if record["implementation"] in ("hf-eager", "torch-grouped-mm"):
            assert record["relative_error_vs_moe"] < 1e-4 and record["valid"] is True
    # Every MoE timing was validated first, on all rows of these small T.
    moe = [r for r in timed if r["implementation"] == "moe"]
    assert moe and all(r["valid"] is True and r["validated_rows"] == r["params"]["tokens"]
                       and r["relative_error_vs_reference"] < 1e-5 for r in moe)
    # The ceilings say the sizes they were measured at (the plan's).
    ceilings = {r["implementation"]: r["params"] for r in written if r["measurement"] == "ceiling"}
    assert ceilings["copy"]["nbytes"] == TINY.ceiling_copy_bytes and ceilings["gemm"]["n"] == TINY.ceiling_gemm_n
    # Every skew was measured at its T, and the load it produced is recorded.
    skews = {r["params"]["skew"] for r in timed if r["params"].get("skew")}
    assert skews == set(skew.SKEWS)
    one_hot = [r for r in timed if r["params"].get("skew") == "one-hot" and r["stage"] == "end_to_end"]
    assert one_hot and all(r["load_max_over_mean"] > 1.5 for r in one_hot)


def test_summary_table_from_records(tiny_run):
    result, _ = tiny_run
    table = sweep.summary_table(result.records)
    assert [(row["tokens"], row["top_k"]) for row in table] == [(1, 1), (1, 2), (16, 1), (16, 2)]
    for row in table:
        for key in ("moe_s", "dense_active_s", "dense_params_s", "hf_eager_s", "grouped_mm_s"):
            assert row[key] > 0
        assert row["moe_graph_s"] is None  # graphs are GPU only
    text = sweep.format_table(table, sweep.SUMMARY_COLUMNS)
    assert "moe ms" in text and "grouped_mm ms" in text


def test_cli_prints_tables_and_can_skip_writing(capsys, tmp_path):
    assert sweep.main(["--plan", "cpu-tiny", "--tokens", "4", "--k", "1", "--skews", "uniform",
                       "--no-write", "--quiet", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "moe ms" in out and "records appended" not in out
    assert not list(tmp_path.iterdir())


def test_gpu_plan_refuses_without_a_gpu(capsys):
    if "cuda" in topk_moe.available_backends():
        pytest.skip("a GPU is present")
    assert sweep_plan.default_plan_name() == "cpu-default"
    assert sweep.main(["--plan", "gpu-default", "--no-write"]) == 2
    assert "needs a GPU" in capsys.readouterr().out


def test_budget_stops_new_cells_and_says_so(tmp_path):
    plan = dataclasses.replace(TINY, budget_s=0.0)
    result = sweep.run_sweep(plan, progress=False, results_dir=tmp_path, echo=lambda message: None)
    assert len(result.skipped) == len(sweep_plan.cells(plan))
    summary = [r for r in result.records if r["measurement"] == "run"]
    assert len(summary) == 1 and len(summary[0]["skipped"]) == len(result.skipped)


def test_nsight_starts_only_with_its_limit_left_and_after_the_ceilings_are_written(tmp_path, monkeypatch):
    """The Nsight block runs before the first budget check and may take its whole
    limit: with less of the budget left it is not started (and says so), and the
    ceilings measured before it are already on disk either way."""
    started = []

    def fake_utilisation(plan, device, run):
        started.append(sorted(p.name for p in tmp_path.rglob("sweep.jsonl")))
        return []

    monkeypatch.setattr(sweep, "measure_utilisation", fake_utilisation)
    one = dataclasses.replace(sweep_plan.with_overrides(TINY, tokens=(2,), top_ks=(1,), skews=("uniform",)),
                              utilisation=("tiny", 16, "float32"))
    one = dataclasses.replace(one, blocks=one.blocks[:1])
    sweep.run_sweep(dataclasses.replace(one, budget_s=sweep.UTILISATION_LIMIT_S + 60), progress=False,
                    results_dir=tmp_path, echo=lambda message: None)
    assert started == [["sweep.jsonl"]]  # started, with the ceilings already written
    result = sweep.run_sweep(dataclasses.replace(one, budget_s=sweep.UTILISATION_LIMIT_S - 1), progress=False,
                             results_dir=tmp_path, echo=lambda message: None)
    assert len(started) == 1
    assert any(p["what"] == "utilisation" and "not measured" in p["error"] for p in result.problems)


def test_records_are_copied_to_out(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    plan = sweep_plan.with_overrides(TINY, tokens=(2,), top_ks=(1,), skews=("uniform",))
    plan = dataclasses.replace(plan, blocks=plan.blocks[:1])
    result = sweep.run_sweep(plan, progress=False, results_dir=tmp_path / "results", echo=lambda message: None)
    copied = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert copied == result.records


ONE_CELL = sweep_plan.with_overrides(TINY, tokens=(16,), top_ks=(2,), skews=("uniform",))
ONE_CELL = dataclasses.replace(ONE_CELL, blocks=ONE_CELL.blocks[:1])


def test_a_cell_whose_output_fails_validation_is_reported_and_not_timed(tmp_path, cpu_forward_one_percent_off):
    result = sweep.run_sweep(ONE_CELL, progress=False, results_dir=tmp_path, echo=lambda message: None)
    assert not [r for r in result.records if r["measurement"] == "time"]
    (problem,) = result.problems
    assert "not timed" in problem["what"] and "ValidationError" in problem["error"]
    summary = [r for r in result.records if r["measurement"] == "run"]
    assert summary[0]["problems"] == result.problems


def test_a_peer_off_the_layer_is_marked_invalid_and_left_out_of_the_tables(tmp_path, monkeypatch):
    eager = peers.hf_eager_moe
    monkeypatch.setattr(peers, "hf_eager_moe", lambda x, weights: eager(x, weights) * 2)
    result = sweep.run_sweep(ONE_CELL, progress=False, results_dir=tmp_path, echo=lambda message: None)
    (hf,) = [r for r in result.records if r.get("implementation") == "hf-eager"]
    assert hf["valid"] is False and hf["relative_error_vs_moe"] > sweep_cells.PEER_ERROR_LIMIT
    assert [p["what"] for p in result.problems] == ["hf-eager at tiny float32 T=16 k=2"]
    assert not sweep.valid_timing(hf)
    (row,) = sweep.summary_table(result.records)
    assert row["hf_eager_s"] is None and row["grouped_mm_s"] > 0 and row["moe_s"] > 0


def test_ceiling_records_give_the_sizes_measured(monkeypatch):
    measured = []
    monkeypatch.setattr(roofline, "copy_bandwidth", lambda device, nbytes: measured.append(nbytes) or 1e9)
    monkeypatch.setattr(roofline, "gemm_rate", lambda device, dtype, n: measured.append(n) or 1e9)
    device = sweep_cells.Device("cpu", sweep_plan.PLANS["cpu-tiny"].budget)
    _, found = sweep_cells.measure_ceilings(device, ("float32",))
    assert measured == [sweep_cells.CEILING_COPY_BYTES["cpu"], sweep_cells.CEILING_GEMM_N["cpu"]]
    assert [r["params"].get("nbytes", r["params"].get("n")) for r in found] == measured
    _, found = sweep_cells.measure_ceilings(device, ("float32",), copy_bytes=1024, gemm_n=64)
    assert [r["params"].get("nbytes", r["params"].get("n")) for r in found] == [1024, 64]


# ---------------------------------------------------------------- validation


def test_validation_rows_spread_over_the_batch_within_the_budget():
    assert list(sweep_cells.validation_rows(5, 1.0)) == [0, 1, 2, 3, 4]
    rows = sweep_cells.validation_rows(1000, 1.0, max_rows=10)
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 999 and np.all(np.diff(rows) > 0)
    assert list(sweep_cells.validation_rows(1000, 4e8, max_plain_flops=1e9)) == [0, 999]
    assert list(sweep_cells.validation_rows(1000, 1e10, max_plain_flops=1e9)) == [0]  # at least one
    assert sweep_cells.validation_rows(0, 1.0).size == 0


@pytest.mark.parametrize("max_rows", [3, 64])
def test_a_row_subset_is_checked_exactly_as_the_whole_batch(max_rows):
    """The check's renumbered experts and reordered router give the whole
    batch's reference on those rows (a few rows use a few of the 8 experts)."""
    cfg = topk_moe.MoEConfig(24, 40, 8, 2)
    weights = topk_moe.init_weights(cfg, seed=2)
    x = np.random.default_rng(3).standard_normal((500, 24)).astype(np.float32)
    output = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    checked = sweep_cells.check_moe_output(x, weights, cfg, output, name="cpu", max_rows=max_rows)
    rows = sweep_cells.validation_rows(500, roofline.moe_flops(1, 24, 40, 8, 2, "swiglu"), max_rows=max_rows)
    whole = topk_moe.testing.expected_moe_forward(x, weights, cfg, output.routing)[rows]
    assert checked["validated_rows"] == len(rows) == min(max_rows, 500)
    assert checked["relative_error_vs_reference"] == pytest.approx(peers.relative_error(output.y[rows], whole),
                                                                   rel=1e-9)


def test_the_check_catches_a_wrong_last_row_and_checks_every_row_under_a_capacity():
    cfg = topk_moe.MoEConfig(16, 24, 4, 1)
    weights = topk_moe.init_weights(cfg, seed=4)
    x = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    output = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    wrong = output.y.copy()
    wrong[-1] *= 1.01
    with pytest.raises(sweep_cells.ValidationError, match="of 300 rows"):
        sweep_cells.check_moe_output(x, weights, cfg, dataclasses.replace(output, y=wrong), name="cpu")
    limited = dataclasses.replace(cfg, capacity_factor=0.5)  # drops: the rows are coupled
    output = topk_moe.moe_forward(x, weights, limited, backend="cpu")
    assert sweep_cells.check_moe_output(x, weights, limited, output, name="cpu")["validated_rows"] == 300


def test_plans():
    gpu = sweep_plan.PLANS["gpu-default"]
    main_block = gpu.blocks[0]
    assert main_block.presets == ("mixtral",) and main_block.dtypes == ("float16",)
    assert set(main_block.tokens) >= {1, 4, 16, 64, 256, 1024, 4096, 8192, 16384, 32768}
    assert main_block.top_ks == (1, 2) and main_block.what == sweep_plan.EVERYTHING
    assert any(set(block.skews) == set(skew.SKEWS[1:]) for block in gpu.blocks)
    assert {d for block in gpu.blocks for d in block.dtypes} == {"float16", "float32"}
    assert {p for block in gpu.blocks for p in block.presets} == {"small", "mixtral", "fine"}
    assert gpu.utilisation == ("mixtral", 8192, "float16") and gpu.budget_s <= 360
    assert sweep_plan.PRESETS["mixtral"] == sweep_plan.Shape(4096, 14336, 8, "swiglu")
    assert sweep_plan.PRESETS["small"] == sweep_plan.Shape(1024, 4096, 8) and sweep_plan.PRESETS["fine"] == sweep_plan.Shape(2048, 1408, 64)
    with pytest.raises(ValueError, match="float16"):
        sweep_plan.check_plan(sweep_plan.with_overrides(sweep_plan.PLANS["cpu-tiny"], dtypes=("float16",)))
    with pytest.raises(ValueError, match="presets"):
        sweep_plan.check_plan(sweep_plan.with_overrides(sweep_plan.PLANS["cpu-tiny"], presets=("huge",)))
    with pytest.raises(ValueError, match="skew"):
        sweep_plan.check_plan(sweep_plan.with_overrides(sweep_plan.PLANS["cpu-tiny"], skews=("lopsided",)))
    plan, _ = sweep.parse_plan(["--plan", "cpu-default", "--tokens", "8", "--k", "2"])
    assert all(block.tokens == (8,) and block.top_ks == (2,) for block in plan.blocks)


# ---------------------------------------------------------------- the goal table


def _time(preset, T, k, implementation, stage, median_s, *, flops=0, nbytes=0, launch="eager", width=None,
          experts_used=8):
    shape = sweep_plan.PRESETS[preset]
    params = {"preset": preset, "dtype": "float16", "tokens": T, "d_ff": shape.d_ff, "n_experts": shape.n_experts}
    if k is not None:
        params.update(top_k=k, skew="uniform")
    if width is not None:
        params["width"] = width
    return {"measurement": "time", "implementation": implementation, "stage": stage, "launch": launch,
            "median_s": median_s, "flops": flops, "bytes": nbytes, "achieved_flop_per_s": flops / median_s,
            "achieved_bytes_per_s": nbytes / median_s, "experts_used": experts_used, "params": params}


def test_goal_table_by_hand():
    copy = 1000.0  # bytes per second
    found = [{"measurement": "ceiling", "implementation": "copy", "bytes_per_s": copy, "params": {}}]
    for k in (1, 2):
        found += [
            # router: 900 bytes in 1 s at T=8192 (90%), 850 at T=16384 (the worst: 85%)
            _time("mixtral", 8192, k, "moe", "router", 1.0, nbytes=900),
            _time("mixtral", 16384, k, "moe", "router", 1.0, nbytes=850),
            # dispatch + permute + combine: (100 + 300 + 300) bytes in 1 s = 70%
            _time("mixtral", 8192, k, "moe", "dispatch", 0.2, nbytes=100),
            _time("mixtral", 8192, k, "moe", "permute", 0.4, nbytes=300),
            _time("mixtral", 8192, k, "moe", "combine", 0.4, nbytes=300),
            # expert GEMMs 800 FLOP/s against 1000 for cuBLAS on the same FLOPs: 80%
            _time("mixtral", 8192, k, "moe", "expert_mlp", 1.0, flops=800),
            _time("mixtral", 8192, None, "gemm-same-flops", "end_to_end", 1.0, flops=1000,
                  width=k * sweep_plan.PRESETS["mixtral"].d_ff),
            # the whole layer, and the peers 2x and 1.5x slower
            _time("mixtral", 8192, k, "moe", "end_to_end", 2.0),
            _time("mixtral", 8192, k, "hf-eager", "end_to_end", 4.0),
            _time("mixtral", 8192, k, "torch-grouped-mm", "end_to_end", 3.0),
        ]
    # decode at T=1, k=2: two experts' weights, 3 * 4096 * 14336 * 2 bytes each, eager and graph
    weight_bytes = 2 * 3 * 4096 * 14336 * 2
    found.append(_time("mixtral", 1, 2, "moe", "end_to_end", weight_bytes / (0.5 * copy), experts_used=2))
    found.append(_time("mixtral", 1, 2, "moe", "end_to_end", weight_bytes / (0.8 * copy), experts_used=2,
                       launch="graph"))
    goals = {row["goal"].split(":")[0]: row for row in sweep.goal_table(found)}
    assert goals["router"]["measured"] == pytest.approx(0.85) and goals["router"]["met"] is True
    assert goals["router"]["worst_at"] == "T=16384 k=1"
    assert goals["dispatch + permute + combine"]["measured"] == pytest.approx(0.70)
    assert goals["expert GEMMs"]["measured"] == pytest.approx(0.80) and goals["expert GEMMs"]["met"]
    decode = goals["decode (T <= 16)"]
    assert decode["measured"] == pytest.approx(0.80) and "graph" in decode["worst_at"]  # the graph replay counts
    hf = next(row for row in sweep.goal_table(found) if row["goal"].startswith("HF"))
    assert hf["measured"] == pytest.approx(2.0) and hf["met"] is True
    grouped = next(row for row in sweep.goal_table(found) if row["goal"].startswith("torch"))
    assert grouped["measured"] == pytest.approx(1.5)
    text = sweep.format_goals(sweep.goal_table(found))
    assert "MET" in text and "85.0%" in text


def test_goal_table_without_gpu_records_says_not_measured(tiny_run):
    result, _ = tiny_run
    rows = sweep.goal_table(result.records)  # mixtral float16: not in a CPU run
    assert all(row["measured"] is None and row["met"] is None for row in rows)
    assert "not measured" in sweep.format_goals(rows)


# ---------------------------------------------------------------- skew


def test_skew_distributions():
    for name in skew.SKEWS:
        p = skew.skew_probabilities(name, 8)
        assert p.shape == (8,) and np.isclose(p.sum(), 1.0)
    assert skew.skew_probabilities("one-hot", 8)[0] == 1.0
    assert np.all(skew.skew_probabilities("half-empty", 8)[4:] == 0)
    zipf = skew.skew_probabilities("zipf-1.0", 4)
    assert np.allclose(zipf, [1, 1 / 2, 1 / 3, 1 / 4] / np.sum([1, 1 / 2, 1 / 3, 1 / 4]))
    with pytest.raises(ValueError, match="skew"):
        skew.skew_probabilities("lopsided", 4)
    targets = skew.target_experts("half-empty", 500, 8, 2, np.random.default_rng(0))
    assert np.all(targets[:, 0] != targets[:, 1]) and targets.max() < 4


@pytest.mark.parametrize("k", [1, 2])
def test_skewed_inputs_route_as_asked(k):
    cfg = topk_moe.MoEConfig(256, 16, 8, k)
    router = topk_moe.init_weights(cfg, seed=3).router
    one_hot = topk_moe.route(skew.skewed_inputs("one-hot", 300, router, k, seed=1), router, k)
    assert np.all(one_hot.experts[:, 0] == 0)
    half = topk_moe.route(skew.skewed_inputs("half-empty", 300, router, k, seed=1), router, k)
    assert np.mean(half.experts < 4) > 0.99
    uniform = topk_moe.route(skew.skewed_inputs("uniform", 800, router, k, seed=1), router, k)
    first_choices = np.bincount(uniform.experts[:, 0], minlength=8)
    assert first_choices.min() > 50  # every expert gets about 100 of 800
    x = skew.skewed_inputs("zipf-2.0", 5, router, k, seed=1, dtype=np.float64)
    assert x.shape == (5, 256) and x.dtype == np.float64
    summary = skew.load_summary(np.array([4, 0, 2, 2]))
    assert summary == {"tokens_per_expert": [4, 0, 2, 2], "load_max_over_mean": 2.0, "experts_used": 3}
