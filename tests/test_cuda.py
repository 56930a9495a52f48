"""The CUDA backend against the reference, stage by stage and whole.

Where a GPU is present the tests run the "cuda" backend; elsewhere they run
the same kernels, launchers and assertions on "cuda-emulated", the CPU
emulator of kernels/topk_moe/cuda/emulator (results there are CPU emulation, never GPU
results), at smaller sizes (EMULATED). Only what the emulator cannot do stays
GPU-only, skipped with the reason: CUDA graphs and streams, and the 2^31
element case (memory and time). cuBLAS has no emulation: the dense baseline's
GEMMs are NumPy under the emulator (its activation kernel is emulated). Floats
follow the one tolerance rule (`topk_moe.testing.assert_close_to_reference`):
the plain implementation is the reference's own code run in the same dtype,
float16 included, and routing is taken from the CUDA result (near-ties may
legitimately differ from float64), while routing itself is compared on
tokens with a clear margin and exactly on integer inputs, where ties are
exact. Plans must equal the reference's bit for bit.

Sizes are odd on purpose: T in {1, 7, 33, 511, 4097}, D in {33, 104} and F
in {47, 72} (none a multiple of 64; 33 takes the scalar paths, 104 the
16-byte ones), E in {2, 8, 64}. The grid is sized for about two minutes on
an H100, most of it in the NumPy references. Under the emulator T is
{1, 7, 33, 300} and the largest whole-layer case 700 tokens (about a minute
and a half on 2 cores, its builds cached): still odd, with partial router
blocks, several dispatch segments and every router layout.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

import topk_moe
from topk_moe import reference
from topk_moe.backends import cuda_unavailable_reason, emulator_unavailable_reason
from topk_moe.cuda.device import cupy_device, emulated_device
from topk_moe.testing import (assert_close_to_reference, expected_dense_mlp, forward_with_experts, plain_dense_mlp,
                             to_host)

from conftest import MARGIN, assert_plan_equal, make_inputs, make_integer_inputs, routing_margin, softmax64

GPU_REASON = cuda_unavailable_reason()
EMULATED = GPU_REASON is not None
BACKEND = "cuda-emulated" if EMULATED else "cuda"
REASON = (f"the cuda backend can't run here ({GPU_REASON}) and neither can the emulator "
          f"({emulator_unavailable_reason()})") if EMULATED and emulator_unavailable_reason() else None
DEVICE = None if REASON else (emulated_device() if EMULATED else cupy_device())
xp = None if DEVICE is None else DEVICE.xp  # CuPy, or the emulator's guarded NumPy arrays

FLOATS = (np.float32, np.float16)
ACTIVATIONS = ("relu", "gelu", "swiglu")
# The emulator runs a block's threads one after another, so its grid is smaller:
# still odd T, a partial last router block, several dispatch segments, every E layout.
T_VALUES = (1, 7, 33, 300) if EMULATED else (1, 7, 33, 511, 4097)
T_LARGE = 300 if EMULATED else 511
T_HUGE = 700 if EMULATED else 4097
T_FORCED = 150 if EMULATED else 511  # every version forced, decode included: decode at 300 rows per expert is slow
E_VALUES = (2, 8, 64)


def gpu_test(function):
    """Mark `function` gpu; it runs on the GPU, else on the emulator, else skips with the reason."""
    function = pytest.mark.gpu(function)
    return pytest.mark.skipif(REASON is not None, reason=str(REASON))(function)


def gpu_only(why):
    """Mark a test that needs a real GPU (not the emulator): skipped, with `why`, where there is none."""
    def mark(function):
        function = pytest.mark.gpu(function)
        return pytest.mark.skipif(EMULATED, reason=f"needs a real GPU: {why}; {GPU_REASON}")(function)
    return mark


@pytest.fixture(scope="module", autouse=True)
def emulator_builds():
    """On the emulator, build every variant the tests launch at once, one compiler
    per core, instead of one by one on first use (a cold cache costs ~7 s each)."""
    if EMULATED and REASON is None:
        from topk_moe.cuda import expert_mlp, launch_config
        from topk_moe.cuda.emulator import loader

        builds = [("router.cu", launch_config.router_defines(E)) for E in E_VALUES + (5, 33, 1024)]
        builds += [("dispatch.cu", launch_config.dispatch_defines()), ("combine.cu", {}), ("activation.cu", {})]
        builds += [("expert_mlp.cu", expert_mlp.launch_defines(activation, vector))
                   for activation in ACTIVATIONS for vector in (True, False)]
        loader.prebuild(builds)


def name_of(dtype) -> str:
    return np.dtype(dtype).name


def weights_as(weights, dtype):
    cast = lambda a: None if a is None else np.asarray(a, dtype=dtype)  # noqa: E731
    return topk_moe.MoEWeights(cast(weights.router), cast(weights.w1), cast(weights.w2), cast(weights.w3))


def host_plan(plan):
    return topk_moe.DispatchPlan(*(to_host(getattr(plan, f)) for f in ("counts", "offsets", "token", "row")))


def experts_with_load(T, E, K, load, seed):
    """(T, K) int32 experts, distinct per token, with a named load pattern:
    random; skewed (three quarters of first choices to expert 0); empty (odd
    experts never chosen, when E > 2 K); one-hot (every token: E-1, then 0)."""
    rng = np.random.default_rng(seed)
    if T == 0:
        return np.zeros((0, K), dtype=np.int32)
    if load == "one-hot":
        return np.tile(np.array([E - 1, 0][:K], dtype=np.int32), (T, 1))
    pool = np.arange(0, E, 2) if load == "empty" and E > 2 * K else np.arange(E)
    experts = np.stack([rng.permutation(pool)[:K] for _ in range(T)])
    if load == "skewed":
        first = np.where(rng.random(T) < 0.75, 0, experts[:, 0])
        if K == 1:
            return first[:, None].astype(np.int32)
        # a second choice distinct from the first: experts[:, 1] unless it is the first
        second = np.where(experts[:, 1] != first, experts[:, 1], experts[:, 0])
        return np.stack([first, second], axis=1).astype(np.int32)
    return experts.astype(np.int32)


# ---------------------------------------------------------------------------
# the API around the cuda backend (runs everywhere)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_check_finite_false_is_only_for_cuda(backend):
    x, weights, cfg = make_inputs(5, 4, 3, 3, 2, activation="relu")
    with pytest.raises(ValueError, match="check_finite"):
        topk_moe.route(x, weights.router, 2, backend=backend, check_finite=False)
    with pytest.raises(ValueError, match="check_finite"):
        topk_moe.moe_forward(x, weights, cfg, backend=backend, check_finite=False)
    with pytest.raises(TypeError, match="check_finite"):
        topk_moe.route(x, weights.router, 2, backend=backend, check_finite="no")
    # the default keeps every backend's own check
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.route(x, weights.router, 2, backend=backend, check_finite=True)


def test_cuda_availability_is_reported_with_a_reason():
    reason = cuda_unavailable_reason()
    assert ("cuda" in topk_moe.available_backends()) == (reason is None)
    if reason is not None:
        with pytest.raises(ValueError, match="'cuda' is not available here"):
            topk_moe.route(np.zeros((1, 2)), np.zeros((2, 2)), 1, backend="cuda")
    assert ("cuda-emulated" in topk_moe.available_backends()) == (emulator_unavailable_reason() is None)


# ---------------------------------------------------------------------------
# route


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("T", T_VALUES)
def test_route_matches_reference(T, E, k, dtype):
    D = 104 if T % 2 else 33
    renormalize = (T + k) % 2 == 0
    x, weights, _ = make_inputs(T, D, 8, E, k, dtype=dtype, seed=T + E)
    routing = topk_moe.route(x, weights.router, k, renormalize=renormalize, backend=BACKEND)
    experts, got_weights, probs = (to_host(a) for a in (routing.experts, routing.weights, routing.probs))
    assert experts.dtype == np.int32 and experts.shape == (T, k)
    assert got_weights.dtype == np.dtype(dtype) and got_weights.shape == (T, k)
    assert probs.dtype == np.dtype(dtype) and probs.shape == (T, E)

    logits = x.astype(np.float64) @ weights.router.astype(np.float64)
    expected = reference.route(x.astype(np.float64), weights.router.astype(np.float64), k, renormalize)
    plain = reference.route(x, weights.router, k, renormalize)  # the reference's code in dtype
    clear = routing_margin(logits, k) > MARGIN
    np.testing.assert_array_equal(experts[clear], expected.experts[clear])
    if T >= 33:
        assert clear.mean() > 0.5
    assert ((experts >= 0) & (experts < E)).all()
    if k == 2:
        assert (experts[:, 0] != experts[:, 1]).all()

    assert_close_to_reference(probs, expected.probs, plain.probs, name="probs", dtype=dtype)
    # weights for the experts the kernel chose, in float64 and in the plain dtype
    chosen = experts.astype(np.int64)
    weights64 = np.take_along_axis(softmax64(logits), chosen, axis=1)
    weights_plain = np.take_along_axis(plain.probs, chosen, axis=1)
    if renormalize:
        weights64 = weights64 / weights64.sum(axis=1, keepdims=True)
        weights_plain = weights_plain / weights_plain.sum(axis=1, keepdims=True)
    assert_close_to_reference(got_weights, weights64, weights_plain, name="weights", dtype=dtype)
    if not renormalize:  # a weight is its prob, bit for bit
        np.testing.assert_array_equal(got_weights, np.take_along_axis(probs, chosen, axis=1))
    elif k == 1:
        np.testing.assert_array_equal(got_weights, np.ones((T, 1), dtype=dtype))


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("T", [7, T_LARGE])
def test_route_exact_ties_go_to_the_smaller_index(T, E, k, dtype):
    # integers in {-1, 0, 1}: logits are exact in any order and dtype, ties everywhere
    x, router = make_integer_inputs(T, 33, E, dtype=dtype, seed=T * E + k, low=-1, high=2)
    routing = topk_moe.route(x, router, k, backend=BACKEND)
    expected = reference.route(x.astype(np.float64), router.astype(np.float64), k, True)
    np.testing.assert_array_equal(to_host(routing.experts), expected.experts)


@gpu_test
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", E_VALUES + (5, 33, 1024))
def test_route_all_equal_logits(E, k):
    x = np.zeros((3, 7), dtype=np.float32)
    routing = topk_moe.route(x, np.ones((7, E), dtype=np.float32), k, renormalize=False, backend=BACKEND)
    np.testing.assert_array_equal(to_host(routing.experts), np.tile(np.arange(k), (3, 1)))
    np.testing.assert_allclose(to_host(routing.probs), np.full((3, E), 1 / E), rtol=1e-6)


@gpu_test
def test_route_empty_batch():
    routing = topk_moe.route(np.zeros((0, 9), np.float16), np.ones((9, 8), np.float16), 2, backend=BACKEND)
    assert routing.experts.shape == (0, 2) and routing.weights.shape == (0, 2) and routing.probs.shape == (0, 8)
    assert routing.experts.dtype == np.int32 and routing.probs.dtype == np.float16


# ---------------------------------------------------------------------------
# dispatch


def capacity_for(case, T, K, E):
    if case is None or isinstance(case, int):
        return case
    return math.ceil(case * T * K / E)  # a capacity factor


@gpu_test
@pytest.mark.parametrize("capacity", [None, 0, 1.0, 1.25], ids=lambda c: f"capacity={c}")
@pytest.mark.parametrize("load", ["random", "skewed", "empty", "one-hot"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", E_VALUES)
@pytest.mark.parametrize("T", T_VALUES)
def test_dispatch_plan_equals_reference(T, E, k, load, capacity):
    experts = experts_with_load(T, E, k, load, seed=T + 10 * E + k)
    C = capacity_for(capacity, T, k, E)
    plan = topk_moe.dispatch(experts, E, capacity=C, backend=BACKEND)
    for name in ("counts", "offsets", "token", "row"):
        assert isinstance(getattr(plan, name), xp.ndarray), name
    assert_plan_equal(host_plan(plan), reference.dispatch(experts.astype(np.int64), E, C))


@gpu_test
@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.int64])
def test_dispatch_takes_any_integer_dtype_on_host_or_device(dtype):
    experts = experts_with_load(300, 8, 2, "random", seed=1).astype(dtype)
    expected = reference.dispatch(experts.astype(np.int64), 8, 40)
    for given in (experts, xp.asarray(experts)):
        assert_plan_equal(host_plan(topk_moe.dispatch(given, 8, capacity=40, backend=BACKEND)), expected)


@gpu_test
def test_dispatch_checks_expert_range_on_device_input():
    with pytest.raises(ValueError, match="experts"):
        topk_moe.dispatch(xp.asarray(np.array([[0], [9]], np.int32)), 8, backend=BACKEND)


@gpu_only("stream capture")
@pytest.mark.parametrize("capacity", [None, 2 * 4097], ids=["dropless", "capacity>=T*K"])
def test_dispatch_without_drops_never_waits_for_the_device(capacity):
    cupy = importlib.import_module("cupy")
    # stream capture fails on any synchronisation, so capturing proves there is none
    experts = cupy.asarray(experts_with_load(4097, 64, 2, "skewed", seed=3))
    backend = topk_moe.backends.resolve("cuda")
    backend.dispatch(experts, 64, capacity)  # compile and load outside the capture
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        plan = backend.dispatch(experts, 64, capacity)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    assert_plan_equal(host_plan(plan), reference.dispatch(to_host(experts).astype(np.int64), 64, capacity))


# ---------------------------------------------------------------------------
# permute and combine


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("D", [1, 33, 100, 104])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_permute_gathers_rows_bitwise(dtype, D, offset):
    T, E, K = T_LARGE, 8, 2
    x_host = np.random.default_rng(D).standard_normal((T, D)).astype(dtype)
    # offset 1: a contiguous view that starts one element into its buffer, so
    # the only access width that fits is a single element
    x = xp.empty(T * D + offset, dtype=dtype)[offset:].reshape(T, D)
    x[...] = xp.asarray(x_host)
    plan = topk_moe.dispatch(experts_with_load(T, E, K, "skewed", seed=D), E, capacity=100, backend=BACKEND)
    rows = topk_moe.permute(x, plan, backend=BACKEND)
    assert rows.dtype == np.dtype(dtype) and rows.shape == (plan.n_kept, D)
    np.testing.assert_array_equal(to_host(rows), x_host[to_host(plan.token)])


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("D", [33, 104])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("T", T_VALUES)
def test_combine_matches_reference(T, k, D, dtype):
    E = 8
    rng = np.random.default_rng(T + D + k)
    experts = experts_with_load(T, E, k, "skewed", seed=T)
    C = capacity_for(1.0, T, k, E)  # drops on the hot expert
    plan = topk_moe.dispatch(experts, E, capacity=C, backend=BACKEND)
    expert_out = rng.standard_normal((plan.n_kept, D)).astype(dtype)
    route_weights = rng.random((T, k)).astype(dtype)
    routing = topk_moe.Routing(experts=experts, weights=route_weights, probs=None)
    y = to_host(topk_moe.combine(expert_out, routing, plan, backend=BACKEND))
    assert y.dtype == np.dtype(dtype) and y.shape == (T, D)
    row = to_host(plan.row)
    expected = reference.combine(expert_out.astype(np.float64), route_weights.astype(np.float64), row)
    plain = reference.combine(expert_out, route_weights, row)
    assert_close_to_reference(y, expected, plain, name="combine", dtype=dtype)
    dropped = (row < 0).all(axis=1)
    np.testing.assert_array_equal(y[dropped], 0)


# ---------------------------------------------------------------------------
# expert MLPs and the dense baseline


def expert_mlp_expected_and_plain(rows, offsets, weights, activation):
    """The reference's expert MLPs in float64 (expected) and in rows' dtype (plain)."""
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    expected = reference.expert_mlp(rows.astype(np.float64), offsets, as64(weights.w1), as64(weights.w2),
                                    as64(weights.w3), activation)
    plain = reference.expert_mlp(rows, offsets, weights.w1, weights.w2, weights.w3, activation)
    return expected, plain


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T, E, load", [(7, 8, "one-hot"), (T_LARGE, 8, "empty"), (T_LARGE, 64, "skewed")])
def test_expert_mlp_matches_reference(T, E, load, activation, dtype):
    D, F, K = 104, 72, 2
    _, weights, _ = make_inputs(0, D, F, E, K, activation=activation, dtype=dtype, seed=E)
    plan = topk_moe.dispatch(experts_with_load(T, E, K, load, seed=T), E, backend=BACKEND)
    rows = np.random.default_rng(T).standard_normal((plan.n_kept, D)).astype(dtype)
    out = to_host(topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                                     activation=activation, backend=BACKEND))
    assert out.dtype == np.dtype(dtype) and out.shape == rows.shape
    expected, plain = expert_mlp_expected_and_plain(rows, to_host(plan.offsets), weights, activation)
    assert_close_to_reference(out, expected, plain, name=f"expert_mlp {activation}", dtype=dtype)


EXPERT_MLP_VERSION_CASES = [  # (version, dtype) pairs each version takes
    ("v1", np.float32), ("v1", np.float16), ("v2", np.float32), ("v3", np.float16),
    ("decode", np.float32), ("decode", np.float16),
]


@gpu_test
@pytest.mark.parametrize("version, dtype", EXPERT_MLP_VERSION_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T, E, D, F", [(3, 8, 104, 72), (129, 8, 33, 47), (T_FORCED, 2, 104, 200)])
def test_every_expert_mlp_version_matches_reference(T, E, D, F, activation, version, dtype):
    """The default rule picks one version per size (choose_version), so each
    version is forced here at decode-sized and GEMM-sized batches alike."""
    from topk_moe.cuda.expert_mlp import grouped_mlp

    K = 2
    _, weights, _ = make_inputs(0, D, F, E, K, activation=activation, dtype=dtype, seed=E + T)
    plan = topk_moe.dispatch(experts_with_load(T, E, K, "random", seed=T), E, backend=BACKEND)
    rows = np.random.default_rng(T).standard_normal((plan.n_kept, D)).astype(dtype)
    device = lambda a: None if a is None else xp.asarray(a)  # noqa: E731
    out = to_host(grouped_mlp(xp.asarray(rows), plan.offsets, device(weights.w1), device(weights.w2),
                              device(weights.w3), activation, version=version, device=DEVICE))
    expected, plain = expert_mlp_expected_and_plain(rows, to_host(plan.offsets), weights, activation)
    assert_close_to_reference(out, expected, plain, name=f"expert_mlp {version} {activation}", dtype=dtype)


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T, D, F", [(1, 104, 72), (33, 33, 47), (T_LARGE, 104, 72)])
def test_dense_mlp_matches_reference(T, D, F, activation, dtype):
    _, weights, _ = make_inputs(0, D, F, 1, 1, activation=activation, dtype=dtype, seed=T)
    x = np.random.default_rng(T).standard_normal((T, D)).astype(dtype)
    w3 = None if weights.w3 is None else weights.w3[0]
    y = to_host(topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation=activation, backend=BACKEND))
    assert y.dtype == np.dtype(dtype) and y.shape == (T, D)
    expected = expected_dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation)
    plain = plain_dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation)
    assert_close_to_reference(y, expected, plain, name=f"dense_mlp {activation}", dtype=dtype)


# ---------------------------------------------------------------------------
# the whole layer


MOE_SIZES = [  # (T, E, D, F, capacity_factor)
    (1, 64, 104, 72, 1.0),
    (7, 2, 33, 47, None),
    (T_LARGE, 8, 104, 72, 1.25),
    (T_HUGE, 64, 33, 47, None),
]


@gpu_test
@pytest.mark.parametrize("size", MOE_SIZES, ids=lambda s: "T{}-E{}-D{}-F{}-cf{}".format(*s))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
def test_moe_forward_matches_reference(size, k, activation, dtype):
    T, E, D, F, capacity_factor = size
    x, weights, cfg = make_inputs(T, D, F, E, k, activation=activation, dtype=dtype, seed=T + E + k,
                                  capacity_factor=capacity_factor, renormalize=(T + k) % 2 == 1)
    out = topk_moe.moe_forward(x, weights, cfg, backend=BACKEND)
    y = to_host(out.y)
    assert y.dtype == np.dtype(dtype) and y.shape == (T, D)

    # the routing is route()'s, bit for bit, and the plan the reference's for those experts
    routing = topk_moe.route(x, weights.router, k, renormalize=cfg.renormalize, backend=BACKEND)
    for name in ("experts", "weights", "probs"):
        np.testing.assert_array_equal(to_host(getattr(out.routing, name)), to_host(getattr(routing, name)))
    experts = to_host(out.routing.experts)
    C = topk_moe.capacity(cfg, T)
    assert_plan_equal(host_plan(out.plan), reference.dispatch(experts.astype(np.int64), E, C))

    expected = forward_with_experts(x, weights, cfg, experts, np.float64)
    plain = forward_with_experts(x, weights, cfg, experts, dtype)
    assert_close_to_reference(y, expected, plain, name=f"moe_forward {activation}", dtype=dtype)

    # and the routing is the float64 reference's wherever it is not a near tie
    logits = x.astype(np.float64) @ weights.router.astype(np.float64)
    clear = routing_margin(logits, k) > MARGIN
    reference_experts = reference.route(x.astype(np.float64), weights.router.astype(np.float64), k, True).experts
    np.testing.assert_array_equal(experts[clear], reference_experts[clear])


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("k", [1, 2])
def test_all_dropped_token_gets_exactly_zero(dtype, k):
    # every token prefers expert 0, then 1; capacity 1 keeps token 0 only
    D, E = 2, 2
    x = np.array([[1.0, 0.5], [2.0, -1.0], [0.5, 3.0], [1.5, 1.5]], dtype=dtype)
    router = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=dtype)
    cfg = topk_moe.MoEConfig(D, 3, E, k, activation="relu", capacity_factor=0.5 if k == 1 else 0.25)
    assert topk_moe.capacity(cfg, len(x)) == 1
    out = topk_moe.moe_forward(x, topk_moe.MoEWeights(router, np.ones((E, D, 3), dtype), np.ones((E, 3, D), dtype)),
                              cfg, backend=BACKEND)
    np.testing.assert_array_equal(to_host(out.plan.row)[1:], -1)
    np.testing.assert_array_equal(to_host(out.y)[1:], 0)
    assert (to_host(out.y)[0] != 0).all()


@gpu_test
def test_moe_forward_empty_batch():
    x, weights, cfg = make_inputs(0, 33, 47, 8, 2, dtype=np.float16, capacity_factor=1.0)
    out = topk_moe.moe_forward(x, weights, cfg, backend=BACKEND)
    assert out.y.shape == (0, 33) and out.y.dtype == np.float16
    assert out.plan.token.shape == (0,) and to_host(out.plan.offsets).tolist() == [0] * 9


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
def test_repeated_runs_are_bitwise_identical(dtype):
    x, weights, cfg = make_inputs(T_LARGE, 104, 72, 8, 2, dtype=dtype, seed=5, capacity_factor=1.25)
    x, weights = xp.asarray(x), topk_moe.MoEWeights(*(xp.asarray(a) for a in (weights.router, weights.w1,
                                                                               weights.w2, weights.w3)))
    runs = [topk_moe.moe_forward(x, weights, cfg, backend=BACKEND) for _ in range(3)]
    first = runs[0]
    for other in runs[1:]:
        np.testing.assert_array_equal(to_host(other.y).view(np.uint8), to_host(first.y).view(np.uint8))
        for name in ("experts", "weights", "probs"):
            np.testing.assert_array_equal(to_host(getattr(other.routing, name)),
                                          to_host(getattr(first.routing, name)))
        assert_plan_equal(host_plan(other.plan), host_plan(first.plan))


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
def test_batch_invariance(dtype):
    """A token's bits don't depend on the other tokens of its batch (dropless,
    so no token can take another's capacity). Both batches are large enough
    for the same expert-MLP version, whose per-row summation order is fixed."""
    T, D, F, E, K = 640, 104, 72, 8, 2
    x, weights, cfg = make_inputs(T, D, F, E, K, dtype=dtype, seed=9)
    subset = np.random.default_rng(0).permutation(T)[:320]  # other neighbours, another order
    whole = topk_moe.moe_forward(x, weights, cfg, backend=BACKEND)
    part = topk_moe.moe_forward(np.ascontiguousarray(x[subset]), weights, cfg, backend=BACKEND)
    for name in ("experts", "weights", "probs"):
        np.testing.assert_array_equal(to_host(getattr(part.routing, name)),
                                      to_host(getattr(whole.routing, name))[subset], err_msg=name)
    np.testing.assert_array_equal(to_host(part.y).view(np.uint8), to_host(whole.y)[subset].view(np.uint8))


@gpu_only("CUDA graphs")
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
def test_dropless_moe_forward_in_a_cuda_graph(dtype):
    """With check_finite=False a dropless layer never waits for the device under
    capture, so the whole of moe_forward can be captured once and replayed."""
    cupy = importlib.import_module("cupy")
    T, D, F, E, K = 257, 104, 72, 8, 2
    x_host, weights, cfg = make_inputs(T, D, F, E, K, dtype=dtype, seed=13)
    x = cupy.asarray(x_host)
    weights = topk_moe.MoEWeights(*(cupy.asarray(a) for a in (weights.router, weights.w1, weights.w2, weights.w3)))
    eager = to_host(topk_moe.moe_forward(x, weights, cfg, backend=BACKEND, check_finite=False).y)
    next_x_host = np.random.default_rng(14).standard_normal((T, D)).astype(dtype)
    next_eager = to_host(topk_moe.moe_forward(cupy.asarray(next_x_host), weights, cfg, backend=BACKEND).y)

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        captured = topk_moe.moe_forward(x, weights, cfg, backend=BACKEND, check_finite=False)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(to_host(captured.y).view(np.uint8), eager.view(np.uint8))
    # the graph reads x's memory: new values in place, one more replay
    x.set(next_x_host)
    cupy.cuda.Device().synchronize()
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(to_host(captured.y).view(np.uint8), next_eager.view(np.uint8))


@gpu_only("2^31-element arrays (4.4 GB each) are beyond the emulator's time and memory")
@pytest.mark.slow
def test_64_bit_indexing_past_two_to_the_31_elements():
    """permute, combine and the router on float16 arrays of N * D > 2**31
    elements (4.4 GB each): a 32-bit row * width product would wrap for every
    row past 2**31 / D = 262144. Checked whole, in chunks smaller than 2**31."""
    cupy = importlib.import_module("cupy")
    D = 8192
    T = 2**31 // D + 4097  # 266241 tokens, 2.18e9 elements
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 24 * 2**30:
        pytest.skip(f"needs about 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    rng = np.random.default_rng(0)
    chunk = 2**17  # rows per CuPy operation: 2**30 elements, so no CuPy call needs 64-bit indexing
    x = cupy.empty((T, D), dtype=cupy.float16)
    column = cupy.asarray(rng.standard_normal(D).astype(np.float16))[None, :]
    token_shift = cupy.asarray(rng.standard_normal(T).astype(np.float16))[:, None]
    for start in range(0, T, chunk):  # every row different: x[t] = column + shift[t]
        cupy.add(column, token_shift[start:start + chunk], out=x[start:start + chunk])
    experts = (cupy.arange(T, dtype=cupy.int32) % 2)[:, None]  # expert 0: even tokens, 1: odd
    plan = topk_moe.dispatch(experts, 2, backend=BACKEND)
    rows = topk_moe.permute(x, plan, backend=BACKEND)
    for parity, block in ((0, rows[:(T + 1) // 2]), (1, rows[(T + 1) // 2:])):
        source = x[parity::2]  # rows of expert 0 are the even tokens in order, then expert 1's odd ones
        assert block.shape == source.shape
        for start in range(0, block.shape[0], chunk):
            assert bool(cupy.array_equal(block[start:start + chunk], source[start:start + chunk])), \
                f"permute: expert {parity}, rows {start}:{start + chunk}"
    ones = topk_moe.Routing(experts=experts, weights=cupy.ones((T, 1), cupy.float16), probs=None)
    y = topk_moe.combine(rows, ones, plan, backend=BACKEND)  # weight 1: y == x exactly
    del rows
    for start in range(0, T, chunk):
        assert bool(cupy.array_equal(y[start:start + chunk], x[start:start + chunk])), f"combine {start}"
    del y
    router = cupy.asarray((rng.standard_normal((D, 8)) / math.sqrt(D)).astype(np.float16))
    whole = topk_moe.route(x, router, 2, backend=BACKEND)
    last = topk_moe.route(x[-64:], router, 2, backend=BACKEND)  # the same tokens alone
    np.testing.assert_array_equal(to_host(whole.probs)[-64:], to_host(last.probs))
    np.testing.assert_array_equal(to_host(whole.experts)[-64:], to_host(last.experts))


# ---------------------------------------------------------------------------
# non-finite input


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(dtype, bad):
    x, weights, cfg = make_inputs(33, 33, 47, 8, 2, dtype=dtype, seed=2)
    x_bad = x.copy()
    x_bad[17, 5] = bad
    router_bad = weights.router.copy()
    router_bad[3, 6] = bad
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.route(x_bad, weights.router, 2, backend=BACKEND)
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.route(x, router_bad, 2, backend=BACKEND)
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.moe_forward(x_bad, weights, cfg, backend=BACKEND)
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.route(x[:0], router_bad, 2, backend=BACKEND)  # no token reads the router: checked apart
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.dense_mlp(x_bad, weights.w1[0], weights.w2[0], weights.w3[0], activation="swiglu", backend=BACKEND)
    # skipping the check returns, with valid expert indices all the same
    routing = topk_moe.route(x_bad, weights.router, 2, backend=BACKEND, check_finite=False)
    experts = to_host(routing.experts)
    assert ((experts >= 0) & (experts < 8)).all() and (experts[:, 0] != experts[:, 1]).all()


# ---------------------------------------------------------------------------
# the emulator's own guarantees (CPU emulation only)


def emulator_only(function):
    return pytest.mark.skipif(not EMULATED or REASON is not None,
                              reason="checks the CPU emulator's schedules and launch log; a GPU runs the kernels")(function)


@emulator_only
@pytest.mark.parametrize("dtype", FLOATS, ids=name_of)
@pytest.mark.parametrize("version", ["decode", "grouped"])
def test_emulated_results_are_bitwise_equal_under_every_schedule(version, dtype):
    """Fibers in other orders, a warp running ahead to its next barrier, cp.async
    landing at issue instead of at the wait: a race or a missing wait would
    change bits between schedules."""
    from topk_moe.cuda.emulator import loader

    T = 3 if version == "decode" else 150
    x, weights, cfg = make_inputs(T, 104, 72, 8, 2, dtype=dtype, seed=21, capacity_factor=1.25)

    def bits():
        out = topk_moe.moe_forward(x, weights, cfg, backend=BACKEND)
        return [to_host(a).view(np.uint8) for a in (out.y, out.routing.weights, out.routing.probs, out.plan.row)]

    first = bits()
    for order, copy_async in (("descending", "eager"), ("shuffled", "late"), ("warp-by-warp", "eager")):
        with loader.schedule(order, seed=7, copy_async=copy_async):
            for got, want in zip(bits(), first):
                np.testing.assert_array_equal(got, want, err_msg=f"{order}, cp.async {copy_async}")


@emulator_only
def test_every_kernel_of_the_sources_was_launched():
    """Every extern "C" __global__ kernel of kernels/topk_moe/cuda/*.cu ran at least once
    in the tests above (the emulator's launch log, this process)."""
    from topk_moe.cuda import build_report
    from topk_moe.cuda.emulator import loader

    defined = build_report.source_kernels()
    launched = set(loader.LAUNCHES)
    if len(launched) < len(defined) // 2:
        pytest.skip("run the whole of tests/test_cuda.py: this test reads the launches of the tests before it")
    assert defined - launched == set(), f"never launched: {sorted(defined - launched)}"
