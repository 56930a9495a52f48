"""Where the performance chapters' numbers come from, and their tables and
charts, on records of a tiny CPU sweep (also standing in for GPU records,
which this machine cannot make)."""

from __future__ import annotations

import dataclasses
import shutil

import pandas as pd
import pytest
from conftest import write_model_records

pytest.importorskip("altair", reason="the book extra is not installed")
pytest.importorskip("torch", reason="the peers need the torch extra")

from analysis import charts  # noqa: E402
from analysis.chapters import gpu_performance  # noqa: E402
from analysis.chapters import performance as perf_chapters  # noqa: E402
from analysis.measure import gpu_model, sweep_plan  # noqa: E402

@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_sweep_results):
    """A results folder with one CPU sweep and the same records under a GPU-like folder name."""
    root = tmp_path_factory.mktemp("results")
    shutil.copytree(tiny_sweep_results, root, dirs_exist_ok=True)
    (cpu_folder,) = [p for p in root.iterdir() if p.name.startswith("cpu-")]
    shutil.copytree(cpu_folder, root / "nvidia-test-gpu")
    return root


def test_gpu_chapter_without_records_shows_the_note(tmp_path):
    data = perf_chapters.chapter_data("gpu", source="records", results_dir=tmp_path)
    assert data.source == "none" and data.empty
    assert perf_chapters.NO_GPU_RECORDS in data.note
    # Every table and chart still renders, empty or saying what is missing.
    assert perf_chapters.main_shape(data) == (None, None)
    curves = perf_chapters.layer_curves(data, None, None)
    assert "no timings" in charts.to_svg(perf_chapters.time_vs_tokens_chart(curves, perf_chapters.crossovers(curves),
                                                                            "t"))
    assert gpu_performance.goals_frame(data)["met"].eq("not measured").all()
    assert gpu_performance.ncu_frame(data).empty and perf_chapters.run_problems(data).empty
    for chart in (perf_chapters.stage_share_chart(perf_chapters.stage_frame(data, None, None), "t"),
                  perf_chapters.skew_chart(perf_chapters.skew_frame(data, None, None), "t"),
                  gpu_performance.utilisation_chart(gpu_performance.ncu_frame(data))):
        assert "<svg" in charts.to_svg(chart)


def test_gpu_chapter_reads_the_newest_gpu_records(results):
    data = perf_chapters.chapter_data("gpu", source="records", results_dir=results)
    assert data.source == "records" and not data.empty
    assert "nvidia-test-gpu" in data.note and "newest committed GPU records" in data.note
    assert data.device in data.note and "commit" in data.note
    assert perf_chapters.newest_folder("cpu", results).startswith("cpu-")
    assert perf_chapters.chapter_data("cpu", source="auto", results_dir=results).source == "records"


def test_cpu_chapter_runs_live_without_records(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_plan, "PLANS", dict(sweep_plan.PLANS, **{"cpu-tiny": sweep_plan.with_overrides(
        sweep_plan.PLANS["cpu-tiny"], tokens=(2,), top_ks=(1,), skews=("uniform",))}))
    data = perf_chapters.chapter_data("cpu", source="auto", results_dir=tmp_path)
    assert data.source == "live" and not data.empty and "measured live" in data.note
    with pytest.raises(ValueError, match="plan"):
        perf_chapters.chapter_data("gpu", source="live", plan="cpu-tiny")
    with pytest.raises(ValueError, match="source"):
        perf_chapters.chapter_data("cpu", source="somewhere")


def test_tables_and_charts_from_records(results):
    data = perf_chapters.chapter_data("cpu", source="records", results_dir=results)
    preset, dtype = perf_chapters.main_shape(data)
    assert (preset, dtype) == ("tiny", "float32")
    curves = perf_chapters.layer_curves(data, preset, dtype)
    assert set(curves["top_k"]) == {1, 2}
    labels = set(curves["label"])
    assert {"MoE (kernels)", "dense, equal active FLOPs (K·F)", "dense, equal parameters (E·F)",
            "HF eager loop"} <= labels
    crossings = perf_chapters.crossovers(curves)
    assert set(crossings["top_k"]) == {1, 2}
    assert perf_chapters.crossover_sentence(crossings).endswith(".")
    stages = perf_chapters.stage_frame(data, preset, dtype)
    assert set(stages["stage"]) == {"router", "dispatch", "permute", "expert_mlp", "combine", "end_to_end"}
    skews = perf_chapters.skew_frame(data, preset, dtype)
    assert set(skews["skew"]) == {"uniform", "zipf-1.0", "zipf-2.0", "one-hot", "half-empty"}
    assert skews.loc[skews["skew"] == "uniform", "time_vs_uniform"].eq(1.0).all()
    summary = perf_chapters.summary_frame(data)
    assert "moe ms" in summary.columns and len(summary) == 4
    assert set(perf_chapters.ceilings_table(data)["unit"]) == {"GB/s", "TFLOP/s"}
    numbers = perf_chapters.ceiling_numbers(data)
    assert numbers["copy_gb_per_s"] > 0
    # The sizes the prose gives are the ones the run's ceiling records used (cpu-tiny's).
    assert numbers["copy_size"] == "8 MiB" and numbers["gemm_shape"] == "256 × 256 × 256"
    assert list(perf_chapters.ceilings_table(data)["size"]) == ["8 MiB", "256 × 256 × 256"]
    assert len(gpu_performance.goals_frame(data, "tiny", "float32")) == 6
    for chart in (perf_chapters.time_vs_tokens_chart(curves, crossings, "t"),
                  perf_chapters.stage_share_chart(stages, "t"), perf_chapters.roofline_chart(stages, "t"),
                  perf_chapters.skew_chart(skews, "t")):
        svg = charts.to_svg(chart)
        assert "<svg" in svg and "no timings" not in svg


def test_crossover_is_interpolated_on_log_tokens():
    rows = []
    for T, moe, dense in ((1, 1.0, 2.0), (10, 2.0, 2.5), (100, 4.0, 2.0)):
        rows.append({"top_k": 1, "tokens": T, "label": "MoE (kernels)", "median_s": moe})
        rows.append({"top_k": 1, "tokens": T, "label": "dense, equal active FLOPs (K·F)", "median_s": dense})
    crossings = perf_chapters.crossovers(pd.DataFrame(rows))
    (row,) = crossings.itertuples()
    # ratio 0.8 at T=10 and 2 at T=100: log-ratio crosses 0 at 10 * 10**(log(1.25)/log(2.5))
    assert row.crossover_tokens == pytest.approx(10 * 10 ** (0.22314 / 0.91629), rel=1e-3)
    assert row.moe_faster_at == "T = 1, 10"


def test_a_ratio_within_its_interval_of_1_is_no_crossing():
    """The same curves, but the bench measured T = 10's ratio (0.8) with an
    interval that holds 1: T = 10 is within the noise, and no crossing is placed
    between it and T = 100; T = 1 (0.5, interval clear of 1) stays faster."""
    rows = []
    for T, moe, dense in ((1, 1.0, 2.0), (10, 2.0, 2.5), (100, 4.0, 2.0)):
        rows.append({"top_k": 1, "tokens": T, "label": "MoE (kernels)", "median_s": moe})
        rows.append({"top_k": 1, "tokens": T, "label": "dense, equal active FLOPs (K·F)", "median_s": dense})
    baseline = "dense, equal active FLOPs (K·F)"
    intervals = {(1, baseline, 1): [0.4, 0.6], (1, baseline, 10): [0.6, 1.1], (1, baseline, 100): [1.8, 2.2]}
    (row,) = perf_chapters.crossovers(pd.DataFrame(rows), intervals).itertuples()
    assert row.crossover_tokens is None or pd.isna(row.crossover_tokens)
    assert row.moe_faster_at == "T = 1" and row.moe_within_noise_at == "T = 10"
    sentence = perf_chapters.crossover_sentence(perf_chapters.crossovers(pd.DataFrame(rows), intervals))
    assert "faster at T = 1 only, and within the run's 95% interval of it at T = 10" in sentence
    assert "crossing" not in sentence


def test_utilisation_frames_and_chart():
    params = lambda k: {"top_k": k, "preset": "mixtral", "tokens": 8192}  # noqa: E731
    data = perf_chapters.ChapterData([
        {"measurement": "ncu", "kernel": "router_top1_f16", "stage": "router", "sm_throughput_pct": 30.0,
         "dram_throughput_pct": 80.0, "achieved_occupancy_pct": 60.0, "tensor_pipe_pct": 0.0,
         "duration_s": 1e-5, "message": None, "params": params(k)} for k in (1, 2)
    ] + [{"measurement": "nvml", "gpu_utilisation_pct": 99.0, "gpu_utilisation_max_pct": 100.0, "sm_clock_mhz": 1980.0,
          "power_w": 500.0, "memory_used_bytes": 1, "samples": 10, "message": None, "params": params(1)}],
        "records", "note")
    ncu = gpu_performance.ncu_frame(data)
    assert list(ncu["top_k"]) == [1, 2]
    assert "<svg" in charts.to_svg(gpu_performance.utilisation_chart(ncu))
    assert gpu_performance.nvml_frame(data).loc[1, "power_w"] == 500.0
    missing = gpu_performance.ncu_frame(perf_chapters.ChapterData(
        [{"measurement": "ncu", "kernel": None, "sm_throughput_pct": None, "message": "ncu is not installed",
          "params": params(1)}], "records", "note"))
    assert "ncu is not installed" in charts.to_svg(gpu_performance.utilisation_chart(missing))
    figure = gpu_performance.utilisation_figure(ncu)
    assert "measured on the GPU" in figure.caption and "bars for 1 kernel," in figure.alt
    note = gpu_performance.utilisation_figure(missing)
    assert note.title == "No Nsight Compute data" and "ncu is not installed" in note.text


def test_newest_run_is_picked():
    found = [{"run_id": "a", "utc": "2026-01-01"}, {"run_id": "b", "utc": "2026-02-01"},
             {"run_id": "a", "utc": "2026-01-02"}]
    assert perf_chapters.newest_run(found) == [{"run_id": "b", "utc": "2026-02-01"}]


def test_size_texts():
    assert perf_chapters.bytes_text(2**30) == "1 GiB" and perf_chapters.bytes_text(256 * 2**20) == "256 MiB"
    assert perf_chapters.bytes_text(1000) == "1000 bytes"
    assert perf_chapters.bytes_text(None) == perf_chapters.gemm_shape_text(None) == perf_chapters.SIZE_NOT_RECORDED
    assert perf_chapters.gemm_shape_text(8192) == "8192 × 8192 × 8192"
    empty = perf_chapters.ceiling_numbers(perf_chapters.ChapterData([], "none", "note"))
    assert empty["copy_size"] == empty["gemm_shape"] == "not measured"


def test_records_marked_invalid_are_in_no_table_or_chart(results):
    data = perf_chapters.chapter_data("cpu", source="records", results_dir=results)
    assert "HF eager loop" in set(perf_chapters.timing_frame(data)["label"])
    marked = [dict(r, valid=False) if r.get("implementation") == "hf-eager" else r for r in data.records]
    data = dataclasses.replace(data, records=marked)
    assert "HF eager loop" not in set(perf_chapters.timing_frame(data)["label"])
    assert perf_chapters.summary_frame(data)["hf_eager ms"].isna().all()



def test_plain_note_drops_the_note_prefix():
    data = perf_chapters.ChapterData([], "records", "No GPU here. Note: these are the newest records.")
    assert data.plain_note == "No GPU here. These are the newest records."
    assert perf_chapters.ChapterData([], "none", "Note: none yet.").plain_note == "None yet."


@pytest.mark.slow
def test_gpu_chapter_with_records_shows_every_section(results, tmp_path):
    """The GPU chapter on GPU-like records: every section stays, the 'will show' note goes."""
    nbformat = pytest.importorskip("nbformat")
    from analysis import run_notebooks

    output = run_notebooks.run_notebook("gpu_performance", tmp_path,
                                        {"source": "records", "results_dir": str(results)})
    cells = nbformat.read(output, as_version=4).cells
    text = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    assert "## What this chapter will show" not in text
    assert "## The ceilings" in text and "## Time per stage" in text and "## Routing skew" in text
    assert "## Predicted, not measured" in text and "## Prediction beside measurement" in text
    outputs = [o for cell in cells if cell.cell_type == "code" for o in cell.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    # Every chart is a numbered figure with alt text (charts.figure); none is a bare image.
    assert not any("image/svg+xml" in o.get("data", {}) for o in outputs)
    pages = [o.get("data", {}).get("text/html", "") for o in outputs]
    figures = [markup for markup in pages if 'class="moe-figure"' in markup]
    assert len(figures) == 7  # the tiny CPU records hold no Nsight Compute kernel: a note, not a figure
    assert any("No Nsight Compute data" in markup for markup in pages)
    for number, markup in enumerate(figures, start=1):
        assert f"<strong>Figure {number}.</strong>" in markup and 'alt=""' not in markup


@pytest.mark.slow
def test_gpu_chapter_without_records_shows_only_its_note(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from analysis import run_notebooks

    (tmp_path / "empty").mkdir()
    output = run_notebooks.run_notebook("gpu_performance", tmp_path,
                                        {"source": "records", "results_dir": str(tmp_path / "empty")})
    cells = nbformat.read(output, as_version=4).cells
    text = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    assert "## What this chapter will show" in text and "make device-check PY=python3" in text
    will_show = text.split("## What this chapter will show")[1].split("## Predicted, not measured")[0]
    assert "## The ceilings" not in text and "{glue" not in will_show
    # The prediction stays (it needs no GPU records) and says what it is; the side by side goes.
    assert "## Predicted, not measured" in text and "## Prediction beside measurement" not in text
    outputs = [o for cell in cells if cell.cell_type == "code" for o in cell.outputs]
    assert not any(o.output_type == "error" for o in outputs)


# ---------------------------------------------------------------- the prediction (issue 21)


def _model_records(root):
    """Model records written as the model's command writes them, into ``root``/predicted-model."""
    write_model_records(root, (1, 4096, 8192), sanity=True)


def test_prediction_tables_and_charts_say_they_are_predicted(tmp_path):
    _model_records(tmp_path)
    prediction = gpu_performance.prediction_data(tmp_path)
    assert not prediction.empty
    note = gpu_performance.prediction_note(prediction, tmp_path)
    assert "predicted (model), not measured" in note.title.lower() and "datasheet" in note.text
    occupancy = gpu_performance.occupancy_frame(prediction)
    row = occupancy.set_index("kernel").loc["expert_mlp_v3_hidden_f16"]
    assert row["sm_90 blocks/SM"] == 2 and row["sm_90 limiter"] == "registers" and row["sm_90 occupancy (%)"] == 25
    assert "predicted (model), not measured" in gpu_performance.occupancy_caption()
    waves = gpu_performance.waves_frame(prediction)
    assert set(waves["kernel"]) == {"expert_mlp_v3_hidden_f16", "router_top2_f16"}
    assert (waves["H100 waves"] >= 1).all()
    floors = gpu_performance.floors_frame(prediction, "mixtral")
    assert {"MoE k = 1", "MoE k = 2", "dense, width 14336", "dense, width 28672"} == set(floors["series"])
    for chart in (gpu_performance.layer_floor_chart(floors), gpu_performance.stage_floor_chart(floors),
                  gpu_performance.roofline_chart(floors)):
        svg = charts.to_svg(chart)
        assert "<svg" in svg and "predicted (model), not measured" in svg
    sentence = gpu_performance.k_change_sentence(floors)
    assert "predicted (model), not measured" in sentence and "T = 8192" in sentence
    numbers = gpu_performance.layer_change_numbers(floors)
    assert 1.5 < numbers[1]["ratio"] < 2.1 and numbers[8192]["k2_bound"] == "compute"
    sanity = gpu_performance.sanity_frame(prediction)
    assert list(sanity["T"]) == [1, 8, 256, 1024] and (sanity["published / floor"] > 1).all()
    assert "1.36 at T = 1" in gpu_performance.sanity_sentence(prediction)


def test_prediction_without_model_records_says_how_to_make_them(tmp_path):
    prediction = gpu_performance.prediction_data(tmp_path)
    assert prediction.empty
    assert "python -m analysis.measure.gpu_model" in gpu_performance.prediction_note(prediction, tmp_path).text
    floors = gpu_performance.floors_frame(prediction)
    assert "no model records" in charts.to_svg(gpu_performance.layer_floor_chart(floors))
    assert gpu_performance.k_change_sentence(floors).startswith("The model's records hold no floors")
    assert gpu_performance.sanity_frame(prediction).empty and gpu_performance.waves_frame(prediction).empty


def test_effects_frame_from_the_committed_traffic_counts():
    effects = gpu_performance.effects_frame(gpu_performance.prediction_data())
    assert set(effects["device"]) == {"A100", "H100"}
    v2 = effects[effects["inefficiency"].str.startswith("v2")].set_index("device")["stage slower by, at most (%)"]
    assert v2.to_dict() == pytest.approx({"A100": 100 * 96 / 4096, "H100": 100 * 96 / 2048})
    dispatch = effects[effects["inefficiency"] == gpu_model.DISPATCH_EFFECT]
    assert len(dispatch) and (dispatch["stage slower by, at most (%)"] < 5).all()  # issue 21's line, after the fix
    assert not effects["inefficiency"].str.contains("stride-k").any()


def test_a_synthetic_gpu_record_is_put_beside_the_prediction(tmp_path):
    """GPU records (here one synthetic sweep file in a temporary results folder,
    never committed) put measurement beside prediction."""
    import json

    _model_records(tmp_path)
    folder = tmp_path / "nvidia-h100-80gb-hbm3"
    folder.mkdir()
    common = {"kind": "sweep", "utc": "2030-01-01T00:00:00Z", "device": "NVIDIA H100 80GB HBM3",
              "compute_capability": "9.0", "run_id": "synthetic", "git_commit": "0" * 40, "git_dirty": False}
    params = {"preset": "mixtral", "dtype": "float16", "tokens": 4096, "top_k": 2, "skew": "uniform"}
    lines = [dict(common, measurement="time", implementation="moe", stage="expert_mlp", launch="eager",
                  median_s=5e-3, p20_s=4.9e-3, p80_s=5.1e-3, params=params),
             dict(common, measurement="ncu", kernel="expert_mlp_v3_hidden_f16", stage="expert_gemm1",
                  achieved_occupancy_pct=23.0, sm_throughput_pct=80.0, dram_throughput_pct=20.0,
                  tensor_pipe_pct=60.0, duration_s=2e-3, message=None, params=params)]
    (folder / "sweep.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = perf_chapters.chapter_data("gpu", source="records", results_dir=tmp_path)
    assert data.source == "records"
    prediction = gpu_performance.prediction_data(tmp_path)
    beside = gpu_performance.measured_beside_predicted(prediction, data)
    assert len(beside) == 1
    row = beside.iloc[0]
    floors = [r["floor_s"] for r in prediction.floors if r["device_model"] == "H100 SXM" and r["k"] == 2
              and r["tokens"] == 4096 and r["params"]["preset"] == "mixtral" and r["params"]["routing"] == "uniform"
              and r["stage"] in ("expert_gemm1", "expert_gemm2")]
    assert row["predicted floor (µs)"] == pytest.approx(1e6 * sum(floors))
    assert row["measured / predicted"] == pytest.approx(5e-3 / sum(floors)) and row["measured / predicted"] > 1
    achieved = gpu_performance.occupancy_beside_achieved(prediction, data)
    assert achieved.iloc[0].to_dict() == {"k": 2, "kernel": "expert_mlp_v3_hidden_f16", "arch": "sm_90",
                                          "theoretical occupancy (%)": 25.0, "limiter": "registers",
                                          "achieved occupancy (%)": 23.0}


def _ncu_record(device: str, stage: str = "dispatch", kernel: str = "dispatch_scatter") -> dict:
    return {"kind": "gpu-ncu", "utc": "2030-01-01T00:00:00Z", "device": device, "device_kind": "gpu",
            "compute_capability": "9.0", "kernel": kernel, "stage": stage, "duration_s": 4e-6,
            "dram_throughput_pct": 10.0, "sm_throughput_pct": 5.0, "achieved_occupancy_pct": 40.0,
            "params": {"preset": "mixtral", "tokens": 4096, "top_k": 2, "dtype": "float16"}}


def test_a_gpu_the_model_does_not_know_is_shown_without_a_prediction(tmp_path):
    """The device check on an H200 (or a PCIe H100): its Nsight Compute rows are
    shown with the prediction columns saying there is no model; an H100 SXM's get a floor."""
    _model_records(tmp_path)
    prediction = dataclasses.replace(gpu_performance.prediction_data(tmp_path), measured=(
        _ncu_record("NVIDIA H200"), _ncu_record("NVIDIA H100 PCIe"), _ncu_record("NVIDIA H100 80GB HBM3")))
    assert gpu_performance._device_model("NVIDIA H200") is None
    assert gpu_performance._device_model("NVIDIA H100 PCIe") is None
    assert gpu_performance._device_model("NVIDIA A100-SXM4-80GB") == "A100 SXM"
    frame = gpu_performance.ncu_beside_predicted(prediction)
    by_device = frame.set_index("device")
    assert set(by_device.index) == {"NVIDIA H200", "NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3"}
    for other in ("NVIDIA H200", "NVIDIA H100 PCIe"):
        assert pd.isna(by_device.loc[other, "predicted floor (µs)"])
        assert by_device.loc[other, "measured (µs)"] == pytest.approx(4.0)
    assert by_device.loc["NVIDIA H100 80GB HBM3", "predicted floor (µs)"] > 0
    times, throughputs = gpu_performance.beside_views(frame)
    shown = times.set_index("device")
    assert shown.loc["NVIDIA H200", "predicted floor (µs)"] == gpu_performance.NO_MODEL
    assert shown.loc["NVIDIA H100 80GB HBM3", "measured / predicted"] > 0
    assert throughputs.set_index("device").loc["NVIDIA H200", "predicted DRAM use (%)"] == gpu_performance.NO_MODEL
    assert throughputs.set_index("device").loc["NVIDIA H200", "DRAM throughput (%)"] == 10.0
    # A shape the model does not predict is left out, on any GPU.
    elsewhere = dict(_ncu_record("NVIDIA H200"),
                     params={"preset": "mixtral", "tokens": 7, "top_k": 2, "dtype": "float16"})
    assert gpu_performance.ncu_beside_predicted(dataclasses.replace(prediction, measured=(elsewhere,))).empty


def test_prediction_figures_and_narrow_tables(tmp_path):
    """Every prediction chart is a numbered figure whose caption says it is predicted and
    whose alt text says what it shows; the wide tables come split, one per device."""
    _model_records(tmp_path)
    prediction = gpu_performance.prediction_data(tmp_path)
    floors = gpu_performance.floors_frame(prediction, "mixtral")
    for figure in (gpu_performance.layer_floor_figure(floors), gpu_performance.stage_floor_figure(floors),
                   gpu_performance.roofline_figure(floors)):
        assert "predicted (model), not measured" in figure.caption
        assert "A100 SXM" in figure.alt and "H100 SXM" in figure.alt and not figure.alt.endswith(".svg")
        assert f"Figure {figure.number}." in figure._repr_mimebundle_()["text/html"]
    # The prose promises the study's routing dashed.
    assert "strokeDash" in gpu_performance.layer_floor_chart(floors).to_json()
    occupancy = gpu_performance.occupancy_tables(prediction)
    assert set(occupancy) == {"sm_80", "sm_90"}
    assert list(occupancy["sm_90"].columns) == ["kernel", "registers", "occupancy (%)", "limiter"]
    assert gpu_performance.threads_sentence(prediction) == "Every kernel runs 256 threads per block."
    assert "but these (128: expert_mlp_v1_hidden_f16" in gpu_performance.occupancy_caption(
        "sm_80", gpu_performance.prediction_data())
    assert "H100 SXM (sm_90)" in gpu_performance.occupancy_caption("sm_90")
    waves = gpu_performance.waves_tables(prediction)
    assert set(waves) == {"A100", "H100"} and len(waves["H100"].columns) == 6
    committed = gpu_performance.waves_tables(gpu_performance.prediction_data())
    assert {"dense (F)", "dense (2 F)"} <= set(committed["H100"]["case"])


def test_the_skew_chart_gives_each_T_its_own_bar_and_the_time_chart_ends_at_the_data():
    """Issue 23: with skews measured at two T the bars stacked (the uniform bar reached 2),
    and log axes rounded out to powers of ten past the data."""
    import pandas as pd

    skews = pd.DataFrame({"skew": ["uniform", "one-hot"] * 2, "tokens": [16, 16, 1024, 1024], "top_k": [1] * 4,
                          "median_s": [1.0, 0.8, 2.0, 1.5], "time_vs_uniform": [1.0, 0.8, 1.0, 0.75],
                          "load_max_over_mean": [1.0, 8.0] * 2, "experts_used": [8, 1] * 2})
    spec = perf_chapters.skew_chart(skews, "t").to_dict()
    bars = spec["layer"][0]["encoding"]
    assert bars["xOffset"]["field"] == "case" and bars["color"]["field"] == "case"
    cases = {row["case"] for rows in spec["datasets"].values() for row in rows if "case" in row}
    assert cases == {"T = 16, k = 1", "T = 1,024, k = 1"}
    curves = pd.DataFrame({"top_k": [1, 1], "tokens": [1, 16], "label": ["MoE", "MoE"], "median_s": [1e-4, 1e-3],
                           "p20_s": [0.9e-4, 0.9e-3], "p80_s": [1.1e-4, 1.1e-3]})
    time_spec = perf_chapters.time_vs_tokens_chart(curves, pd.DataFrame(), "t").to_dict()
    encoding = time_spec["hconcat"][0]["layer"][0]["encoding"]
    assert encoding["x"]["scale"]["nice"] is False and encoding["y"]["scale"]["nice"] is False


def test_stage_charts_name_stages_in_words_and_head_panels_by_k():
    stages = pd.DataFrame({"stage": ["router", "expert_mlp", "end_to_end"], "tokens": [16, 16, 16], "top_k": [1, 1, 1],
                           "median_s": [1e-5, 1e-4, 2e-4], "fraction_of_roofline": [0.1, 0.5, 0.4]})
    share = perf_chapters.stage_share_chart(stages, "t").to_dict()
    roofline = perf_chapters.roofline_chart(stages, "t").to_dict()
    for spec in (share, roofline):
        assert spec["encoding"]["color"]["field"] == "stage_name"
        assert spec["encoding"]["column"]["header"]["labelExpr"] == "'k = ' + datum.value"
        names = {row["stage_name"] for rows in spec["datasets"].values() for row in rows}
        assert "expert MLPs" in names and "expert_mlp" not in names
    assert "whole layer" in roofline["encoding"]["color"]["scale"]["domain"]
