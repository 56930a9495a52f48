"""A small run of every CUDA kernel, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python -m topk_moe.cuda.smoke
    compute-sanitizer --tool racecheck python -m topk_moe.cuda.smoke

Each kernel family runs on small, odd shapes that take every code path (each
router layout, capacity drops, every permute access width, vector and scalar
combine, each activation, each expert-MLP version the default rule picks), and
its result is checked against the reference where that is cheap. CuPy's
memory pool is switched off first, so that every array is its own
allocation and an access past its end is out of bounds for the sanitizer.
Prints one line per check; exit status 1 when any check fails.

``--backend cuda-emulated`` runs the same checks on the CPU emulator (CPU
emulation, never a GPU result): ``make device-check DRY=1`` rehearses the
sanitizer steps with it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import topk_moe
from topk_moe import reference, testing


def _host(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


class Checks:
    def __init__(self) -> None:
        self.failures = 0

    def expect(self, condition: bool, what: str) -> None:
        print(("ok     " if condition else "FAILED ") + what, flush=True)
        self.failures += 0 if condition else 1


def _inputs(T, D, F, E, dtype, seed, activation="swiglu"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(dtype)
    router = (rng.standard_normal((D, E)) / np.sqrt(D)).astype(dtype)
    w1 = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(dtype)
    w2 = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(dtype)
    w3 = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(dtype) if activation == "swiglu" else None
    return x, topk_moe.MoEWeights(router, w1, w2, w3)


def run(checks: Checks, backend: str = "cuda") -> None:
    # route: small-E layout (E = 5: 8 expert lanes x 4 column lanes), E = 40 (32 lanes, 2 per lane)
    for E in (5, 40):
        for dtype in (np.float32, np.float16):
            for k in (1, 2):
                rng = np.random.default_rng(E + k)
                x = rng.integers(-2, 3, size=(37, 33)).astype(dtype)
                router = rng.integers(-2, 3, size=(33, E)).astype(dtype)
                routing = topk_moe.route(x, router, k, backend=backend)
                expected = reference.route(x.astype(np.float64), router.astype(np.float64), k, True)
                checks.expect(np.array_equal(_host(routing.experts), expected.experts),
                              f"route E={E} k={k} {np.dtype(dtype).name}: experts")

    # dispatch: dropless, a capacity that drops, capacity 0
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(7)[:2] for _ in range(300)]).astype(np.int32)
    for capacity in (None, 50, 0):
        plan = topk_moe.dispatch(experts, 7, capacity=capacity, backend=backend)
        expected = reference.dispatch(experts, 7, capacity)
        same = all(np.array_equal(_host(getattr(plan, f)), getattr(expected, f))
                   for f in ("counts", "offsets", "token", "row"))
        checks.expect(same, f"dispatch capacity={capacity}: plan")

    # permute at every access width, combine vector and scalar
    plan = topk_moe.dispatch(experts, 7, capacity=50, backend=backend)
    for dtype, D in ((np.float16, 104), (np.float16, 100), (np.float32, 33), (np.float16, 33)):
        x = np.random.default_rng(D).standard_normal((300, D)).astype(dtype)
        rows = topk_moe.permute(x, plan, backend=backend)
        checks.expect(np.array_equal(_host(rows), x[_host(plan.token)]), f"permute {np.dtype(dtype).name} D={D}")
        routing = topk_moe.Routing(experts=experts, weights=np.full((300, 2), 0.5, dtype=dtype), probs=None)
        y = topk_moe.combine(rows, routing, plan, backend=backend)
        expected = reference.combine(_host(rows).astype(np.float64), np.full((300, 2), 0.5), _host(plan.row))
        checks.expect(np.allclose(_host(y), expected, rtol=1e-2, atol=1e-2),
                      f"combine {np.dtype(dtype).name} D={D}")

    # the dense baseline and the whole layer, each activation, both expert-MLP regimes
    for activation in ("relu", "gelu", "swiglu"):
        for dtype in (np.float32, np.float16):
            for T in (3, 200):  # few rows per expert (decode) and many (grouped GEMMs)
                x, weights = _inputs(T, 40, 24, 6, dtype, T, activation)
                cfg = topk_moe.MoEConfig(40, 24, 6, 2, activation=activation, capacity_factor=1.0 if T > 3 else None)
                out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
                expected = testing.forward_with_experts(x, weights, cfg, out.routing.experts, np.float64)
                scale = float(np.abs(expected).max()) or 1.0
                error = float(np.abs(_host(out.y).astype(np.float64) - expected).max())
                checks.expect(error <= 2e-2 * scale, f"moe_forward {activation} {np.dtype(dtype).name} T={T}")
            y = topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], None if weights.w3 is None else weights.w3[0],
                                  activation=activation, backend=backend)
            expected = reference.mlp(x.astype(np.float64), weights.w1[0].astype(np.float64),
                                     weights.w2[0].astype(np.float64),
                                     None if weights.w3 is None else weights.w3[0].astype(np.float64), activation)
            scale = float(np.abs(expected).max()) or 1.0
            checks.expect(float(np.abs(_host(y) - expected).max()) <= 2e-2 * scale,
                          f"dense_mlp {activation} {np.dtype(dtype).name}")

    # empty batch, and the non-finite flag
    x, weights = _inputs(0, 40, 24, 6, np.float32, 1)
    out = topk_moe.moe_forward(x, weights, topk_moe.MoEConfig(40, 24, 6, 2), backend=backend)
    checks.expect(out.y.shape == (0, 40), "moe_forward T=0")
    x, weights = _inputs(9, 40, 24, 6, np.float32, 2)
    x[4, 7] = np.nan
    try:
        topk_moe.route(x, weights.router, 2, backend=backend)
        checks.expect(False, "route raises on NaN")
    except ValueError as error:
        checks.expect("non-finite" in str(error), "route raises on NaN")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topk_moe.cuda.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("cuda", "cuda-emulated"), default="cuda")
    backend = parser.parse_args(argv).backend
    checks = Checks()
    if backend == "cuda":
        import cupy  # noqa: PLC0415 - only the real backend needs it

        cupy.cuda.set_allocator(None)  # one cudaMalloc per array: the sanitizer sees exact bounds
        cupy.cuda.set_pinned_memory_allocator(None)
        run(checks, backend)
        cupy.cuda.Device().synchronize()
    else:
        run(checks, backend)
    print(f"smoke: {checks.failures} failed", flush=True)
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
