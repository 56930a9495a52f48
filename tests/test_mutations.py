"""Mutation check: realistic GPU bugs injected into a copy of kernels/cuda, each
of which the CUDA tests (run on the emulator) must catch.

Every mutant edits one line of one .cu file (the text must occur exactly once)
and names the checks to run: the same test bodies as tests/test_cuda.py, called
on the "cuda-emulated" backend with the mutated copy's kernels. A mutant is
caught when one of them fails (a wrong result, a plan that differs, a fault the
emulator raises, a type the launcher refuses). The unmutated copy must pass
them all, so a catch is the mutant's doing. CPU emulation only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import test_cuda as suite

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels" / "cuda"
pytestmark = pytest.mark.skipif(not suite.EMULATED or suite.REASON is not None,
                                reason="the mutation check runs on the CPU emulator (no GPU needed; "
                                       f"{suite.REASON or 'a GPU is present: run tests/test_cuda.py there'})")

FLOATS = (np.float32, np.float16)


def route_checks():
    for dtype in FLOATS:
        for k in (1, 2):
            suite.test_route_matches_reference(33, 8, k, dtype)
    suite.test_route_exact_ties_go_to_the_smaller_index(7, 8, 2, np.float32)


def dispatch_checks():
    suite.test_dispatch_plan_equals_reference(300, 8, 2, "skewed", 1.25)
    suite.test_dispatch_plan_equals_reference(33, 64, 2, "random", None)


def combine_checks():
    for dtype in FLOATS:
        suite.test_permute_gathers_rows_bitwise(dtype, 104, 0)
        suite.test_combine_matches_reference(33, 2, 104, dtype)
        suite.test_combine_matches_reference(33, 2, 33, dtype)


def activation_checks():
    for dtype in FLOATS:
        suite.test_dense_mlp_matches_reference(33, 104, 72, "relu", dtype)


def expert_mlp_checks():
    for version, dtype in suite.EXPERT_MLP_VERSION_CASES:
        suite.test_every_expert_mlp_version_matches_reference(129, 8, 104, 72, "swiglu", version, dtype)
    suite.test_emulated_results_are_bitwise_equal_under_every_schedule("grouped", np.float16)


CHECKS = {"router.cu": route_checks, "dispatch.cu": dispatch_checks, "combine.cu": combine_checks,
          "activation.cu": activation_checks, "expert_mlp.cu": expert_mlp_checks}

# (name, file, original text, mutated text)
MUTANTS = [
    ("missing barrier before the cross-warp sum", "router.cu",
     "        __syncthreads();\n        if (warp > 0) return;", "        if (warp > 0) return;"),
    ("barrier after an early exit", "router.cu",
     "        __syncthreads();\n        if (warp > 0) return;", "        if (warp > 0) return;\n        __syncthreads();"),
    ("wrong shuffle mask (half a warp)", "router.cu",
     "row_max = fmaxf(row_max, __shfl_xor_sync(FULL_WARP_MASK, row_max, offset));",
     "row_max = fmaxf(row_max, __shfl_xor_sync(0x0000ffffu, row_max, offset));"),
    ("ties go to the larger index", "router.cu",
     "(logit == other_logit && expert < other_expert)", "(logit == other_logit && expert > other_expert)"),
    # (An off-by-one in relu's loop, i <= n, can escape: it writes relu(garbage),
    # which is the garbage itself whenever that is positive; fences catch changed bytes.)
    ("off-by-one tail (chunk <= n_chunks)", "combine.cu",
     "for (long long chunk = lane; chunk < n_chunks; chunk += 32) {",
     "for (long long chunk = lane; chunk <= n_chunks; chunk += 32) {"),
    ("wrong scalar C type (int for long long)", "activation.cu",
     "activate_relu_f32(float* hidden, long long n)", "activate_relu_f32(float* hidden, int n)"),
    ("uninitialised shared counter", "dispatch.cu",
     "    int* counter = warp_counters + warp * n_experts;\n    for (int e = lane; e < n_experts; e += 32) counter[e] = 0;",
     "    int* counter = warp_counters + warp * n_experts;"),
    ("missing __syncwarp between read and update of a shared counter", "dispatch.cu",
     "        const int earlier_rounds = valid ? counter[e] : 0;\n        __syncwarp();",
     "        const int earlier_rounds = valid ? counter[e] : 0;"),
    ("unaligned 16-byte load (one element off)", "combine.cu",
     "+ chunk * VEC, value);", "+ chunk * VEC + 1, value);"),
    ("missing barrier after refilling a shared buffer", "expert_mlp.cu",
     "        if (more) store_shared(s ^ 1);  // that buffer was last read before the previous barrier\n        __syncthreads();",
     "        if (more) store_shared(s ^ 1);  // that buffer was last read before the previous barrier"),
    ("swapped ldmatrix.trans registers", "expert_mlp.cu",
     "b_frag[2 * jj][0] = r[0]; b_frag[2 * jj][1] = r[1];", "b_frag[2 * jj][0] = r[1]; b_frag[2 * jj][1] = r[0];"),
    ("wrong accumulator row", "expert_mlp.cu",
     "const int local_row = warp_m * 64 + i * 16 + g + half_row * 8;",
     "const int local_row = warp_m * 64 + i * 16 + g * 2 + half_row;"),
    ("missing cp.async wait", "expert_mlp.cu",
     "            cp_async_wait<1>();  // this thread's copies of tile kt have landed", ""),
    ("decode reduces half the row groups", "expert_mlp.cu",
     "for (int offset = LANES; offset < 32; offset <<= 1) {", "for (int offset = LANES; offset < 16; offset <<= 1) {"),
]


def mutated_copy(folder: Path, file: str, original: str, mutated: str) -> Path:
    shutil.copytree(KERNEL_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__", "emulator"))
    text = (folder / file).read_text()
    assert text.count(original) == 1, f"{file}: the mutant's original text must occur once"
    (folder / file).write_text(text.replace(original, mutated))
    return folder


def caught(folder: Path, file: str):
    """The failure the checks of `file` raise on the kernels of `folder`, or None."""
    from kernels.cuda.emulator import loader

    try:
        with loader.kernel_sources(folder):
            CHECKS[file]()
    except Exception as failure:  # any failure of the checks is the catch
        return failure
    return None


def test_the_unmutated_kernels_pass_every_check():
    for file in CHECKS:
        assert caught(KERNEL_DIR, file) is None, file


@pytest.mark.slow
def test_every_mutant_is_caught(tmp_path):
    from kernels.cuda.emulator import loader

    folders = [mutated_copy(tmp_path / f"mutant{i}", file, original, mutated)
               for i, (_, file, original, mutated) in enumerate(MUTANTS)]
    failures = {}
    for folder, (name, file, _, _) in zip(folders, MUTANTS):
        failures[name] = caught(folder, file)
    missed = [name for name, failure in failures.items() if failure is None]
    report = "\n".join(f"{name}: {type(f).__name__}: {str(f).splitlines()[0][:150] if str(f) else ''}"
                       for name, f in failures.items() if f is not None)
    print(f"\nmutants caught: {len(MUTANTS) - len(missed)} of {len(MUTANTS)}\n{report}")
    assert len(MUTANTS) >= 10
    assert not missed, f"mutants the suite missed: {missed}"
