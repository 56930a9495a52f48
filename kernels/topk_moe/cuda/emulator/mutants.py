"""Realistic GPU bugs, each a one-line edit of a kernels/topk_moe/cuda file, and quick
checks that must catch them when the kernels run on the emulator.

tests/test_mutations.py injects each mutant into a copy of kernels/topk_moe/cuda and runs
the bodies of tests/test_cuda.py on it; the Kernels chapter runs ``verify``,
which uses the lighter ``CHECKS`` here (the one tolerance rule, exact plans,
bitwise equality across schedules). A mutant marked ``racecheck`` changes no
result in the emulator (its lanes never interleave inside a read-modify-write):
its checks run under the emulated racecheck (racecheck.py), which must report it.
Both are CPU emulation, not GPU runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from . import build

KERNEL_DIR = build.KERNEL_DIR


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str  # occurs exactly once in the file
    mutated: str
    racecheck: bool = False  # caught only by a data-race check: run the checks under racecheck


MUTANTS = (
    Mutant("missing barrier before the cross-warp sum", "router.cu",
           "        __syncthreads();\n        if (warp > 0) return;", "        if (warp > 0) return;"),
    Mutant("barrier after an early exit", "router.cu",
           "        __syncthreads();\n        if (warp > 0) return;",
           "        if (warp > 0) return;\n        __syncthreads();"),
    Mutant("wrong shuffle mask (half a warp)", "router.cu",
           "row_max = fmaxf(row_max, __shfl_xor_sync(FULL_WARP_MASK, row_max, offset));",
           "row_max = fmaxf(row_max, __shfl_xor_sync(0x0000ffffu, row_max, offset));"),
    Mutant("ties go to the larger index", "router.cu",
           "(logit == other_logit && expert < other_expert)", "(logit == other_logit && expert > other_expert)"),
    # (An off-by-one in relu's loop, i <= n, can escape: it writes relu(garbage), which
    # is the garbage itself whenever that is positive; fences catch changed bytes only.)
    Mutant("off-by-one tail (chunk <= n_chunks)", "combine.cu",
           "for (long long chunk = lane; chunk < n_chunks; chunk += 32) {",
           "for (long long chunk = lane; chunk <= n_chunks; chunk += 32) {"),
    Mutant("wrong scalar C type (int for long long)", "activation.cu",
           "activate_relu_f32(float* hidden, long long n)", "activate_relu_f32(float* hidden, int n)"),
    Mutant("uninitialised shared counter", "dispatch.cu",
           "    int* counter = warp_counters + warp * n_experts;\n"
           "    for (int e = lane; e < n_experts; e += 32) counter[e] = 0;",
           "    int* counter = warp_counters + warp * n_experts;"),
    Mutant("missing __syncwarp between read and update of a shared counter", "dispatch.cu",
           "const int earlier_rounds = valid ? counter[e] : 0;\n            __syncwarp();",
           "const int earlier_rounds = valid ? counter[e] : 0;"),
    # The lanes of a warp lose each other's updates on a GPU; the emulator runs a warp's
    # lanes one after another between barriers, so the plan stays right: racecheck's.
    Mutant("non-atomic shared counter", "dispatch.cu",
           "atomicAdd(&counter[expert[round]], 1);", "counter[expert[round]] += 1;", racecheck=True),
    Mutant("unaligned 16-byte load (one element off)", "combine.cu",
           "+ chunk * VEC, value);", "+ chunk * VEC + 1, value);"),
    Mutant("missing barrier after refilling a shared buffer", "expert_mlp.cu",
           "        if (more) store_shared(s ^ 1);  // that buffer was last read before the previous barrier\n"
           "        __syncthreads();",
           "        if (more) store_shared(s ^ 1);  // that buffer was last read before the previous barrier"),
    Mutant("swapped ldmatrix.trans registers", "expert_mlp.cu",
           "b_frag[2 * jj][0] = r[0]; b_frag[2 * jj][1] = r[1];", "b_frag[2 * jj][0] = r[1]; b_frag[2 * jj][1] = r[0];"),
    Mutant("wrong accumulator row", "expert_mlp.cu",
           "const int local_row = warp_m * 64 + i * 16 + g + half_row * 8;",
           "const int local_row = warp_m * 64 + i * 16 + g * 2 + half_row;"),
    Mutant("missing cp.async wait", "expert_mlp.cu",
           "            cp_async_wait<1>();  // this thread's copies of tile kt have landed", ""),
    Mutant("decode reduces half the row groups", "expert_mlp.cu",
           "for (int offset = LANES; offset < 32; offset <<= 1) {",
           "for (int offset = LANES; offset < 16; offset <<= 1) {"),
)


def mutated_copy(folder: Path, mutant: Mutant) -> Path:
    """kernels/topk_moe/cuda's .cu and .cuh files in ``folder``, with ``mutant`` applied."""
    shutil.copytree(KERNEL_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__", "emulator"))
    text = (folder / mutant.file).read_text(encoding="utf-8")
    if text.count(mutant.original) != 1:
        raise ValueError(f"{mutant.name}: its original text must occur once in {mutant.file}")
    (folder / mutant.file).write_text(text.replace(mutant.original, mutant.mutated), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------
# the chapter's checks, one set per file


def _inputs(T, D, F, E, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(dtype)
    router = (rng.standard_normal((D, E)) / np.sqrt(D)).astype(dtype)
    w1 = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(dtype)
    w2 = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(dtype)
    w3 = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(dtype)
    return x, router, w1, w2, w3


def _check_router():
    from ... import reference
    from ...testing import assert_close_to_reference
    from . import backend

    for dtype in (np.float32, np.float16):
        x, router, *_ = _inputs(33, 104, 8, 8, dtype, 1)
        routing = backend.route(backend.to_compute(x), backend.to_compute(router), 2, True)
        expected = reference.route(x.astype(np.float64), router.astype(np.float64), 2, True)
        plain = reference.route(x, router, 2, True)
        assert_close_to_reference(routing.probs, expected.probs, plain.probs, name="probs", dtype=dtype)
        ties = np.random.default_rng(2).integers(-1, 2, size=(7, 33)).astype(dtype)
        tie_router = np.random.default_rng(3).integers(-1, 2, size=(33, 8)).astype(dtype)
        got = backend.route(backend.to_compute(ties), backend.to_compute(tie_router), 2, True).experts
        want = reference.route(ties.astype(np.float64), tie_router.astype(np.float64), 2, True).experts
        np.testing.assert_array_equal(got, want, err_msg="ties")


def _plan_checks(backend, reference):
    rng = np.random.default_rng(4)
    for T, E, capacity in ((300, 8, 80), (33, 64, None)):
        experts = np.stack([rng.permutation(E)[:2] for _ in range(T)]).astype(np.int32)
        experts[rng.random(T) < 0.5, 0] = 0  # a hot expert
        experts[:, 1] = np.where(experts[:, 1] == experts[:, 0], (experts[:, 0] + 1) % E, experts[:, 1])
        plan = backend.dispatch(experts, E, capacity)
        want = reference.dispatch(experts.astype(np.int64), E, capacity)
        for name in ("counts", "offsets", "token", "row"):
            np.testing.assert_array_equal(getattr(plan, name), getattr(want, name), err_msg=f"plan.{name}")
        yield experts, plan


def _check_dispatch():
    from ... import reference
    from . import backend

    for _ in _plan_checks(backend, reference):
        pass


def _check_combine():
    from ... import reference
    from ...testing import assert_close_to_reference
    from . import backend

    for experts, plan in _plan_checks(backend, reference):
        T = experts.shape[0]
        for dtype in (np.float32, np.float16):
            for D in (104, 33):
                x = np.random.default_rng(D).standard_normal((T, D)).astype(dtype)
                rows = backend.permute(backend.to_compute(x), plan)
                np.testing.assert_array_equal(rows, x[plan.token], err_msg="permute")
                out = np.random.default_rng(5).standard_normal((len(plan.token), D)).astype(dtype)
                weights = np.random.default_rng(6).random((T, 2)).astype(dtype)
                y = backend.combine(backend.to_compute(out), backend.to_compute(weights), plan.row)
                expected = reference.combine(out.astype(np.float64), weights.astype(np.float64), plan.row)
                assert_close_to_reference(y, expected, reference.combine(out, weights, plan.row), name="combine")


def _check_activation():
    from ...testing import assert_close_to_reference, expected_dense_mlp, plain_dense_mlp
    from . import backend

    for dtype in (np.float32, np.float16):
        x, _, w1, w2, _ = _inputs(33, 104, 72, 1, dtype, 7)
        y = backend.dense_mlp(backend.to_compute(x), backend.to_compute(w1[0]), backend.to_compute(w2[0]), None, "relu")
        assert_close_to_reference(y, expected_dense_mlp(x, w1[0], w2[0], None, "relu"),
                                  plain_dense_mlp(x, w1[0], w2[0], None, "relu"), name="dense relu", dtype=dtype)


def _check_expert_mlp():
    from ... import reference
    from ...testing import assert_close_to_reference
    from ..device import emulated_device
    from ..expert_mlp import grouped_mlp
    from . import loader

    device = emulated_device()
    offsets = np.array([0, 40, 40, 100, 129, 129, 150, 200, 258], dtype=np.int64)  # an empty expert, odd counts
    for version, dtype in (("v1", np.float32), ("v2", np.float32), ("decode", np.float32), ("v3", np.float16),
                           ("decode", np.float16)):
        rows, _, w1, w2, w3 = _inputs(258, 104, 72, 8, dtype, 8)
        args = [device.xp.asarray(a) for a in (rows, offsets, w1, w2, w3)]
        out = grouped_mlp(*args, "swiglu", version=version, device=device)
        as64 = [a.astype(np.float64) for a in (rows, w1, w2, w3)]
        expected = reference.expert_mlp(as64[0], offsets, *as64[1:], "swiglu")
        plain = reference.expert_mlp(rows, offsets, w1, w2, w3, "swiglu")
        assert_close_to_reference(out, expected, plain, name=f"expert_mlp {version}", dtype=dtype)
        if version in ("v3", "decode"):
            for order, copy_async in (("descending", "eager"), ("warp-by-warp", "late")):
                with loader.schedule(order, copy_async=copy_async):
                    again = grouped_mlp(*args, "swiglu", version=version, device=device)
                np.testing.assert_array_equal(again.view(np.uint8), out.view(np.uint8),
                                              err_msg=f"{version} under the {order} schedule")


CHECKS = {"router.cu": _check_router, "dispatch.cu": _check_dispatch, "combine.cu": _check_combine,
          "activation.cu": _check_activation, "expert_mlp.cu": _check_expert_mlp}


def failure_of(folder: Path, file: str, checks: Optional[dict] = None, *,
               racecheck: bool = False) -> Optional[BaseException]:
    """What the checks of ``file`` (``checks``, by default this module's ``CHECKS``)
    raise on the kernels in ``folder``; None if they pass. ``racecheck``: run them
    under the emulated racecheck, a data race raising ``racecheck.RaceHazard``."""
    import contextlib

    from . import loader
    from . import racecheck as races

    try:
        with loader.kernel_sources(folder), (races.checking(fail=True) if racecheck else contextlib.nullcontext()):
            (CHECKS if checks is None else checks)[file]()
    except Exception as failure:  # any failure of a check is a catch
        return failure
    return None


def verify(names=None) -> list:
    """One dict per mutant (those named, default all): name, file, caught, and the
    first line of what caught it; raises if the unmutated kernels fail a check of
    those files (then a catch would mean nothing)."""
    chosen = [m for m in MUTANTS if names is None or m.name in names]
    if names is not None and len(chosen) != len(set(names)):
        raise ValueError(f"unknown mutants: {sorted(set(names) - {m.name for m in MUTANTS})}")
    for file, racecheck in sorted({(m.file, m.racecheck) for m in chosen}):
        failure = failure_of(KERNEL_DIR, file, racecheck=racecheck)
        if failure is not None:
            raise AssertionError(f"the unmutated {file} fails its checks{' under racecheck' if racecheck else ''}: "
                                 f"{failure}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        for index, mutant in enumerate(chosen):
            failure = failure_of(mutated_copy(Path(scratch) / str(index), mutant), mutant.file,
                                 racecheck=mutant.racecheck)
            text = "" if failure is None else (str(failure).strip().splitlines() or [""])[0]
            rows.append({"mutant": mutant.name, "file": mutant.file, "caught": failure is not None,
                         "caught by": "" if failure is None else f"{type(failure).__name__}: {text[:140]}"})
    return rows
