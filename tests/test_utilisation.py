"""Utilisation without a GPU: every path where the GPU, ncu, nsight-python or
NVML is missing gives null fields and a message, never an exception; the
parts that need no GPU (kernel names, metric choice, reading nsight-python's
table, the launch annotation) are checked directly."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from analysis.measure import utilisation


def _missing(monkeypatch, *names):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in names else real_find_spec(name, *a))


def test_kernel_names_map_to_stages():
    assert utilisation.kernel_stage("router_top2_f16") == "router"
    assert utilisation.kernel_stage("dispatch_scatter") == "dispatch"
    assert utilisation.kernel_stage("permute_rows_16") == "permute"
    assert utilisation.kernel_stage("expert_mlp_v3_hidden_f16") == "expert_gemm1"
    assert utilisation.kernel_stage("expert_mlp_decode_out_f32") == "expert_gemm2"
    assert utilisation.kernel_stage("expert_mlp_tile_starts") == "expert_mlp"
    assert utilisation.kernel_stage("combine_f16_vector") == "combine"
    assert utilisation.kernel_stage("dense:gemm1") == "dense"
    assert utilisation.kernel_stage("something_else") == "other"


def test_without_a_gpu_profiling_gives_null_fields(monkeypatch):
    monkeypatch.setattr(utilisation, "gpu_unavailable_reason", lambda: "CuPy is not installed")
    rows = utilisation.profile_kernels("mixtral", 8192, (1, 2), "float16")
    assert [row["top_k"] for row in rows] == [1, 2]
    for row in rows:
        assert all(row[field] is None for field in utilisation.NCU_FIELDS)
        assert "no GPU" in row["message"] and "CuPy" in row["message"]


def test_missing_ncu_or_nsight_python_is_named(monkeypatch):
    monkeypatch.setattr(utilisation, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(utilisation, "find_ncu", lambda: None)
    assert "ncu is not installed" in utilisation.profiler_unavailable_reason()
    monkeypatch.setattr(utilisation, "find_ncu", lambda: "/opt/ncu/ncu")
    _missing(monkeypatch, "nsight")
    assert "nsight-python is not installed" in utilisation.profiler_unavailable_reason()
    rows = utilisation.profile_kernels("mixtral", 16, (1,), "float16")
    assert rows[0]["sm_throughput_pct"] is None and "nsight-python" in rows[0]["message"]


def test_profiled_process_without_nsight_writes_null_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nsight", None)  # import nsight raises ImportError
    monkeypatch.setattr(utilisation, "find_ncu", lambda: None)
    out = tmp_path / "rows.json"
    assert utilisation.main(["--preset", "tiny", "--tokens", "4", "--k", "1", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all("does not import" in row["message"] for row in rows)


def test_nvml_missing_gives_null_fields(monkeypatch):
    _missing(monkeypatch, "pynvml")
    calls = []
    row = utilisation.nvml_during(lambda: calls.append(1), seconds=0.01)
    assert calls == []  # nothing runs when nothing can be sampled
    assert all(row[field] is None for field in utilisation.NVML_FIELDS)
    assert "nvidia-ml-py is not installed" in row["message"]


def test_nvml_that_does_not_start_gives_null_fields(monkeypatch):
    fake = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "pynvml" else real_find_spec(name, *a))
    row = utilisation.nvml_during(lambda: None, seconds=0.01)
    assert row["gpu_utilisation_pct"] is None and "NVML does not start" in row["message"]


def test_metric_choice_without_ncu_takes_the_first_candidates():
    chosen = utilisation.chosen_metrics(None, None)
    assert set(chosen) == set(utilisation.NCU_FIELDS)
    assert chosen["duration_s"] == "gpu__time_duration.sum"
    assert chosen["tensor_pipe_pct"] == utilisation.NCU_METRICS["tensor_pipe_pct"][0]


def test_rows_from_nsight_python_table():
    pandas = pytest.importorskip("pandas")
    metrics = utilisation.chosen_metrics(None, None)
    lines = []
    for k in (1, 2):
        for kernel, duration_ns in (("router_top1_f16", 1000.0), ("expert_mlp_v3_hidden_f16", 5e6)):
            for field, metric in metrics.items():
                value = duration_ns if field == "duration_s" else 10.0 * k
                lines.append({"Annotation": kernel, "preset": "mixtral", "tokens": 8192, "top_k": k,
                              "dtype": "float16", "Metric": metric, "AvgValue": value, "Kernel": kernel})
    rows = utilisation.rows_from_frame(pandas.DataFrame(lines), metrics)
    assert len(rows) == 4
    gemm = next(r for r in rows if r["top_k"] == 2 and r["stage"] == "expert_gemm1")
    assert gemm["duration_s"] == pytest.approx(5e-3) and gemm["tensor_pipe_pct"] == 20.0
    assert gemm["tool"] == "nsight-python+ncu" and gemm["message"] is None


def test_each_kernel_launch_gets_its_own_range(monkeypatch):
    fake = types.ModuleType("fake_backend")
    launched = []
    fake.get_kernel = lambda file, name, **defines: (lambda *args: launched.append((name, args)))
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setattr(utilisation._AnnotatedLaunches, "MODULES", ("fake_backend",))
    ranges = []

    class Annotate:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            ranges.append(self.name)

        def __exit__(self, *exc):
            return False

    original = fake.get_kernel
    with utilisation._AnnotatedLaunches(Annotate):
        fake.get_kernel("router.cu", "router_top1_f32", N_EXPERTS=8)(1, 2)
    assert ranges == ["router_top1_f32"] and launched == [("router_top1_f32", (1, 2))]
    assert fake.get_kernel is original  # put back
