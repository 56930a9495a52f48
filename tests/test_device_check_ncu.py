"""Issue 21, item 7: the first GPU run checks the prediction. `make device-check`'s
traffic-ncu step profiles one layer (preset "cpu", T = 256, k = 1 and 2, float16:
a shape the GPU model predicts) with Nsight Compute; its measured kernels become
`gpu-ncu` records, and the GPU chapter puts them beside the model's floors and
theoretical occupancy. Tested without a GPU: synthetic ncu rows and records in
temporary folders only, never committed; nothing here is a GPU measurement."""

from __future__ import annotations

import json

import pytest
from conftest import write_model_records

import analysis.records
from analysis import records
from analysis.chapters import gpu_performance
from analysis.chapters import performance as perf_chapters
from analysis.measure import device_check, gpu_model

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": None,
        "cuda_driver": "13.0", "cuda_runtime": "13.0"}


def _ncu_row(k, kernel, stage, duration_s, dram, sm, occupancy):
    """One row as analysis.measure.utilisation writes it to traffic-ncu.json."""
    return {"top_k": k, "kernel": kernel, "stage": stage, "sm_throughput_pct": sm, "dram_throughput_pct": dram,
            "achieved_occupancy_pct": occupancy, "tensor_pipe_pct": None, "duration_s": duration_s,
            "global_load_sectors": 100.0, "kernel_names": kernel, "kernels": 1, "tool": "nsight-python+ncu",
            "message": None}


ROWS = [
    _ncu_row(2, "router_top2_f16", "router", 4e-6, 30.0, 20.0, 40.0),
    _ncu_row(2, "dispatch_count_segments", "dispatch", 1e-6, 2.0, 5.0, 10.0),
    _ncu_row(2, "dispatch_scatter", "dispatch", 3e-6, 6.0, 9.0, 30.0),
    _ncu_row(2, "expert_mlp_tile_starts", "expert_mlp", 1e-6, 1.0, 1.0, 3.0),
    _ncu_row(2, "expert_mlp_v3_hidden_f16", "expert_gemm1", 9e-6, 50.0, 70.0, 25.0),
    {"top_k": 1, "kernel": None, "stage": None, "duration_s": None, "tool": None,
     "message": "Nsight Compute profiling failed: a made-up reason"},
]


def test_the_traffic_ncu_shape_is_one_the_model_predicts():
    shape = device_check.TRAFFIC_NCU_SHAPE
    assert shape["preset"] in gpu_model.SHAPES and shape["tokens"] in gpu_model.TOKENS
    assert shape["dtype"] == gpu_model.DTYPE and set(shape["top_ks"]) == {1, 2}
    assert list(device_check.TRAFFIC_NCU_ARGS) == ["--preset", "cpu", "--tokens", "256", "--k", "1", "2",
                                                    "--dtype", "float16"]


def test_the_default_plan_brings_the_ncu_records_back_within_the_file_limit(tmp_path):
    args = device_check.build_parser().parse_args([])
    steps = device_check.plan_steps(args, tmp_path, tmp_path)
    files = device_check.out_files(steps, record=True)
    assert f"{device_check.NCU_KIND}.jsonl" in files and len(files) <= device_check.OUT_FILE_LIMIT
    device_check.check_plan(steps, args.deadline_s, record=True)  # raises if it does not fit


def test_measured_rows_become_records_and_rows_with_a_message_do_not():
    found = device_check.ncu_records(ROWS, "hash")
    assert [r["kernel"] for r in found] == [r["kernel"] for r in ROWS[:5]]
    first = found[0]
    assert first["measurement"] == "ncu" and first["step"] == "traffic-ncu" and first["source_hash"] == "hash"
    assert first["params"] == {"preset": "cpu", "tokens": 256, "dtype": "float16", "skew": "uniform", "top_k": 2}
    assert first["duration_s"] == 4e-6 and first["achieved_occupancy_pct"] == 40.0 and "top_k" not in first


def test_the_records_are_written_and_copied_to_the_log_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(analysis.records, "_gpu_details", lambda: dict(H100))
    log_dir = tmp_path / "out"
    log_dir.mkdir()
    assert device_check.write_ncu_records(log_dir, tmp_path / "results", "hash") is None  # no traffic-ncu.json
    (log_dir / "traffic-ncu.json").write_text(json.dumps(ROWS[5:]))
    assert device_check.write_ncu_records(log_dir, tmp_path / "results", "hash") is None  # nothing measured
    assert not (log_dir / "gpu-ncu.jsonl").exists()
    (log_dir / "traffic-ncu.json").write_text(json.dumps(ROWS))
    path = device_check.write_ncu_records(log_dir, tmp_path / "results", "hash")
    assert path == tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "gpu-ncu.jsonl"
    copied = [json.loads(line) for line in (log_dir / "gpu-ncu.jsonl").read_text().splitlines()]
    assert copied == records.read_records("gpu-ncu", results_dir=tmp_path / "results")
    assert len(copied) == 5 and all(r["device_kind"] == "gpu" and r["compute_capability"] == "9.0" for r in copied)


def _model_records(root):
    """The model's records at T = 256 for both presets (a temporary folder)."""
    write_model_records(root, (256,))


def _synthetic_gpu_run(root, monkeypatch):
    """A device check's gpu-ncu records and a sweep time, as an H100 would leave them."""
    monkeypatch.setattr(analysis.records, "_gpu_details", lambda: dict(H100))
    records.write_records("gpu-ncu", device_check.ncu_records(ROWS, "hash"), device_kind="gpu", results_dir=root)
    params = {"preset": "cpu", "dtype": "float16", "tokens": 256, "top_k": 2, "skew": "uniform"}
    records.write_records("sweep", [{"measurement": "time", "implementation": "moe", "stage": "router",
                                     "launch": "eager", "median_s": 6e-6, "p20_s": 5e-6, "p80_s": 7e-6,
                                     "params": params}], device_kind="gpu", results_dir=root)


def _floor(prediction, stage):
    return next(r for r in prediction.floors if r["device_model"] == "H100 SXM" and r["k"] == 2
                and r["tokens"] == 256 and r["params"]["preset"] == "cpu" and r["params"]["routing"] == "uniform"
                and r["stage"] == stage)


def test_the_chapter_puts_the_device_checks_kernels_beside_the_prediction(tmp_path, monkeypatch):
    _model_records(tmp_path)
    _synthetic_gpu_run(tmp_path, monkeypatch)
    prediction = gpu_performance.prediction_data(tmp_path)
    assert len(prediction.measured) == 5
    ncu = gpu_performance.ncu_beside_predicted(prediction).set_index("stage")
    assert list(ncu.index) == ["router", "dispatch", "expert_gemm1"]  # the model's stage order
    dispatch, gemm1 = ncu.loc["dispatch"], ncu.loc["expert_gemm1"]
    floor = _floor(prediction, "dispatch")
    assert dispatch["measured (µs)"] == pytest.approx(4.0)  # the stage's two kernels add up
    assert dispatch["predicted floor (µs)"] == pytest.approx(1e6 * floor["floor_s"])
    assert dispatch["measured / predicted"] == pytest.approx(4e-6 / floor["floor_s"])
    assert dispatch["DRAM throughput (%)"] == pytest.approx((2 * 1 + 6 * 3) / 4)  # weighted by duration
    assert dispatch["SM throughput (%)"] == pytest.approx((5 * 1 + 9 * 3) / 4)
    assert dispatch["predicted DRAM use (%)"] == pytest.approx(100 * floor["predicted_utilisation"]["memory"])
    assert dispatch["predicted compute use (%)"] == pytest.approx(100 * floor["predicted_utilisation"]["compute"])
    assert gemm1["measured (µs)"] == pytest.approx(10.0)  # the tile-starts helper counts with GEMM 1
    assert gemm1["achieved occupancy (%)"] == pytest.approx((3 * 1 + 25 * 9) / 10)
    assert set(ncu["measured by"]) == {gpu_performance.NCU_TIME} and set(ncu["device"]) == {H100["name"]}

    data = perf_chapters.chapter_data("gpu", source="records", results_dir=tmp_path)
    beside = gpu_performance.measured_beside_predicted(prediction, data)
    sweep_rows = beside[beside["measured by"] == gpu_performance.SWEEP_TIME]
    assert len(sweep_rows) == 1 and len(beside) == 4
    assert sweep_rows.iloc[0]["measured / predicted"] == pytest.approx(6e-6 / _floor(prediction, "router")["floor_s"])

    achieved = gpu_performance.occupancy_beside_achieved(prediction, data).set_index("kernel")
    assert set(achieved.index) == {"router_top2_f16", "expert_mlp_v3_hidden_f16"}  # the kernels the model has
    row = achieved.loc["expert_mlp_v3_hidden_f16"]
    assert row["achieved occupancy (%)"] == 25.0 and row["theoretical occupancy (%)"] == 25.0
    assert row["arch"] == "sm_90" and row["measured at"] == "device check: cpu, T = 256"


def test_without_a_gpu_run_the_prediction_stands_alone(tmp_path):
    _model_records(tmp_path)
    prediction = gpu_performance.prediction_data(tmp_path)
    assert prediction.measured == () and gpu_performance.ncu_beside_predicted(prediction).empty


def test_a_gpu_the_model_does_not_know_is_shown_without_a_prediction(tmp_path, monkeypatch):
    _model_records(tmp_path)
    monkeypatch.setattr(analysis.records, "_gpu_details", lambda: dict(H100, name="NVIDIA L4"))
    records.write_records("gpu-ncu", device_check.ncu_records(ROWS, "hash"), device_kind="gpu", results_dir=tmp_path)
    prediction = gpu_performance.prediction_data(tmp_path)
    shown = gpu_performance.ncu_beside_predicted(prediction)
    assert len(prediction.measured) == 5 and not shown.empty
    assert set(shown["device"]) == {"NVIDIA L4"}
    assert shown["predicted floor (µs)"].isna().all(), "no floor for a GPU the model does not know"
