"""The CUDA sources build, without a GPU: nvcc compiles every kernels/topk_moe/cuda/*.cu
for sm_80 and sm_90 with the loader's options and -D variants, and ptxas
reports no register spills; every kernel has a launcher and every launcher a
kernel; the CuPy-free tools (loader text, launch constants, source hash) work
here. The device check's tests are in tests/test_device_check.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from topk_moe.cuda import build_report, launch_config, loader

ARCHS = ("sm_80", "sm_90")
NVCC = build_report.nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (no CUDA toolkit on this machine)")


@pytest.fixture(scope="module")
def reports():
    """{arch: resource report}, compiled once per arch for the whole module."""
    return {arch: build_report.resource_report(arch) for arch in ARCHS}


# ---------------------------------------------------------------------------
# nvcc


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_builds_without_spills(reports, arch):
    rows = reports[arch]
    assert rows, "the report is empty"
    spilling = [f"{r['file']}:{r['kernel']} {r['defines']}: {r['spill_stores']} bytes stored, "
                f"{r['spill_loads']} loaded" for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    for row in rows:
        assert row["arch"] == arch
        if row["registers"] is not None:
            assert 0 < row["registers"] <= 255, row


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_report_covers_every_kernel_of_every_variant(reports, arch):
    defined = build_report.source_kernels()
    for source in build_report.kernel_sources():
        for variant in launch_config.build_variants(source.name):
            reported = {(r["file"], r["kernel"]) for r in reports[arch]
                        if r["file"] == source.name and r["defines"] == variant and r["registers"] is not None}
            assert reported == {pair for pair in defined if pair[0] == source.name}, (source.name, variant)


@needs_nvcc
def test_router_registers_stay_bounded_for_the_largest_expert_count(reports):
    # E = 1024 keeps 32 logits per lane in registers: the reason for the limit.
    largest = [r for r in reports["sm_90"] if r["file"] == "router.cu"
               and r["defines"]["N_EXPERTS"] == launch_config.MAX_ROUTER_EXPERTS]
    assert len(largest) == 4
    assert all(r["stack_bytes"] == 0 for r in largest)


@needs_nvcc
def test_nvcc_failure_is_reported_with_its_output(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void broken(int* a) { a[0] = undefined_name; }\n')
    with pytest.raises(build_report.BuildError, match="undefined_name"):
        build_report.compile_report(broken, "sm_90")


def test_parse_ptxas_reads_registers_spills_shared_and_stack():
    report = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'first' for 'sm_90'
ptxas info    : Function properties for first
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compiling entry function 'second' for 'sm_90'
ptxas info    : Function properties for second
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
"""
    parsed = build_report.parse_ptxas(report)
    assert parsed["first"] == {"registers": 40, "spill_stores": 8, "spill_loads": 4,
                               "shared_bytes": 256, "stack_bytes": 16}
    assert parsed["second"] == {"registers": 10, "spill_stores": 0, "spill_loads": 0,
                                "shared_bytes": 0, "stack_bytes": 0}


# ---------------------------------------------------------------------------
# kernels and launchers


def test_every_kernel_has_a_launcher_and_every_launcher_a_kernel():
    defined = build_report.source_kernels()
    launched, problems = build_report.launcher_kernels()
    assert not problems, "\n".join(problems)
    assert defined, "no kernels found in kernels/topk_moe/cuda/*.cu"
    assert defined - launched == set(), f"kernels without a launcher: {sorted(defined - launched)}"
    assert launched - defined == set(), f"launchers of missing kernels: {sorted(launched - defined)}"


def test_our_kernel_families_are_all_there():
    defined = build_report.source_kernels()
    expected = {("router.cu", f"router_top{k}_{t}") for k in (1, 2) for t in ("f32", "f16")}
    expected |= {("dispatch.cu", name) for name in ("dispatch_count_segments", "dispatch_scan_segments",
                                                    "dispatch_offsets", "dispatch_scatter")}
    expected |= {("combine.cu", f"permute_rows_{w}") for w in (16, 8, 4, 2)}
    expected |= {("combine.cu", f"combine_{t}_{v}") for t in ("f32", "f16") for v in ("vector", "scalar")}
    expected |= {("activation.cu", f"activate_{a}_{t}") for a in ("relu", "gelu", "swiglu") for t in ("f32", "f16")}
    assert expected <= defined


def test_kernel_names_parser():
    source = """
// extern "C" __global__ void commented_out(int* a) {}
/* extern "C" __global__ void also_commented(int* a) {} */
extern "C" __global__ void plain(int* a) {}
extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)
with_bounds(const float* x, long long n) {}
__global__ void not_extern_c(int* a) {}
"""
    assert build_report.kernel_names(source) == ["plain", "with_bounds"]


def test_launcher_parser_flags_names_that_are_not_literals(tmp_path):
    launchers = tmp_path / "launchers.py"
    launchers.write_text(
        "from .loader import get_kernel\n"
        "def a(half):\n"
        "    get_kernel('x.cu', 'k_f16' if half else 'k_f32', N=1)\n"
        "def b(name):\n"
        "    get_kernel('x.cu', name)\n"
    )
    pairs, problems = build_report.launcher_kernels([launchers])
    assert pairs == {("x.cu", "k_f16"), ("x.cu", "k_f32")}
    assert len(problems) == 1 and "launchers.py:5" in problems[0]


# ---------------------------------------------------------------------------
# loader text and launch constants (no CuPy needed)


def test_loader_pastes_local_includes_once_and_keeps_system_ones(tmp_path, monkeypatch):
    (tmp_path / "a.cuh").write_text('#pragma once\n#include "b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("#pragma once\nint b;\n")
    (tmp_path / "main.cu").write_text('#include <cuda_fp16.h>\n#include "a.cuh"\n#include "b.cuh"\nint main_;\n')
    monkeypatch.setattr(loader, "KERNEL_DIR", tmp_path)
    text = loader.source_text("main.cu")
    assert "#include <cuda_fp16.h>" in text
    assert text.count("int a;") == 1 and text.count("int b;") == 1
    assert "#pragma once" not in text and '#include "' not in text


def test_loader_source_of_every_kernel_file_is_self_contained():
    for source in build_report.kernel_sources():
        assert '#include "' not in loader.source_text(source.name), source.name


def test_define_options_are_sorted_integers():
    assert loader.define_options(B=2, A=1) == ("-DA=1", "-DB=2")
    with pytest.raises(TypeError, match="FLAG"):
        loader.define_options(FLAG=True)


def test_importing_the_tools_does_not_import_cupy():
    code = ("import sys; import topk_moe.cuda.build_report, topk_moe.cuda.loader, topk_moe.cuda.launch_config; "
            "assert 'cupy' not in sys.modules, 'imported cupy'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("E, lanes, per_lane, tokens", [
    (1, 1, 1, 8), (2, 2, 1, 8), (5, 8, 1, 8), (8, 8, 1, 8), (32, 32, 1, 8), (33, 32, 2, 8),
    (64, 32, 2, 8), (256, 32, 8, 4), (1024, 32, 32, 1),
])
def test_router_layout(E, lanes, per_lane, tokens):
    assert launch_config.router_lanes(E) == (lanes, per_lane)
    defines = launch_config.router_defines(E)
    assert defines["N_EXPERTS"] == E and defines["ROUTER_TOKENS"] == tokens
    assert defines["ROUTER_TOKENS"] * per_lane <= launch_config.ROUTER_LOGITS_PER_LANE


def test_limits_raise_with_the_argument_name():
    with pytest.raises(ValueError, match="n_experts"):
        launch_config.router_defines(launch_config.MAX_ROUTER_EXPERTS + 1)
    with pytest.raises(ValueError, match="n_experts"):
        launch_config.dispatch_warps_per_block(launch_config.MAX_DISPATCH_EXPERTS + 1)
    assert launch_config.dispatch_warps_per_block(8) == launch_config.DISPATCH_MAX_WARPS
    assert launch_config.dispatch_warps_per_block(launch_config.MAX_DISPATCH_EXPERTS) == 1


@pytest.mark.parametrize("E", [1, 8, 64, 1024, launch_config.MAX_DISPATCH_EXPERTS])
def test_dispatch_shared_memory_fits_the_block_limit(E):
    """dispatch_scatter: per warp an int64 row base and a 16-bit counter per expert
    and an int per segment element, within the 48 KB a block may take unasked."""
    warps = launch_config.dispatch_warps_per_block(E)
    scatter = launch_config.dispatch_shared_bytes("dispatch_scatter", E)
    assert scatter == warps * (10 * E + 4 * launch_config.DISPATCH_SEGMENT) <= launch_config.DISPATCH_SHARED_BYTES
    assert launch_config.dispatch_shared_bytes("dispatch_count_segments", E) == warps * 4 * E
    assert launch_config.dispatch_shared_bytes("dispatch_offsets", E) == 0
    more_warps = min(warps + 1, launch_config.DISPATCH_MAX_WARPS)
    assert warps == launch_config.DISPATCH_MAX_WARPS or (
        more_warps * (10 * E + 4 * launch_config.DISPATCH_SEGMENT) > launch_config.DISPATCH_SHARED_BYTES)
    with pytest.raises(ValueError, match="kernel"):
        launch_config.dispatch_shared_bytes("dispatch", E)


def test_widest_access():
    assert launch_config.widest_access(33 * 4, 256, 512) == 4
    assert launch_config.widest_access(104 * 2, 256, 512) == 16
    assert launch_config.widest_access(100 * 2, 256, 512) == 8
    assert launch_config.widest_access(104 * 2, 256 + 2, 512) == 2


# ---------------------------------------------------------------------------
# provenance: the source hash and the device check's dry run


def test_source_hash_by_hand(tmp_path):
    files = {
        "kernels/topk_moe/api.py": b"print('api')\n",
        "kernels/topk_moe/cuda/router.cu": b"// router\n",
        "kernels/topk_moe/cuda/common.cuh": b"#pragma once\n",
        "kernels/topk_moe/cuda/sub/extra.py": b"",
        "kernels/notes.txt": b"not hashed",
        "kernels/__pycache__/api.cpython-311.pyc": b"not hashed",
        "analysis/outside.py": b"not hashed",
    }
    for relative, content in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    expected = hashlib.sha256(
        b"kernels/topk_moe/api.py\0print('api')\n\0"
        b"kernels/topk_moe/cuda/common.cuh\0#pragma once\n\0"
        b"kernels/topk_moe/cuda/router.cu\0// router\n\0"
        b"kernels/topk_moe/cuda/sub/extra.py\0\0"
    ).hexdigest()
    assert build_report.source_hash(tmp_path) == expected
    (tmp_path / "kernels/topk_moe/cuda/router.cu").write_bytes(b"// changed\n")
    assert build_report.source_hash(tmp_path) != expected


def test_source_hash_of_this_repository_is_stable():
    assert build_report.source_hash() == build_report.source_hash()
    assert len(build_report.source_hash()) == 64
    assert build_report.source_hash() != hashlib.sha256().hexdigest(), "the hash saw no file"
