"""Small launches of every kernel of kernels/topk_moe/cuda, for the emulated racecheck.

``CASES`` maps a name to a function that runs one kernel file's kernels through
the real launchers of the ``cuda-emulated`` backend (its grids, block sizes and
shared memory) at shapes small enough to check in seconds, yet with more than
one block wherever a kernel has a grid, more than one warp where it uses
shared memory, partial tiles, and both the vector and the element paths.
``run_all_kernels`` runs them under racecheck; tests/test_racecheck.py
checks that together they launch every kernel of the sources. They check no
results: tests/test_cuda.py does.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import numpy as np

from . import racecheck

FLOATS = (np.float32, np.float16)


def _random(shape, dtype, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _experts(T: int, E: int, seed: int) -> np.ndarray:
    """(T, 2) distinct experts per token, expert 0 hot (a long run of one expert)."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(E)[:2] for _ in range(T)]).astype(np.int32)
    experts[rng.random(T) < 0.5, 0] = 0
    experts[:, 1] = np.where(experts[:, 1] == experts[:, 0], (experts[:, 0] + 1) % E, experts[:, 1])
    return experts


def router():
    """router_top{1,2}_{f32,f16}: 19 tokens (3 blocks, the last partial), 8 and 40 experts."""
    from . import backend

    for E in (8, 40):
        for dtype in FLOATS:
            x, weights = _random((19, 40), dtype, 1), _random((40, E), dtype, 2, 40 ** -0.5)
            for k in (1, 2):
                backend.route(backend.to_compute(x), backend.to_compute(weights), k, True)


def dispatch():
    """The four dispatch kernels: 600 assignments over 3 segments, dropless and with a capacity."""
    from . import backend

    experts = _experts(300, 8, 3)
    for capacity in (None, 70):
        backend.dispatch(experts, 8, capacity)


def combine():
    """permute_rows_{16,8,4,2} (row widths 416, 72, 132 and 66 bytes) and combine_{f32,f16}_{vector,scalar}."""
    from . import backend

    experts = _experts(40, 8, 4)
    plan = backend.dispatch(experts, 8, 9)  # capacity 9: some assignments dropped (row -1)
    for dtype, D in ((np.float32, 104), (np.float16, 36), (np.float32, 33), (np.float16, 33), (np.float16, 104)):
        x = _random((40, D), dtype, D)
        backend.permute(backend.to_compute(x), plan)
        out = _random((int(plan.n_kept), D), dtype, 5)
        weights = np.random.default_rng(6).random((40, 2)).astype(dtype)
        backend.combine(backend.to_compute(out), backend.to_compute(weights), plan.row)


def activation():
    """activate_{relu,gelu,swiglu}_{f32,f16} (the dense MLP between its two GEMMs)."""
    from . import backend

    for dtype in FLOATS:
        x = _random((9, 40), dtype, 7)
        w1, w2, w3 = _random((40, 24), dtype, 8, 0.2), _random((24, 40), dtype, 9, 0.2), _random((40, 24), dtype, 10, 0.2)
        for activation_name in ("relu", "gelu", "swiglu"):
            backend.dense_mlp(backend.to_compute(x), backend.to_compute(w1), backend.to_compute(w2),
                              backend.to_compute(w3) if activation_name == "swiglu" else None, activation_name)


def expert_mlp():
    """expert_mlp_tile_starts and the hidden and out kernels of v1, v2, v3 and decode:
    150 rows over 4 experts (a 128-row tile and partial ones, an empty expert;
    decode, which streams the weights once per 4 rows, gets 14 rows: several
    passes, a partial one), gated (swiglu) and not (relu); D = 40, F = 48 take the
    16-byte paths (cp.async in v3), D = 33, F = 20 the element paths."""
    from ..device import emulated_device
    from ..expert_mlp import grouped_mlp

    device = emulated_device()
    offsets = {"grouped": np.array([0, 130, 130, 141, 150], dtype=np.int64),
               "decode": np.array([0, 9, 9, 12, 14], dtype=np.int64)}
    versions = (("v1", np.float32), ("v1", np.float16), ("v2", np.float32), ("v3", np.float16),
                ("decode", np.float32), ("decode", np.float16))
    for D, F in ((40, 48), (33, 20)):
        for version, dtype in versions:
            plan = offsets["decode" if version == "decode" else "grouped"]
            rows = _random((int(plan[-1]), D), dtype, 11)
            w1, w2, w3 = (_random((4, D, F), dtype, 12, D ** -0.5), _random((4, F, D), dtype, 13, F ** -0.5),
                          _random((4, D, F), dtype, 14, D ** -0.5))
            for activation_name in ("swiglu", "relu"):
                args = [device.xp.asarray(a) for a in (rows, plan, w1, w2)]
                gate = device.xp.asarray(w3) if activation_name == "swiglu" else None
                grouped_mlp(*args, gate, activation_name, version=version, device=device)


def builds() -> list:
    """The (file, -D defines) pairs the cases launch, for ``loader.prebuild(..., traffic=True)``:
    a cold cache then compiles them in parallel."""
    from .. import expert_mlp as launcher
    from .. import launch_config

    return ([("router.cu", launch_config.router_defines(E)) for E in (8, 40)]
            + [("dispatch.cu", launch_config.dispatch_defines()), ("combine.cu", {}), ("activation.cu", {})]
            + [("expert_mlp.cu", launcher.launch_defines(name, vector)) for name in ("swiglu", "relu")
               for vector in (True, False)])


CASES = {"router.cu": router, "dispatch.cu": dispatch, "combine.cu": combine, "activation.cu": activation,
         "expert_mlp.cu": expert_mlp}


# ---------------------------------------------------------------------------
# Every kernel of kernels/topk_moe/cuda, at small shapes


def run_all_kernels(checks: Optional[dict] = None) -> dict:
    """Run every kernel of kernels/topk_moe/cuda under the emulated racecheck, at
    the small shapes of ``CASES`` (or ``checks``: {name: callable}),
    and return a summary: {"kernels_run": sorted kernel names, "launches": int,
    "hazards": [str, ...] (empty when race-free), "cases": {case: hazard count},
    "failed": {case: error text} (a case that did not run), "seconds": float,
    "backend": "CPU emulation"}. CPU emulation, not a GPU run."""
    chosen = CASES if checks is None else checks
    started = time.perf_counter()
    kernels, hazards, per_case, failed, launches_run = set(), [], {}, {}, 0
    for name, case in chosen.items():
        with racecheck.checking() as launches:
            try:
                case()
            except Exception as error:  # a case that cannot run is reported, not hidden
                failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        launches_run += len(launches)
        kernels.update(launch.kernel for launch in launches)
        found = [f"{launch.kernel}: {hazard}" for launch in launches for hazard in launch.hazards]
        per_case[name] = len(found)
        hazards.extend(found)
    return {"kernels_run": sorted(kernels), "launches": launches_run, "hazards": hazards, "cases": per_case,
            "failed": failed, "seconds": round(time.perf_counter() - started, 2), "backend": "CPU emulation"}


def main(argv=None) -> int:
    """``python -m topk_moe.cuda.emulator.racecheck_cases [--json PATH]``: every kernel
    under the emulated racecheck (a cold cache first compiles the instrumented builds
    on every core); prints the summary and each hazard, writes the summary as JSON
    where asked; exit 0 when no hazard was found and every case ran, else 1."""
    parser = argparse.ArgumentParser(prog="python -m topk_moe.cuda.emulator.racecheck_cases",
                                     description="Every kernel of kernels/topk_moe/cuda under the emulated racecheck "
                                                 "(CPU emulation, not a GPU run).")
    parser.add_argument("--json", help="also write the summary to this file, as JSON")
    args = parser.parse_args(argv)
    from . import loader

    loader.prebuild(builds(), traffic=True)
    summary = run_all_kernels()
    print(f"emulated racecheck (CPU emulation): {len(summary['kernels_run'])} kernels, {summary['launches']} "
          f"launches, {len(summary['hazards'])} hazards, {len(summary['failed'])} cases that did not run, "
          f"{summary['seconds']:.1f} s", flush=True)
    for hazard in summary["hazards"]:
        print(f"  hazard: {hazard}")
    for case, error in summary["failed"].items():
        print(f"  case {case} did not run: {error}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(summary, out)
    return 0 if not summary["hazards"] and not summary["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

