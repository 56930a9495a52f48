"""Mutation check: realistic GPU bugs injected into a copy of kernels/topk_moe/cuda, each
of which the CUDA tests (run on the emulator) must catch.

Every mutant edits one line of one .cu file (the text must occur exactly once)
and names the checks to run: the same test bodies as tests/test_cuda.py, called
on the "cuda-emulated" backend with the mutated copy's kernels. A mutant is
caught when one of them fails (a wrong result, a plan that differs, a fault the
emulator raises, a type the launcher refuses, or, for a mutant marked
``racecheck``, a data race the emulated racecheck reports). The unmutated copy
must pass them all, so a catch is the mutant's doing. CPU emulation only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import test_cuda as suite
from topk_moe.cuda.emulator import mutants

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels" / "topk_moe" / "cuda"
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


#: The variant of each file its checks launch most (built up front, in parallel).
MAIN_VARIANT = {"router.cu": {"N_EXPERTS": 8, "ROUTER_TOKENS": 8, "ROUTER_WARPS": 8},
                "dispatch.cu": {"DISPATCH_ROUNDS": 8}, "combine.cu": {}, "activation.cu": {},
                "expert_mlp.cu": None}

CHECKS = {"router.cu": route_checks, "dispatch.cu": dispatch_checks, "combine.cu": combine_checks,
          "activation.cu": activation_checks, "expert_mlp.cu": expert_mlp_checks}

MUTANTS = mutants.MUTANTS


def caught(folder: Path, file: str, racecheck: bool = False):
    """The failure the test_cuda checks of `file` raise on the kernels of `folder`
    (under the emulated racecheck when `racecheck`), or None."""
    return mutants.failure_of(folder, file, checks=CHECKS, racecheck=racecheck)


def test_the_unmutated_kernels_pass_every_check():
    for file in CHECKS:
        assert caught(KERNEL_DIR, file) is None, file
    for file in sorted({m.file for m in MUTANTS if m.racecheck}):
        assert caught(KERNEL_DIR, file, racecheck=True) is None, f"{file} under racecheck"


def test_the_non_atomic_counter_is_caught_by_racecheck_alone(tmp_path):
    """dispatch.cu's atomicAdd on a warp's shared counter made a plain `+= 1`: the
    emulator runs a warp's lanes one after another, so the plan stays right and the
    test_cuda checks pass; racecheck reports the lanes' conflicting read and write
    of one counter on the mutated line (threads of one warp, the same block)."""
    from topk_moe.cuda.emulator import racecheck

    mutant = next(m for m in MUTANTS if m.name == "non-atomic shared counter")
    folder = mutants.mutated_copy(tmp_path / "mutant", mutant)
    assert caught(folder, mutant.file) is None  # what issue 25 saw: every result still right
    failure = caught(folder, mutant.file, racecheck=True)
    assert isinstance(failure, racecheck.RaceHazard), failure
    text = (folder / "dispatch.cu").read_text(encoding="utf-8").splitlines()
    line = f"kernels/topk_moe/cuda/dispatch.cu:{1 + next(i for i, s in enumerate(text) if mutant.mutated in s)}"
    assert failure.launch.kernel == "dispatch_count_segments"
    hazard = next(h for h in failure.launch.hazards if {h.first.kind, h.second.kind} == {"read", "write"})
    assert hazard.space == "shared" and hazard.first.line == hazard.second.line == line, hazard
    assert hazard.first.block == hazard.second.block and hazard.first.thread != hazard.second.thread
    assert hazard.first.thread[0] // 32 == hazard.second.thread[0] // 32  # lanes of one warp


@pytest.mark.slow
def test_every_mutant_is_caught(tmp_path):
    from topk_moe.cuda.emulator import loader

    from topk_moe.cuda import expert_mlp, launch_config

    folders = [mutants.mutated_copy(tmp_path / f"mutant{i}", mutant) for i, mutant in enumerate(MUTANTS)]
    assert MAIN_VARIANT["router.cu"] == launch_config.router_defines(8)
    for folder, mutant in zip(folders, MUTANTS):
        defines = MAIN_VARIANT[mutant.file] if mutant.file != "expert_mlp.cu" else expert_mlp.launch_defines("swiglu", True)
        try:
            loader.prebuild([(mutant.file, defines)], folder, traffic=mutant.racecheck)
        except Exception:  # a mutant that does not build is caught by its checks below, with the message
            pass
    failures = {}
    for folder, mutant in zip(folders, MUTANTS):
        failures[mutant.name] = caught(folder, mutant.file, racecheck=mutant.racecheck)
    missed = [name for name, failure in failures.items() if failure is None]
    report = "\n".join(f"{name}: {type(f).__name__}: {str(f).splitlines()[0][:150] if str(f) else ''}"
                       for name, f in failures.items() if f is not None)
    print(f"\nmutants caught: {len(MUTANTS) - len(missed)} of {len(MUTANTS)}\n{report}")
    assert len(MUTANTS) >= 10
    assert not missed, f"mutants the suite missed: {missed}"
