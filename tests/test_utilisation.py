"""Utilisation without a GPU: every path where the GPU, ncu, nsight-python or
NVML is missing gives null fields and a message, never an exception; the
parts that need no GPU (kernel names, metric choice, reading nsight-python's
table, the launch annotation) are checked directly."""

from __future__ import annotations

import importlib.util
import json
import os
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
    monkeypatch.setattr(utilisation, "profiler_unavailable_reason", lambda: None)
    monkeypatch.setattr(utilisation, "find_ncu", lambda: None)
    _keep_environment(monkeypatch)
    out = tmp_path / "rows.json"
    code = utilisation.main(["--preset", "tiny", "--tokens", "4", "--k", "1", "2", "--out", str(out)])
    assert code == utilisation.EXIT_TOOLS_MISSING  # not 0: device_check must not report "ok"
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all("does not import" in row["message"] for row in rows)


def test_profiled_process_without_a_gpu_exits_with_tools_missing(tmp_path):
    out = tmp_path / "rows.json"
    code = utilisation.main(["--preset", "tiny", "--tokens", "4", "--k", "1", "--out", str(out)])
    assert code == utilisation.EXIT_TOOLS_MISSING
    assert "no GPU" in json.loads(out.read_text())[0]["message"]


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


class _Ranges:
    """A stand-in for nsight.annotate that records the range names entered."""

    def __init__(self):
        self.names = []

    def __call__(self, name):
        ranges = self

        class Annotate:
            def __enter__(self):
                ranges.names.append(name)

            def __exit__(self, *exc):
                return False

        return Annotate()


def _keep_environment(monkeypatch):
    """_profile_main updates os.environ (nsight-python copies it for ncu's re-run): restore it."""
    for name in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_cupy(monkeypatch):
    """A CuPy stand-in, enough for cupy_device() and the real loader's compile
    step: RawModule(...).get_function(name) returns a launch that logs its name."""
    from topk_moe.cuda import device, loader

    launched = []
    fake = types.ModuleType("cupy")

    class RawModule:
        def __init__(self, code, options):
            self.options = options

        def get_function(self, name):
            return lambda *args, **kwargs: launched.append(name)

    fake.RawModule = RawModule
    fake.asnumpy = lambda a: a
    fake.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(compute_capability="90"))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    for cached in (device.cupy_device, loader._module, loader._kernel):
        cached.cache_clear()
    yield launched
    for cached in (device.cupy_device, loader._module, loader._kernel):
        cached.cache_clear()


def test_each_kernel_launch_gets_its_own_range_through_the_real_loader(fake_cupy):
    """The wrapper reaches what every launcher calls: Device.get_kernel of
    cupy_device(), which looks up topk_moe.cuda.loader.get_kernel at each call.
    (Wrapping the backend modules, as before, wrapped nothing: they have no
    get_kernel of their own.)"""
    from topk_moe.cuda import loader
    from topk_moe.cuda.device import cupy_device

    device = cupy_device()
    original = loader.get_kernel
    ranges = _Ranges()
    with utilisation._AnnotatedLaunches(ranges):
        device.get_kernel("router.cu", "router_top2_f16", N_EXPERTS=8, ROUTER_TOKENS=8)((1,), (32,), ())
        permute = device.get_kernel("combine.cu", "permute_rows_16")
        permute((1,), (32,), ())
        permute((1,), (32,), ())  # a second launch of one kernel: a range name of its own
    assert ranges.names == ["router_top2_f16", "permute_rows_16", "permute_rows_16#2"]
    assert fake_cupy == ["router_top2_f16", "permute_rows_16", "permute_rows_16"]
    assert loader.get_kernel is original  # put back
    device.get_kernel("combine.cu", "permute_rows_8")((1,), (32,), ())
    assert ranges.names[-1] == "permute_rows_16#2", "no range outside the context"


def _fake_nsight(calls, rerun_for=None):
    """An nsight-python stand-in with 0.9's calling convention: analyze.kernel(
    configs=..., combine_kernel_metrics=..., ...)(function)() returns results
    whose to_dataframe() has one line per (annotation, metric); None in ncu's
    re-run for another configuration."""
    pandas = pytest.importorskip("pandas")
    fake = types.ModuleType("nsight")
    fake.annotate = _Ranges()

    def kernel(**settings):
        assert settings["combine_kernel_metrics"].__code__.co_argcount == 2  # as nsight-python 0.9 checks
        calls.append(settings)

        def decorate(function):
            def run():
                (preset, tokens, k, dtype), = settings["configs"]
                if rerun_for is not None and k != rerun_for:
                    return None
                lines = [{"Annotation": name, "Metric": metric, "AvgValue": 1000.0, "Kernel": name,
                          "preset": preset, "tokens": tokens, "top_k": k, "dtype": dtype}
                         for name in (f"router_top{k}_f16", "expert_mlp_v3_hidden_f16")
                         for metric in settings["metrics"]]
                return types.SimpleNamespace(to_dataframe=lambda: pandas.DataFrame(lines))
            return run
        return decorate

    fake.analyze = types.SimpleNamespace(kernel=kernel)
    return fake


def test_each_k_is_profiled_in_a_call_of_its_own(tmp_path, monkeypatch, fake_cupy):
    """nsight-python 0.9 groups a call's kernels by range name across its
    configurations and stops when a name is missing from one ("Expect same
    number of kernels per run"): router_top1_* exists only at k = 1. So one
    call per k, each with one configuration."""
    calls = []
    monkeypatch.setitem(sys.modules, "nsight", _fake_nsight(calls))
    monkeypatch.setattr(utilisation, "profiler_unavailable_reason", lambda: None)
    monkeypatch.setattr(utilisation, "find_ncu", lambda: None)
    _keep_environment(monkeypatch)
    out = tmp_path / "rows.json"
    code = utilisation.main(["--preset", "tiny", "--tokens", "4", "--k", "1", "2", "--out", str(out),
                             "--work-dir", str(tmp_path)])
    assert code == utilisation.EXIT_MEASURED
    assert [call["configs"] for call in calls] == [[("tiny", 4, 1, "float16")], [("tiny", 4, 2, "float16")]]
    assert len({call["output_prefix"] for call in calls}) == 2
    rows = json.loads(out.read_text())
    assert {(row["top_k"], row["kernel"]) for row in rows} == {
        (1, "router_top1_f16"), (1, "expert_mlp_v3_hidden_f16"), (2, "router_top2_f16"), (2, "expert_mlp_v3_hidden_f16")}


def test_in_the_rerun_for_one_k_the_other_is_passed_over(tmp_path, monkeypatch, fake_cupy):
    calls = []
    monkeypatch.setitem(sys.modules, "nsight", _fake_nsight(calls, rerun_for=2))
    monkeypatch.setattr(utilisation, "profiler_unavailable_reason", lambda: None)
    monkeypatch.setattr(utilisation, "find_ncu", lambda: None)
    _keep_environment(monkeypatch)
    out = tmp_path / "rows.json"
    assert utilisation.main(["--preset", "tiny", "--tokens", "4", "--k", "1", "2", "--out", str(out),
                             "--work-dir", str(tmp_path)]) == utilisation.EXIT_MEASURED
    assert {row["top_k"] for row in json.loads(out.read_text())} == {2}


def test_ldgsts_and_ldsm_requests_are_measured():
    """v3 reaches global memory through cp.async (LDGSTS) and reads shared
    memory through ldmatrix (LDSM); op_ld / op_st alone would miss both."""
    metrics = utilisation.chosen_metrics(None, None)
    assert "op_ldgsts" in metrics["global_ldgsts_requests"] and "op_ldgsts" in metrics["global_ldgsts_sectors"]
    assert "op_ldsm" in metrics["shared_ldsm_wavefronts"] and "op_ldsm" in metrics["shared_ldsm_bank_conflicts"]


def test_metric_choice_asks_ncu_and_leaves_out_what_the_chip_lacks(monkeypatch):
    """With the stand-in ncu's --query-metrics listing (ncu's format): the
    first listed candidate per field, and a field with no listed candidate left
    out, rather than passed on for nsight-python to refuse the whole run."""
    monkeypatch.setitem(utilisation.NCU_METRICS, "made_up_pct", ("no_such__metric.avg.pct_of_peak_sustained_active",))
    ncu = str(utilisation.REPO_ROOT / "analysis" / "measure" / "standins" / "ncu")
    chosen = utilisation.chosen_metrics(ncu, "9.0")
    assert "made_up_pct" not in chosen
    assert chosen["dram_throughput_pct"] == "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"
    assert chosen["global_ldgsts_requests"] == "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum"
    assert chosen["duration_s"] == "gpu__time_duration.sum"


#: ``ncu --csv --page raw --metrics ...`` for one annotated range in which cuBLAS
#: ran a split-K GEMM as two kernels (the GEMM, then its reduction): the header,
#: the units line, one line per kernel.
SPLIT_GEMM_CSV = """\
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","dram__bytes.sum","l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"
"","","","","","","","","","","","nsecond","%","byte","sector"
"0","4242","python3.12","gpu-host","sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas","1","7","(384, 1, 1)","(64, 4, 3)","0","9.0","30000","80","6000000","150000"
"1","4242","python3.12","gpu-host","cublasLt::splitKreduce_kernel<32, 16, int, __half, __half, float, __half, true, false, false>","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","10000","20","2000000","50000"
"""


def test_a_gemm_split_in_several_kernels_adds_up():
    """nsight-python 0.9 merges the kernels of one range by reducing their
    arrays of metric values pairwise with combine_kernel_metrics
    (functools.reduce over NCUActionData.combine). Durations, bytes and sectors
    add up; a percentage of peak is weighted by duration. (max(), as before,
    would have taken the larger of each, and raised on arrays.)"""
    import csv
    import functools
    import io

    import numpy

    lines = list(csv.reader(io.StringIO(SPLIT_GEMM_CSV)))
    header, kernels = lines[0], lines[2:]
    fields = {"duration_s": "gpu__time_duration.sum", "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
              "dram_bytes": "dram__bytes.sum", "global_load_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"}
    columns = [header.index(metric) for metric in fields.values()]
    values = [numpy.array([float(line[c]) for c in columns]) for line in kernels]
    combine = utilisation.kernel_combiner(fields)
    assert combine.__code__.co_argcount == 2
    merged = functools.reduce(combine, values)
    assert merged[0] == 40000.0 and merged[2] == 8e6 and merged[3] == 200000.0
    assert merged[1] == pytest.approx((80 * 30000 + 20 * 10000) / 40000)  # 65, not 80
    three = functools.reduce(combine, values + [numpy.array([20000.0, 50.0, 1e6, 1e4])])
    assert three[1] == pytest.approx((80 * 30000 + 20 * 10000 + 50 * 20000) / 60000)


def test_ncu_rerun_finds_ncu_analysis_and_topk_moe(tmp_path):
    """nsight-python 0.9.6 (nsight/collection/ncu.py, launch_ncu) re-runs the
    profiled script as

        ncu --log-file ... --metrics ... -f -o <report> <python> <abs path of the script> <its arguments>

    through the shell, with a copy of the profiled process's environment plus
    NSPY_NCU_PROFILE, and finds ``ncu`` on PATH. Here that command runs, in the
    environment the profiled process sets up (profiling_environment), from a
    bare environment (no PYTHONPATH, ncu not on PATH), with the stand-in ncu:
    ncu must be found, and the re-run must import analysis and topk_moe. It
    gets as far as the missing GPU (exit EXIT_TOOLS_MISSING, a "no GPU" row);
    without PYTHONPATH it stopped at ModuleNotFoundError (exit 1, no rows)."""
    import shutil
    import subprocess

    bin_folder = tmp_path / "nsight-compute"
    bin_folder.mkdir()
    ncu = bin_folder / "ncu"
    shutil.copy(utilisation.REPO_ROOT / "analysis" / "measure" / "standins" / "ncu", ncu)
    record = tmp_path / "ncu-calls.jsonl"
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STANDIN_NCU_RECORD": str(record)}
    environment = utilisation.profiling_environment(str(ncu), base=bare)
    environment["NSPY_NCU_PROFILE"] = "signature-of-profile_moe_layer"
    script = str(utilisation.REPO_ROOT / "analysis" / "measure" / "utilisation.py")
    out = tmp_path / "rows.json"
    report = tmp_path / "nsight-k1-ncu-output-profile_moe_layer-0.ncu-rep"
    command = (f"ncu --log-file {tmp_path / 'ncu.log'} --cache-control all --clock-control none --replay-mode kernel "
               f'--nvtx --nvtx-include "regex:nsight-python@.+/" --metrics gpu__time_duration.sum -f -o {report} '
               f"{sys.executable} {script} --preset tiny --tokens 4 --k 1 --dtype float16 --out {out} "
               f"--work-dir {tmp_path}")
    done = subprocess.run(command, shell=True, env=environment, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["target"][:2] == [sys.executable, script]
    assert calls[0]["NSPY_NCU_PROFILE"] == "signature-of-profile_moe_layer"
    assert str(utilisation.REPO_ROOT) in calls[0]["PYTHONPATH"].split(os.pathsep)
    assert utilisation.kernels_folder() in calls[0]["PYTHONPATH"].split(os.pathsep)
    assert "ModuleNotFoundError" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == utilisation.EXIT_TOOLS_MISSING, done.stdout + done.stderr
    assert "no GPU" in json.loads(out.read_text())[0]["message"]
    assert "No kernels were profiled" in (tmp_path / "ncu.log").read_text()


def test_profile_kernels_runs_from_the_repository_root():
    """REPO_ROOT is the checkout (it was analysis/, where `python -m analysis...` can't start)."""
    assert (utilisation.REPO_ROOT / "analysis" / "measure" / "utilisation.py").is_file()
    assert (utilisation.REPO_ROOT / "kernels" / "topk_moe").is_dir()


def test_arguments_with_spaces_are_refused_before_ncu(tmp_path, monkeypatch):
    """nsight-python 0.9 builds ncu's command as one shell string with the
    script's arguments joined by spaces, unquoted: a path with a space would
    split in the re-run."""
    monkeypatch.setattr(utilisation, "profiler_unavailable_reason", lambda: None)
    out = tmp_path / "rows.json"
    code = utilisation.main(["--preset", "tiny", "--tokens", "4", "--k", "1", "--out", str(out),
                             "--work-dir", str(tmp_path / "a folder")])
    assert code == utilisation.EXIT_FAILED and "spaces" in json.loads(out.read_text())[0]["message"]
