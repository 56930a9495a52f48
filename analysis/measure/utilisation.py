"""How busy the GPU is while the MoE layer runs: Nsight Compute per kernel, NVML over a loop.

Two instruments, each optional; where one is missing (no GPU, no ``ncu``, no
``nsight-python``, no ``nvidia-ml-py``) its functions return the same fields
set to ``None`` with a ``message`` saying why, and never raise.

**Per kernel, Nsight Compute through nsight-python.** ``profile_kernels``
runs ``python -m analysis.measure.utilisation`` in a fresh process (nsight-python must
load before CUDA starts, and its 0.9 releases re-run the calling script under
``ncu``, so the profiled code has a script of its own). That process
annotates every kernel launch of one ``moe_forward`` (each CUDA-backend kernel
becomes its own ``nsight.annotate`` range, named after the kernel) and each
cuBLAS GEMM of the dense baseline at equal active FLOPs, and asks ``ncu`` for
``NCU_METRICS`` per annotation, one nsight-python call per k (the router's
kernel is named after k, and nsight-python wants the same ranges in every
configuration of one call): SM throughput, DRAM throughput, achieved
occupancy and tensor-pipe activity, each as % of its peak, the kernel's
duration, and the memory requests the CPU emulator also counts
(``analysis.measure.traffic``): global load/store requests and sectors, shared
wavefronts and bank conflicts, DRAM bytes, so that a first GPU run puts
measured counts beside the emulated ones (same kernels; the emulated counts
have no caches and come from the host compiler's code, the measured ones from
nvcc's). cp.async (LDGSTS) and ldmatrix (LDSM), v3's way to global and shared
memory, are counted in fields of their own. Where cuBLAS splits one GEMM into
several kernels, their durations and counts are summed and the percentages
weighted by duration (``kernel_combiner``). Clocks are left as the card has them (``clock_control="none"``);
caches are flushed before each kernel replay (``ncu``'s default).

nsight-python 0.9 re-runs the script as ``ncu ... python <path>/utilisation.py
<arguments>``, in the profiled process's environment: a script, not ``-m``, so
``profiling_environment`` puts the repository root (``analysis``), the folder
of ``topk_moe`` and ncu's own Python module on ``PYTHONPATH``, and ncu's
folder on ``PATH``, before nsight-python starts. The profiled process exits 0
when it measured every k, 1 when profiling failed, 2 when a tool is missing.

**Over a sustained loop, NVML through nvidia-ml-py.** ``nvml_during`` calls a
function again and again for a few seconds while a thread samples GPU
utilisation (% of time a kernel ran), SM clock, power and memory used.

Stages of the kernels, by name (``kernel_stage``): router*, dispatch*,
permute*, expert_mlp*hidden* (GEMM 1 + activation), expert_mlp*out* (GEMM 2),
expert_mlp_tile_starts (its helper), combine*, and dense:* for cuBLAS.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from analysis.measure.processes import TIMED_OUT, run_logged

REPO_ROOT = Path(__file__).resolve().parents[2]  # analysis/measure/utilisation.py -> the repository

#: Exit statuses of the profiled process (``python -m analysis.measure.utilisation``).
EXIT_MEASURED, EXIT_FAILED, EXIT_TOOLS_MISSING = 0, 1, 2

#: The fields of an Nsight Compute record and the ncu metric for each; where a
#: field lists several, the first the installed ncu knows for the chip is used
#: (names differ between ncu versions and GPU generations).
NCU_METRICS = {
    "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",),
    "dram_throughput_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                            "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    # Hopper's tensor pipe runs both mma.sync (HMMA) and wgmma; the first name covers both.
    "tensor_pipe_pct": ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                        "sm__inst_executed_pipe_tensor.avg.pct_of_peak_sustained_active"),
    "duration_s": ("gpu__time_duration.sum",),  # nanoseconds in ncu, seconds in our records
    # The memory requests the emulator counts (analysis.measure.traffic), as the
    # hardware counts them, for a side-by-side comparison: global load and store
    # requests and 32-byte sectors, shared wavefronts and bank conflicts.
    "global_load_requests": ("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",),
    "global_load_sectors": ("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",),
    "global_store_requests": ("l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",),
    "global_store_sectors": ("l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",),
    # cp.async (LDGSTS: global to shared without registers), v3's operand loads.
    "global_ldgsts_requests": ("l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum",),
    "global_ldgsts_sectors": ("l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum",),
    "shared_load_wavefronts": ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",),
    "shared_store_wavefronts": ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",),
    "shared_load_bank_conflicts": ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",),
    "shared_store_bank_conflicts": ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",),
    # ldmatrix (LDSM): v3 reads its tensor-core fragments from shared memory this way.
    "shared_ldsm_wavefronts": ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ldsm.sum",),
    "shared_ldsm_bank_conflicts": ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ldsm.sum",),
    "dram_bytes": ("dram__bytes.sum",),
}
NCU_FIELDS = tuple(NCU_METRICS)
NVML_FIELDS = ("gpu_utilisation_pct", "gpu_utilisation_max_pct", "sm_clock_mhz", "power_w",
               "memory_used_bytes", "samples")

#: ``ncu --query-metrics --chip`` names, by compute capability.
NCU_CHIPS = {"7.0": "gv100", "8.0": "ga100", "8.6": "ga102", "8.9": "ad102", "9.0": "gh100",
             "10.0": "gb100", "12.0": "gb202"}


# ---------------------------------------------------------------- kernel names


def kernel_stage(kernel: str) -> str:
    """The MoE stage a kernel belongs to, from its name (see the module docstring)."""
    name = kernel.lower()
    if name.startswith("dense:"):
        return "dense"
    if name.startswith("router"):
        return "router"
    if name.startswith("dispatch"):
        return "dispatch"
    if name.startswith("permute"):
        return "permute"
    if name.startswith("combine"):
        return "combine"
    if name.startswith("expert_mlp"):
        if "hidden" in name:
            return "expert_gemm1"
        if "_out" in name:
            return "expert_gemm2"
        return "expert_mlp"
    return "other"


# ---------------------------------------------------------------- what is missing


def find_ncu() -> Optional[str]:
    """The ``ncu`` executable: on PATH, else under CUDA_HOME or /opt/nvidia/nsight-compute."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = [Path(root) / "bin" / "ncu" for root in
                  (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if root]
    candidates += [Path(p) for p in sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return None


def ncu_report_folder(ncu: str) -> Optional[str]:
    """The folder of the ``ncu_report`` module that ships with this ``ncu``
    (nsight-python reads reports with it where no ``ncu-report`` wheel is installed)."""
    for folder in (Path(ncu).resolve().parent / "extras" / "python",
                   Path(ncu).resolve().parent.parent / "extras" / "python"):
        if (folder / "ncu_report.py").is_file():
            return str(folder)
    return None


def kernels_folder() -> str:
    """The folder that holds the ``topk_moe`` package (kernels/ in a checkout)."""
    spec = importlib.util.find_spec("topk_moe")
    if spec is not None and spec.origin:
        return str(Path(spec.origin).resolve().parent.parent)
    return str(REPO_ROOT / "kernels")


def profiling_environment(ncu: Optional[str], base: Optional[dict] = None) -> dict:
    """``base`` (default: this process's environment) with what the profiled
    process and nsight-python's re-run of it under ``ncu`` need: ncu's folder
    first on PATH (nsight-python runs plain ``ncu``), and on PYTHONPATH the
    repository root (``analysis``), the folder of ``topk_moe`` and ncu's
    ``ncu_report`` module, ahead of what was there."""
    environment = dict(os.environ if base is None else base)
    environment["PYTHONUNBUFFERED"] = "1"
    if ncu:
        environment["PATH"] = os.pathsep.join([str(Path(ncu).parent), environment.get("PATH", "")])
    folders = [str(REPO_ROOT), kernels_folder()] + ([ncu_report_folder(ncu)] if ncu and ncu_report_folder(ncu) else [])
    present = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(folders + present))
    return environment


def gpu_unavailable_reason() -> Optional[str]:
    from topk_moe.backends import cuda_unavailable_reason  # noqa: PLC0415 - imports CuPy where present

    return cuda_unavailable_reason()


def profiler_unavailable_reason() -> Optional[str]:
    """None when nsight-python and ``ncu`` can profile here, else why not."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"no GPU: {reason}"
    ncu = find_ncu()
    if ncu is None:
        return "Nsight Compute's ncu is not installed (not on PATH, CUDA_HOME or /opt/nvidia/nsight-compute)"
    if importlib.util.find_spec("nsight") is None:
        return ("nsight-python is not installed (pip install 'nsight-python' and its dependencies "
                "deepdiff, nvtx; see the gpu-tools extra)")
    return None


def nvml_unavailable_reason() -> Optional[str]:
    if importlib.util.find_spec("pynvml") is None:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as error:  # NVML library or driver missing
        return f"NVML does not start: {type(error).__name__}: {error}"
    return None


def empty_ncu_row(message: str, **identity) -> dict:
    return {**identity, **{field: None for field in NCU_FIELDS}, "tool": None, "message": message}


def empty_nvml_row(message: str, **identity) -> dict:
    return {**identity, **{field: None for field in NVML_FIELDS}, "tool": None, "message": message}


# ---------------------------------------------------------------- NVML


def nvml_during(fn: Callable[[], object], seconds: float = 2.0, interval_s: float = 0.02,
                synchronize: Optional[Callable[[], object]] = None) -> dict:
    """Call ``fn`` for about ``seconds`` while a thread samples NVML; return
    the medians (GPU utilisation, SM clock, power), the largest GPU
    utilisation and memory used, and the sample count. ``synchronize`` is
    called every few calls so the queue of launched work stays short.
    Without NVML: the same fields, ``None``, and a ``message``."""
    reason = nvml_unavailable_reason()
    if reason is not None:
        return empty_nvml_row(reason)
    import numpy  # noqa: PLC0415
    import pynvml  # noqa: PLC0415

    pynvml.nvmlInit()
    try:
        handle = _nvml_handle(pynvml)
        samples: list = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append((
                        pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                        pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                        pynvml.nvmlDeviceGetMemoryInfo(handle).used,
                    ))
                except Exception:  # a counter this GPU does not offer: skip the sample
                    pass
                stop.wait(interval_s)

        fn()  # once before sampling: compilation and allocation are not steady state
        if synchronize is not None:
            synchronize()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.perf_counter() + seconds
        calls = 0
        while time.perf_counter() < deadline:
            fn()
            calls += 1
            if synchronize is not None and calls % 4 == 0:
                synchronize()
        if synchronize is not None:
            synchronize()
        stop.set()
        sampler.join()
    finally:
        pynvml.nvmlShutdown()
    if not samples:
        return empty_nvml_row("NVML answered no sample on this GPU")
    table = numpy.asarray(samples, dtype=numpy.float64)
    return {
        "gpu_utilisation_pct": float(numpy.median(table[:, 0])),
        "gpu_utilisation_max_pct": float(table[:, 0].max()),
        "sm_clock_mhz": float(numpy.median(table[:, 1])),
        "power_w": float(numpy.median(table[:, 2])),
        "memory_used_bytes": int(table[:, 3].max()),
        "samples": len(samples),
        "calls": calls,
        "tool": "nvml",
        "message": None,
    }


def _nvml_handle(pynvml):
    """The NVML handle of the GPU CuPy computes on (matched by PCI bus id;
    NVML and CUDA may number devices differently), else device 0."""
    try:
        import cupy  # noqa: PLC0415

        return pynvml.nvmlDeviceGetHandleByPciBusId(cupy.cuda.Device().pci_bus_id.encode())
    except Exception:
        return pynvml.nvmlDeviceGetHandleByIndex(0)


# ---------------------------------------------------------------- Nsight Compute, caller side


def profile_kernels(preset: str, tokens: int, top_ks: tuple, dtype: str, *, timeout_s: float = 180.0,
                    work_dir: Optional[str] = None) -> list:
    """Per-kernel Nsight Compute metrics of one ``moe_forward`` (and the dense
    baseline's cuBLAS GEMMs) for each k in ``top_ks``, from a separate process.

    One row per (k, kernel): ``top_k``, ``kernel``, ``stage``, the
    ``NCU_FIELDS``, ``tool`` and ``message``. Where profiling cannot run or
    fails, one row per k with every field ``None`` and the reason.
    """
    identity = lambda k: {"top_k": k, "kernel": None, "stage": None}  # noqa: E731
    reason = profiler_unavailable_reason()
    if reason is not None:
        return [empty_ncu_row(reason, **identity(k)) for k in top_ks]
    ncu = find_ncu()
    work = Path(work_dir or tempfile.mkdtemp(prefix="moe-ncu-"))
    work.mkdir(parents=True, exist_ok=True)
    output = work / "kernels.json"
    command = [sys.executable, "-m", "analysis.measure.utilisation", "--preset", preset, "--tokens", str(tokens),
               "--dtype", dtype, "--out", str(output), "--work-dir", str(work), "--k", *map(str, top_ks)]
    log = work / "profile.log"
    returncode = run_logged(command, log, timeout_s=timeout_s, env=profiling_environment(ncu), cwd=REPO_ROOT)
    if returncode == TIMED_OUT:
        return [empty_ncu_row(f"Nsight Compute profiling stopped after {timeout_s:.0f} s (log: {log})",
                              **identity(k)) for k in top_ks]
    if output.is_file():
        rows = json.loads(output.read_text(encoding="utf-8"))
        if rows:
            return rows
    tail = log.read_text(encoding="utf-8", errors="replace")[-600:] if log.is_file() else ""
    return [empty_ncu_row(f"Nsight Compute profiling failed (exit {returncode}, log {log}): {tail}",
                          **identity(k)) for k in top_ks]


# ---------------------------------------------------------------- Nsight Compute, profiled side


def chosen_metrics(ncu: Optional[str], compute_capability: Optional[str]) -> dict:
    """{field: ncu metric}: for each field the first candidate that
    ``ncu --query-metrics`` lists for this chip; a field none of whose
    candidates it lists is left out (nsight-python stops at an unknown metric,
    so one would cost every row). Where ncu cannot be asked, the first
    candidate of every field."""
    known: set = set()
    chip = NCU_CHIPS.get(compute_capability or "")
    if ncu and chip:
        try:
            listing = subprocess.run([ncu, "--query-metrics", "--chip", chip], capture_output=True,
                                     text=True, timeout=60, check=True).stdout
            known = {line.split()[0] for line in listing.splitlines() if line.strip()}
        except (OSError, subprocess.SubprocessError):
            known = set()
    chosen = {}
    for field, candidates in NCU_METRICS.items():
        available = [c for c in candidates if c.split(".")[0] in known]
        if available or not known:
            chosen[field] = (available or candidates)[0]
    chosen["duration_s"] = NCU_METRICS["duration_s"][0]  # always: kernel_combiner weights by it
    return chosen


class _AnnotatedLaunches:
    """While active, every kernel the CUDA backend launches runs inside
    ``annotate(<kernel name>)``: one Nsight range per kernel launch.

    Every launcher gets its kernels from ``Device.get_kernel``, which for CuPy
    (``topk_moe.cuda.device.cupy_device``) looks up ``get_kernel`` in
    ``topk_moe.cuda.loader`` at each call; replacing that one name reaches
    every launcher. The original comes back on exit. nsight-python wants each
    range name once per run, so a kernel launched again in one run gets
    ``name#2``, ``name#3``."""

    MODULE = "topk_moe.cuda.loader"

    def __init__(self, annotate):
        self.annotate = annotate
        self.saved = None
        self.launches: dict = {}

    def __enter__(self):
        module = importlib.import_module(self.MODULE)
        self.saved = (module, module.get_kernel)
        module.get_kernel = self._wrap(module.get_kernel)
        return self

    def __exit__(self, *exc):
        module, original = self.saved
        module.get_kernel = original
        return False

    def range_name(self, name: str) -> str:
        self.launches[name] = self.launches.get(name, 0) + 1
        count = self.launches[name]
        return name if count == 1 else f"{name}#{count}"

    def _wrap(self, get_kernel):
        annotate = self.annotate

        def get_annotated_kernel(file, name, **defines):
            kernel = get_kernel(file, name, **defines)

            def launch(*args, **kwargs):
                with annotate(self.range_name(name)):
                    return kernel(*args, **kwargs)

            return launch

        return get_annotated_kernel


_LAYERS: dict = {}


def _layer(preset: str, tokens: int, top_k: int, dtype: str):
    """The inputs of one profiled configuration, made once per process and
    warmed up (kernels compiled) before any profiling."""
    key = (preset, tokens, top_k, dtype)
    if key not in _LAYERS:
        import cupy  # noqa: PLC0415

        import topk_moe  # noqa: PLC0415
        from analysis.measure import sweep_cells  # noqa: PLC0415
        from analysis.measure.sweep_plan import PRESETS  # noqa: PLC0415

        shape = PRESETS[preset]
        cfg = shape.config(top_k)
        weights = sweep_cells.device_weights(cfg, dtype, seed=0)
        x = sweep_cells.make_tokens("uniform", tokens, weights.router, top_k, dtype=dtype, device="cuda", seed=0)
        dense = sweep_cells.device_dense_weights(shape.d_model, top_k * shape.d_ff, shape.activation, dtype,
                                                 seed=1)
        topk_moe.moe_forward(x, weights, cfg, backend="cuda", check_finite=False)
        _dense_gemms(cupy, x, dense, shape.activation, annotate=None)
        cupy.cuda.Device().synchronize()
        _LAYERS[key] = (cfg, weights, x, dense, shape.activation)
    return _LAYERS[key]


def _dense_gemms(cupy, x, dense, activation: str, annotate) -> None:
    """The dense baseline's two or three cuBLAS GEMMs, each in its own range."""
    w1, w2, w3 = dense
    ranges = [("dense:gemm1", lambda: cupy.matmul(x, w1))]
    if w3 is not None:
        ranges.append(("dense:gemm3", lambda: cupy.matmul(x, w3)))
    hidden = None
    for name, gemm in ranges:
        if annotate is None:
            hidden = gemm()
        else:
            with annotate(name):
                hidden = gemm()
    if annotate is None:
        cupy.matmul(hidden, w2)
    else:
        with annotate("dense:gemm2"):
            cupy.matmul(hidden, w2)


def _profile_main(args) -> int:
    """The profiled process (see ``profile_kernels``): writes its rows to ``--out``;
    exit status EXIT_MEASURED, EXIT_FAILED or EXIT_TOOLS_MISSING."""
    identity = lambda k: {"top_k": k, "kernel": None, "stage": None}  # noqa: E731

    def finish(rows: list, status: int) -> int:
        Path(args.out).write_text(json.dumps(rows), encoding="utf-8")
        return status

    reason = profiler_unavailable_reason()
    if reason is not None:
        return finish([empty_ncu_row(reason, **identity(k)) for k in args.k], EXIT_TOOLS_MISSING)
    spaced = [argument for argument in args.arguments if not argument or any(c.isspace() for c in argument)]
    if spaced:  # nsight-python 0.9 joins the arguments with spaces into a shell command, unquoted
        message = f"--out, --work-dir: paths with spaces can't pass through nsight-python's re-run, got {spaced}"
        return finish([empty_ncu_row(message, **identity(k)) for k in args.k], EXIT_FAILED)
    ncu = find_ncu()
    # nsight-python re-runs this file as a script under plain ``ncu`` with a copy
    # of this environment: it must find ncu, analysis and topk_moe there too.
    os.environ.update(profiling_environment(ncu))
    report_folder = ncu_report_folder(ncu) if ncu else None
    if report_folder and report_folder not in sys.path:
        sys.path.append(report_folder)
    import topk_moe  # noqa: F401, PLC0415 - the profiled function needs both; fail here, before ncu
    from analysis.measure import sweep_cells  # noqa: F401, PLC0415
    try:
        import nsight  # before CUDA starts: nsight-python 1.x attaches ncu at import
    except Exception as error:
        rows = [empty_ncu_row(f"nsight-python does not import: {type(error).__name__}: {error}",
                              **identity(k)) for k in args.k]
        return finish(rows, EXIT_TOOLS_MISSING)
    import cupy  # noqa: PLC0415

    capability = str(cupy.cuda.Device().compute_capability)  # CuPy says "90" for 9.0
    capability = f"{capability[:-1]}.{capability[-1]}"
    rerun = "NSPY_NCU_PROFILE" in os.environ  # nsight-python's re-run under ncu: it only runs the function
    metrics = chosen_metrics(None if rerun else ncu, capability)

    def profile_moe_layer(preset, tokens, top_k, dtype):
        # made and warmed up (kernels compiled) on the first call, outside any range
        cfg, weights, x, dense, activation = _layer(preset, tokens, top_k, dtype)
        with _AnnotatedLaunches(nsight.annotate):
            topk_moe.moe_forward(x, weights, cfg, backend="cuda", check_finite=False)
        _dense_gemms(cupy, x, dense, activation, annotate=nsight.annotate)

    rows, failed = [], False
    for k in args.k:  # one call per k: the router's kernel (router_top1_*, router_top2_*) is named after k
        decorated = nsight.analyze.kernel(
            configs=[(args.preset, args.tokens, k, args.dtype)], runs=1, metrics=list(metrics.values()),
            combine_kernel_metrics=kernel_combiner(metrics),
            clock_control="none", cache_control="all", replay_mode="kernel",
            output_prefix=str(Path(args.work_dir) / f"nsight-k{k}-"),
        )(profile_moe_layer)
        try:
            result = decorated()
            if result is None:  # this is ncu's re-run for another k: nothing to profile here
                continue
            rows.extend(rows_from_frame(result.to_dataframe(), metrics))
        except Exception as error:  # ncu refused a metric, the report did not parse, ...
            failed = True
            rows.append(empty_ncu_row(f"Nsight Compute profiling failed: {type(error).__name__}: {error}",
                                      **identity(k)))
    return finish(rows, EXIT_FAILED if failed or not rows else EXIT_MEASURED)


def kernel_combiner(metrics: dict) -> Callable:
    """How nsight-python merges the kernels of one range (cuBLAS may split a
    GEMM in several): it reduces, pairwise, the arrays of metric values in the
    order of ``metrics``. Durations, requests, sectors, wavefronts, conflicts
    and bytes add up; a percentage of peak becomes the duration-weighted mean
    (the pair's duration is their sum, so a left fold over any number of kernels
    weights each by its own duration). Two positional arguments, as
    nsight-python 0.9 checks (``co_argcount == 2``)."""
    fields = list(metrics)
    duration = fields.index("duration_s")
    percentages = [i for i, field in enumerate(fields) if field.endswith("_pct")]

    def combine(first, second):
        import numpy  # noqa: PLC0415

        first = numpy.asarray(first, dtype=numpy.float64)
        second = numpy.asarray(second, dtype=numpy.float64)
        combined = first + second
        weights = (first[duration], second[duration])
        total = weights[0] + weights[1]
        for i in percentages:
            combined[i] = ((first[i] * weights[0] + second[i] * weights[1]) / total if total > 0
                           else (first[i] + second[i]) / 2)
        return combined

    return combine


def rows_from_frame(frame, metrics: dict) -> list:
    """nsight-python's long table (one line per annotation, config and metric)
    as one row per (k, kernel) with our field names; durations in seconds.
    ``kernel_names`` lists the kernels ncu saw in the range (``a|b`` where
    several were combined), ``kernels`` counts them."""
    field_of_metric = {metric: field for field, metric in metrics.items()}
    value_column = next(c for c in ("AvgValue", "Value", "MeanValue") if c in frame.columns)
    k_column = "top_k" if "top_k" in frame.columns else None
    rows: dict = {}
    for _, line in frame.iterrows():
        metric = str(line["Metric"])
        if metric not in field_of_metric:
            continue
        k = int(line[k_column]) if k_column else None
        kernel = str(line["Annotation"])
        names = str(line.get("Kernel", kernel))
        row = rows.setdefault((k, kernel), {"top_k": k, "kernel": kernel, "stage": kernel_stage(kernel),
                                            **{field: None for field in NCU_FIELDS},
                                            "kernel_names": names, "kernels": len(names.split("|")),
                                            "tool": "nsight-python+ncu", "message": None})
        value = float(line[value_column])
        field = field_of_metric[metric]
        row[field] = value * 1e-9 if field == "duration_s" else value
    for row in rows.values():
        row["metrics"] = metrics
    return list(rows.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.measure.utilisation",
        description="Profile one MoE layer's kernels with Nsight Compute (through nsight-python); "
                    "run by analysis.measure.sweep in a process of its own.")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--out", required=True, help="where the rows go (JSON)")
    parser.add_argument("--work-dir", default=tempfile.gettempdir(), help="nsight-python's report files")
    arguments = sys.argv[1:] if argv is None else [str(argument) for argument in argv]
    args = parser.parse_args(arguments)
    args.arguments = arguments  # as nsight-python will pass them to the re-run
    return _profile_main(args)


if __name__ == "__main__":
    sys.exit(main())
