"""The contract (design/contract.md), rule by rule, on every backend.

Float comparisons use the one tolerance rule, `topk_moe.testing.
assert_close_to_reference`: at most twice the error of a plain NumPy
implementation in the same dtype, both measured against float64, plus a floor
of a few ulps. Against the contract's formulas, `expected` and `plain` come
from conftest's own formulas (long double, and the result's dtype), never from
kernels' code; cpu-versus-reference comparisons use topk_moe.testing's plain
implementations, as the rule prescribes. Where inputs are integer-valued the
results are exact in any order and the tests ask for exact equality.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

import topk_moe
from topk_moe.testing import (assert_close_to_reference, expected_dense_mlp, plain_dense_mlp,
                             plain_moe_forward)

from conftest import (
    EXACT,
    MARGIN,
    assert_plan_equal,
    assert_plan_invariants,
    expert64,
    field_names,
    make_inputs,
    make_integer_inputs,
    make_weights_arrays,
    reference_from_routing,
    routing_margin,
    softmax64,
    softmax_in,
    spec_expert,
    spec_moe,
    spec_moe64,
    spec_plan,
    spec_route_choices,
)

FLOATS = (np.float32, np.float64)
ACTIVATIONS = ("relu", "gelu", "swiglu")


def result_dtype(backend, input_dtype):
    """reference: float64 whatever came; cpu: the input's dtype."""
    return np.dtype(np.float64) if backend == "reference" else np.dtype(input_dtype)


def weights_as(weights, dtype):
    cast = lambda a: None if a is None else np.asarray(a, dtype=dtype)
    return topk_moe.MoEWeights(router=cast(weights.router), w1=cast(weights.w1),
                              w2=cast(weights.w2), w3=cast(weights.w3))


def plain_forward_for(actual, x, weights, cfg, routing):
    """The plain NumPy forward in the dtype of `actual`, for the tolerance rule."""
    return plain_moe_forward(np.asarray(x, dtype=actual.dtype), weights_as(weights, actual.dtype),
                             cfg, routing)


# ---------------------------------------------------------------------------
# Names


def test_public_names_exist():
    for name in ("MoEConfig", "MoEWeights", "init_weights", "route", "dispatch", "moe_forward",
                 "dense_mlp", "capacity", "available_backends", "permute", "expert_mlp",
                 "combine"):
        assert callable(getattr(topk_moe, name)), name


def test_result_field_names(backend):
    x, weights, cfg = make_inputs(5, 4, 3, 3, 2, activation="relu")
    routing = topk_moe.route(x, weights.router, 2, backend=backend)
    plan = topk_moe.dispatch(routing.experts, 3, backend=backend)
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    assert field_names(routing)[:3] == ("experts", "weights", "probs")
    assert field_names(plan)[:4] == ("counts", "offsets", "token", "row")
    assert field_names(out)[:3] == ("y", "routing", "plan")


def test_results_and_weights_are_frozen(backend):
    x, weights, cfg = make_inputs(5, 4, 3, 3, 2, activation="relu")
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    for obj, field in ((out, "y"), (out.routing, "experts"), (out.plan, "row"),
                       (weights, "router")):
        with pytest.raises(AttributeError):
            setattr(obj, field, None)
    assert field_names(weights)[:4] == ("router", "w1", "w2", "w3")
    assert topk_moe.MoEWeights(weights.router, weights.w1, weights.w2).w3 is None


def test_config_defaults():
    cfg = topk_moe.MoEConfig(8, 16, 4, 2)
    assert (cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k) == (8, 16, 4, 2)
    assert cfg.activation == "swiglu"
    assert cfg.renormalize is True
    assert cfg.capacity_factor is None


def test_available_backends():
    names = topk_moe.available_backends()
    assert isinstance(names, tuple)
    assert "reference" in names and "cpu" in names
    assert all(isinstance(n, str) for n in names)


def test_cuda_listed_only_where_usable():
    names = topk_moe.available_backends()
    if importlib.util.find_spec("cupy") is None:
        assert "cuda" not in names
    if "cuda" not in names:
        x, weights, cfg = make_inputs(4, 4, 3, 3, 1, activation="relu", dtype=np.float32)
        with pytest.raises(ValueError, match="backend"):
            topk_moe.moe_forward(x, weights, cfg, backend="cuda")


def test_import_does_not_import_cupy():
    code = "import topk_moe, sys; assert 'cupy' not in sys.modules, 'kernels imported cupy'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_default_backend_is_cpu(no_backend_env):
    x, weights, cfg = make_inputs(6, 4, 3, 3, 1, activation="relu", dtype=np.float32)
    # cpu keeps float32; reference would return float64
    assert topk_moe.moe_forward(x, weights, cfg).y.dtype == np.float32
    assert topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0]).dtype == np.float32


@pytest.mark.parametrize("env, dtype", [("reference", np.float64), ("cpu", np.float32)])
def test_moe_backend_env_selects_default(monkeypatch, env, dtype):
    monkeypatch.setenv("MOE_BACKEND", env)
    x, weights, cfg = make_inputs(6, 4, 3, 3, 1, activation="relu", dtype=np.float32)
    assert topk_moe.moe_forward(x, weights, cfg).y.dtype == dtype
    assert topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0]).dtype == dtype
    assert topk_moe.route(x, weights.router, 1).probs.dtype == dtype


def test_explicit_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("MOE_BACKEND", "reference")
    x, weights, cfg = make_inputs(6, 4, 3, 3, 1, activation="relu", dtype=np.float32)
    assert topk_moe.moe_forward(x, weights, cfg, backend="cpu").y.dtype == np.float32


def test_unknown_moe_backend_env_raises(monkeypatch):
    monkeypatch.setenv("MOE_BACKEND", "no-such-backend")
    x, weights, cfg = make_inputs(6, 4, 3, 3, 1, activation="relu")
    with pytest.raises(ValueError, match="backend"):
        topk_moe.moe_forward(x, weights, cfg)


# ---------------------------------------------------------------------------
# route


# Logits are set directly: x @ I with D = E = 4 is exact in any dtype.
TIE_CASES = [
    # logits            top-1   top-2
    ([1, 3, 3, 0],      [1],    [1, 2]),
    ([2, 2, 2, 2],      [0],    [0, 1]),
    ([0, 5, 5, 5],      [1],    [1, 2]),
    ([5, 0, 5, 5],      [0],    [0, 2]),
    ([-1, -1, 4, -1],   [2],    [2, 0]),
    ([0, 0, 0, 7],      [3],    [3, 0]),
    ([3, 2, 1, 0],      [0],    [0, 1]),
    ([0, 1, 2, 3],      [3],    [3, 2]),
    ([1, 2, 1, 2],      [1],    [1, 3]),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
def test_route_descending_ties_to_smaller_index(backend, dtype, k):
    x = np.array([c[0] for c in TIE_CASES], dtype=dtype)
    router = np.eye(4, dtype=dtype)
    routing = topk_moe.route(x, router, k, backend=backend)
    expected = np.array([c[1] if k == 1 else c[2] for c in TIE_CASES])
    assert routing.experts.dtype == np.int32
    np.testing.assert_array_equal(routing.experts, expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", [2, 5, 8])
def test_route_matches_spec_on_integer_inputs(backend, dtype, k, E):
    # small integers: many exact ties, and logits exact in any summation order
    x, router = make_integer_inputs(64, 6, E, dtype=dtype, seed=E + 10 * k, low=-1, high=2)
    routing = topk_moe.route(x, router, k, backend=backend)
    expected = spec_route_choices(x.astype(np.float64) @ router.astype(np.float64), k)
    np.testing.assert_array_equal(routing.experts, expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
def test_route_matches_spec_away_from_near_ties(backend, dtype, k):
    x, weights, _ = make_inputs(300, 16, 4, 7, k, dtype=dtype, seed=3)
    logits = x.astype(np.float64) @ weights.router.astype(np.float64)
    routing = topk_moe.route(x, weights.router, k, backend=backend)
    clear = routing_margin(logits, k) > MARGIN
    assert clear.sum() > 250  # the comparison must cover most tokens
    np.testing.assert_array_equal(routing.experts[clear], spec_route_choices(logits, k)[clear])


def test_route_cpu_matches_reference_away_from_near_ties():
    for dtype in FLOATS:
        for k in (1, 2):
            x, weights, _ = make_inputs(300, 16, 4, 7, k, dtype=dtype, seed=5)
            ref = topk_moe.route(x, weights.router, k, backend="reference")
            cpu = topk_moe.route(x, weights.router, k, backend="cpu")
            logits = x.astype(np.float64) @ weights.router.astype(np.float64)
            clear = routing_margin(logits, k) > MARGIN
            np.testing.assert_array_equal(cpu.experts[clear], ref.experts[clear])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_probs_are_softmax(backend, dtype, k, renormalize):
    x, router = make_integer_inputs(40, 5, 6, dtype=dtype, seed=7)
    logits = x.astype(np.float64) @ router.astype(np.float64)  # exact
    routing = topk_moe.route(x, router, k, renormalize=renormalize, backend=backend)
    probs = routing.probs
    assert probs.shape == (40, 6)
    assert probs.dtype == result_dtype(backend, dtype)
    plain = softmax_in(logits, probs.dtype)
    assert_close_to_reference(probs, softmax64(logits), plain, name="probs")
    # every row sums to one
    assert_close_to_reference(probs.sum(axis=1), np.ones(40), plain.sum(axis=1), name="probs row sums")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
def test_route_weights_without_renormalize_are_probs(backend, dtype, k):
    x, weights, _ = make_inputs(50, 8, 4, 5, k, dtype=dtype, seed=11)
    routing = topk_moe.route(x, weights.router, k, renormalize=False, backend=backend)
    assert routing.weights.shape == (50, k)
    assert routing.weights.dtype == result_dtype(backend, dtype)
    gathered = np.take_along_axis(routing.probs, routing.experts.astype(np.int64), axis=1)
    np.testing.assert_array_equal(routing.weights, gathered)


@pytest.mark.parametrize("dtype", FLOATS)
def test_route_k1_renormalized_weight_is_exactly_one(backend, dtype):
    x, weights, _ = make_inputs(50, 8, 4, 5, 1, dtype=dtype, seed=13)
    routing = topk_moe.route(x, weights.router, 1, renormalize=True, backend=backend)
    assert routing.weights.shape == (50, 1)
    np.testing.assert_array_equal(routing.weights, np.ones((50, 1)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_route_k2_renormalized_weights(backend, dtype):
    x, router = make_integer_inputs(60, 5, 6, dtype=dtype, seed=17)
    logits = x.astype(np.float64) @ router.astype(np.float64)
    routing = topk_moe.route(x, router, 2, renormalize=True, backend=backend)
    chosen = spec_route_choices(logits, 2)
    np.testing.assert_array_equal(routing.experts, chosen)
    g64 = np.take_along_axis(softmax64(logits), chosen, axis=1)
    out_dtype = routing.weights.dtype
    g_plain = np.take_along_axis(softmax_in(logits, out_dtype), chosen, axis=1)
    expected = g64 / g64.sum(axis=1, keepdims=True)
    plain = g_plain / g_plain.sum(axis=1, keepdims=True)
    assert_close_to_reference(routing.weights, expected, plain, name="renormalized weights")
    assert_close_to_reference(routing.weights.sum(axis=1), np.ones(60), plain.sum(axis=1),
                              name="renormalized weight sums")


@pytest.mark.parametrize("dtype", FLOATS)
def test_route_dtypes(backend, dtype):
    x, weights, _ = make_inputs(10, 8, 4, 5, 2, dtype=dtype)
    routing = topk_moe.route(x, weights.router, 2, backend=backend)
    assert routing.experts.dtype == np.int32
    assert routing.experts.shape == (10, 2)
    assert routing.weights.dtype == result_dtype(backend, dtype)
    assert routing.probs.dtype == result_dtype(backend, dtype)


def test_reference_takes_any_float_dtype():
    x, weights, cfg = make_inputs(12, 8, 4, 5, 2, activation="gelu", dtype=np.float16, seed=2)
    routing = topk_moe.route(x, weights.router, 2, backend="reference")
    assert routing.probs.dtype == np.float64 and routing.weights.dtype == np.float64
    out = topk_moe.moe_forward(x, weights, cfg, backend="reference")
    assert out.y.dtype == np.float64
    y = topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], activation="gelu", backend="reference")
    assert y.dtype == np.float64
    # mixed float dtypes are fine on the reference too
    mixed = topk_moe.moe_forward(x.astype(np.float32), weights, cfg, backend="reference")
    assert mixed.y.dtype == np.float64


# ---------------------------------------------------------------------------
# dispatch


# A hand-made example: E = 3, K = 2, T = 4.
# j-major assignments: (0,0)->0 (1,0)->0 (2,0)->0 (3,0)->1 | (0,1)->1 (1,1)->2 (2,1)->1 (3,1)->0
HAND_EXPERTS = np.array([[0, 1], [0, 2], [0, 1], [1, 0]], dtype=np.int32)


def test_dispatch_hand_example_dropless(backend):
    plan = topk_moe.dispatch(HAND_EXPERTS, 3, backend=backend)
    # expert 0: (0,0) (1,0) (2,0) (3,1); expert 1: (3,0) (0,1) (2,1); expert 2: (1,1)
    expected = (
        np.array([4, 3, 1]),
        np.array([0, 4, 7, 8]),
        np.array([0, 1, 2, 3, 3, 0, 2, 1]),
        np.array([[0, 5], [1, 7], [2, 6], [4, 3]]),
    )
    assert_plan_equal(plan, expected)


def test_dispatch_hand_example_capacity(backend):
    plan = topk_moe.dispatch(HAND_EXPERTS, 3, capacity=2, backend=backend)
    # expert 0 keeps (0,0) (1,0), drops (2,0) (3,1); expert 1 keeps (3,0) (0,1),
    # drops (2,1); expert 2 keeps (1,1). Token 2 loses both of its assignments.
    expected = (
        np.array([2, 2, 1]),
        np.array([0, 2, 4, 5]),
        np.array([0, 1, 3, 0, 1]),
        np.array([[0, 3], [1, 4], [-1, -1], [2, -1]]),
    )
    assert_plan_equal(plan, expected)


def test_capacity_keeps_first_choices_before_second_choices(backend):
    # Token 0's second choice and token 1's first choice both go to expert 1.
    # Token order would keep token 0 (it comes first); j-major keeps token 1,
    # because first choices outrank second choices.
    experts = np.array([[0, 1], [1, 0]], dtype=np.int32)
    plan = topk_moe.dispatch(experts, 2, capacity=1, backend=backend)
    expected = (
        np.array([1, 1]),
        np.array([0, 1, 2]),
        np.array([0, 1]),
        np.array([[0, -1], [1, -1]]),
    )
    assert_plan_equal(plan, expected)


def test_dispatch_j_major_order_inside_an_expert(backend):
    # expert 0 receives (1,0) then (0,1), (2,1); expert 1 receives (0,0), (2,0) then (1,1).
    # A token-major order would list tokens 0, 1, 2 for both.
    experts = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.int32)
    plan = topk_moe.dispatch(experts, 2, backend=backend)
    np.testing.assert_array_equal(plan.token, [1, 0, 2, 0, 2, 1])
    np.testing.assert_array_equal(plan.row, [[3, 1], [0, 5], [4, 2]])


def test_dispatch_capacity_zero_drops_everything(backend):
    plan = topk_moe.dispatch(HAND_EXPERTS, 3, capacity=0, backend=backend)
    assert_plan_equal(plan, (np.zeros(3), np.zeros(4), np.zeros(0), np.full((4, 2), -1)))


def random_experts(T, E, K, seed, dtype=np.int32):
    """Distinct experts per token, like a router would produce."""
    rng = np.random.default_rng(seed)
    if T == 0:
        return np.zeros((0, K), dtype=dtype)
    return np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(dtype)


@pytest.mark.parametrize("T", [0, 1, 33, 511])
@pytest.mark.parametrize("E, K", [(1, 1), (4, 1), (4, 2), (7, 2)])
@pytest.mark.parametrize("capacity", [None, 0, 1, 5, 1000])
def test_dispatch_matches_spec(backend, T, E, K, capacity):
    experts = random_experts(T, E, K, seed=T * 100 + E * 10 + K)
    plan = topk_moe.dispatch(experts, E, capacity=capacity, backend=backend)
    assert_plan_equal(plan, spec_plan(experts, E, capacity))
    assert_plan_invariants(plan, experts, E, capacity)


@pytest.mark.parametrize("capacity", [None, 3])
def test_dispatch_plan_identical_between_backends(capacity):
    for seed, (T, E, K) in enumerate([(33, 5, 2), (511, 9, 2), (40, 3, 1), (1, 2, 2)]):
        experts = random_experts(T, E, K, seed)
        ref = topk_moe.dispatch(experts, E, capacity=capacity, backend="reference")
        cpu = topk_moe.dispatch(experts, E, capacity=capacity, backend="cpu")
        assert_plan_equal(cpu, ref)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                   np.uint64])
def test_dispatch_accepts_any_integer_dtype(backend, dtype):
    plan = topk_moe.dispatch(HAND_EXPERTS.astype(dtype), 3, capacity=2, backend=backend)
    assert_plan_equal(plan, spec_plan(HAND_EXPERTS, 3, 2))


# ---------------------------------------------------------------------------
# capacity


@pytest.mark.parametrize("capacity_factor, T, K, E", [
    (1.0, 8, 2, 4), (1.25, 10, 1, 4), (0.25, 7, 1, 3), (2.0, 33, 2, 8), (3.0, 511, 2, 9),
    (0.5, 1, 1, 1), (1.5, 0, 2, 4), (0.75, 12, 2, 6),
])
def test_capacity_formula(capacity_factor, T, K, E):
    cfg = topk_moe.MoEConfig(4, 4, E, K, capacity_factor=capacity_factor)
    got = topk_moe.capacity(cfg, T)
    assert isinstance(got, int) and not isinstance(got, bool)
    assert got == math.ceil(capacity_factor * T * K / E)


def test_capacity_none_when_dropless():
    cfg = topk_moe.MoEConfig(4, 4, 4, 2)
    assert topk_moe.capacity(cfg, 0) is None
    assert topk_moe.capacity(cfg, 100) is None


# ---------------------------------------------------------------------------
# experts, dense_mlp, moe_forward


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T, D, F", [(17, 8, 12), (33, 33, 5), (3, 1, 1)])
def test_dense_mlp_hand_formula(backend, dtype, activation, T, D, F):
    rng = np.random.default_rng(T + D + F)
    x = rng.standard_normal((T, D)).astype(dtype)
    w1 = (rng.standard_normal((D, F)) / math.sqrt(D)).astype(dtype)
    w2 = (rng.standard_normal((F, D)) / math.sqrt(F)).astype(dtype)
    w3 = (rng.standard_normal((D, F)) / math.sqrt(D)).astype(dtype) if activation == "swiglu" else None
    y = topk_moe.dense_mlp(x, w1, w2, w3, activation=activation, backend=backend)
    assert y.shape == (T, D)
    assert y.dtype == result_dtype(backend, dtype)
    expected = expert64(x, w1, w2, w3, activation)  # gelu through math.erf
    plain = spec_expert(x, w1, w2, w3, activation, y.dtype)
    assert_close_to_reference(y, expected, plain, name=f"dense_mlp {activation}")


@pytest.mark.parametrize("dtype", FLOATS)
def test_dense_mlp_relu_exact_on_integers(backend, dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(9, 5)).astype(dtype)
    w1 = rng.integers(-3, 4, size=(5, 7)).astype(dtype)
    w2 = rng.integers(-3, 4, size=(7, 5)).astype(dtype)
    y = topk_moe.dense_mlp(x, w1, w2, activation="relu", backend=backend)
    expected = np.maximum(x.astype(np.int64) @ w1.astype(np.int64), 0) @ w2.astype(np.int64)
    np.testing.assert_array_equal(y, expected)


def test_dense_mlp_default_activation_is_relu(backend):
    x, weights, _ = make_inputs(6, 4, 3, 2, 1, activation="relu")
    y = topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], backend=backend)
    expected = expert64(x, weights.w1[0], weights.w2[0], None, "relu")
    plain = spec_expert(x, weights.w1[0], weights.w2[0], None, "relu", y.dtype)
    assert_close_to_reference(y, expected, plain, name="dense_mlp default")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_forward_matches_formula(backend, dtype, activation, k, capacity_factor, renormalize):
    T, D, F, E = 37, 12, 10, 5
    x, weights, cfg = make_inputs(T, D, F, E, k, activation=activation, dtype=dtype, seed=21,
                                  capacity_factor=capacity_factor, renormalize=renormalize)
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    assert out.y.shape == (T, D)
    assert out.y.dtype == result_dtype(backend, dtype)
    # the routing is route()'s, bit for bit, and the plan is dispatch()'s
    routing = topk_moe.route(x, weights.router, k, renormalize=renormalize, backend=backend)
    for name in ("experts", "weights", "probs"):
        got, want = getattr(out.routing, name), getattr(routing, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"routing.{name}")
    C = topk_moe.capacity(cfg, T)
    assert_plan_equal(out.plan, spec_plan(out.routing.experts, E, C))
    args = (x, weights.w1, weights.w2, weights.w3, activation,
            out.routing.experts, out.routing.weights, out.plan.row)
    plain = spec_moe(*args, dtype=out.y.dtype)
    assert_close_to_reference(out.y, spec_moe64(*args), plain, name="moe_forward")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("T, D, F", [(33, 33, 7), (511, 33, 16), (511, 7, 33)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_forward_cpu_close_to_reference_odd_sizes(activation, k, T, D, F, dtype,
                                                      capacity_factor):
    E = 5
    x, weights, cfg = make_inputs(T, D, F, E, k, activation=activation, dtype=dtype,
                                  seed=T + D + F, capacity_factor=capacity_factor)
    cpu = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    expected, ref_plan = reference_from_routing(x, weights, cfg, cpu.routing)
    assert expected.dtype == np.float64
    assert_plan_equal(cpu.plan, ref_plan)
    plain = plain_forward_for(cpu.y, x, weights, cfg, cpu.routing)
    assert_close_to_reference(cpu.y, expected, plain, name="cpu moe_forward vs reference")
    # and the reference's own routing agrees wherever it is not a near tie
    ref = topk_moe.route(x, weights.router, k, backend="reference")
    logits = x.astype(np.float64) @ weights.router.astype(np.float64)
    clear = routing_margin(logits, k) > MARGIN
    np.testing.assert_array_equal(cpu.routing.experts[clear], ref.experts[clear])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_row_blocks_cover_large_experts_and_dense_batches(activation):
    """The cpu backend runs each expert (and the dense MLP) in blocks of
    topk_moe.cpu.ROW_BLOCK rows; batches of several blocks plus a remainder must
    give the same result as the formula."""
    from topk_moe.cpu import ROW_BLOCK

    T, D, F, E, k = 2 * ROW_BLOCK + 37, 9, 11, 2, 1
    x, weights, cfg = make_inputs(T, D, F, E, k, activation=activation, dtype=np.float32, seed=5)
    cpu = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    assert cpu.plan.counts.max() > ROW_BLOCK
    expected, _ = reference_from_routing(x, weights, cfg, cpu.routing)
    plain = plain_forward_for(cpu.y, x, weights, cfg, cpu.routing)
    assert_close_to_reference(cpu.y, expected, plain, name="cpu moe_forward, several row blocks")
    w3 = None if weights.w3 is None else weights.w3[0]
    dense = topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation=activation, backend="cpu")
    assert_close_to_reference(dense, expected_dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation),
                              plain_dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation),
                              name="cpu dense_mlp, several row blocks")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
def test_moe_forward_plan_identical_between_backends(dtype, k):
    # integer inputs: no near ties, so both backends route identically
    x, router = make_integer_inputs(45, 6, 5, dtype=dtype, seed=31)
    _, w1, w2, _ = make_weights_arrays(6, 4, 5, activation="relu", dtype=dtype)
    weights = topk_moe.MoEWeights(router, w1, w2)
    cfg = topk_moe.MoEConfig(6, 4, 5, k, activation="relu", capacity_factor=0.75)
    ref = topk_moe.moe_forward(x, weights, cfg, backend="reference")
    cpu = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    np.testing.assert_array_equal(cpu.routing.experts, ref.routing.experts)
    assert_plan_equal(cpu.plan, ref.plan)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
def test_all_dropped_token_gets_exactly_zero(backend, dtype, k):
    # Every token prefers expert 0, then expert 1; capacity 1 keeps token 0 only.
    T, D, E = 4, 2, 2
    x = np.array([[1.0, 0.5], [2.0, -1.0], [0.5, 3.0], [1.5, 1.5]], dtype=dtype)
    router = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=dtype)  # logits (x0, 0), x0 > 0
    w1 = np.ones((E, D, 3), dtype=dtype)
    w2 = np.ones((E, 3, D), dtype=dtype)
    capacity_factor = 0.5 if k == 1 else 0.25
    cfg = topk_moe.MoEConfig(D, 3, E, k, activation="relu", capacity_factor=capacity_factor)
    assert topk_moe.capacity(cfg, T) == 1
    out = topk_moe.moe_forward(x, topk_moe.MoEWeights(router, w1, w2), cfg, backend=backend)
    np.testing.assert_array_equal(out.plan.row[1:], -1)
    assert (out.plan.row[0] >= 0).all()
    np.testing.assert_array_equal(out.y[1:], np.zeros((3, D)))
    assert (out.y[0] != 0).all()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("E", [1, 3, 8])
def test_identity_experts_round_trip_k1(backend, dtype, E):
    # relu with w1 = w2 = I and x >= 0: every expert is the identity, the k = 1
    # renormalised weight is exactly 1, so y == x exactly.
    T, D = 29, 6
    rng = np.random.default_rng(E)
    x = np.abs(rng.standard_normal((T, D))).astype(dtype)
    router = rng.standard_normal((D, E)).astype(dtype)
    eye = np.broadcast_to(np.eye(D, dtype=dtype), (E, D, D)).copy()
    cfg = topk_moe.MoEConfig(D, D, E, 1, activation="relu")
    out = topk_moe.moe_forward(x, topk_moe.MoEWeights(router, eye, eye.copy()), cfg, backend=backend)
    np.testing.assert_array_equal(out.y, x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_identity_experts_round_trip_k2_tied(backend, dtype):
    # Two identity experts with identical router columns: both weights are
    # exactly 0.5, so y = 0.5 x + 0.5 x == x exactly.
    T, D, E = 23, 5, 2
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((T, D))).astype(dtype)
    column = rng.standard_normal((D, 1))
    router = np.concatenate([column, column], axis=1).astype(dtype)
    eye = np.broadcast_to(np.eye(D, dtype=dtype), (E, D, D)).copy()
    cfg = topk_moe.MoEConfig(D, D, E, 2, activation="relu")
    out = topk_moe.moe_forward(x, topk_moe.MoEWeights(router, eye, eye.copy()), cfg, backend=backend)
    np.testing.assert_array_equal(out.routing.weights, np.full((T, 2), 0.5))
    np.testing.assert_array_equal(out.y, x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_identity_experts_round_trip_k2(backend, dtype):
    # With untied routing the two weights sum to 1 only up to rounding.
    T, D, E = 31, 6, 4
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((T, D))).astype(dtype)
    router = rng.standard_normal((D, E)).astype(dtype)
    eye = np.broadcast_to(np.eye(D, dtype=dtype), (E, D, D)).copy()
    weights = topk_moe.MoEWeights(router, eye, eye.copy())
    cfg = topk_moe.MoEConfig(D, D, E, 2, activation="relu")
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    plain = spec_moe(x, weights.w1, weights.w2, None, "relu", out.routing.experts,
                     out.routing.weights, out.plan.row, dtype=out.y.dtype)
    assert_close_to_reference(out.y, x.astype(np.float64), plain, name="identity k=2")


@pytest.mark.parametrize("dtype", FLOATS)
def test_moe_forward_output_dtype(backend, dtype):
    x, weights, cfg = make_inputs(9, 4, 3, 3, 2, dtype=dtype)
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    assert out.y.dtype == result_dtype(backend, dtype)
    assert out.routing.experts.dtype == np.int32
    for name in ("counts", "offsets", "token", "row"):
        assert getattr(out.plan, name).dtype == np.int64


# ---------------------------------------------------------------------------
# stage functions


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("capacity", [None, 4])
def test_permute_gathers_rows_in_plan_order(backend, dtype, capacity):
    x, weights, _ = make_inputs(33, 7, 3, 5, 2, dtype=dtype)
    experts = random_experts(33, 5, 2, seed=4)
    plan = topk_moe.dispatch(experts, 5, capacity=capacity, backend=backend)
    rows = topk_moe.permute(x, plan, backend=backend)
    assert rows.shape == (plan.token.shape[0], 7)
    assert rows.dtype == result_dtype(backend, dtype)
    np.testing.assert_array_equal(rows, x[plan.token])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_mlp_applies_each_expert_to_its_rows(backend, dtype, activation):
    _, weights, _ = make_inputs(0, 7, 6, 4, 2, activation=activation, dtype=dtype, seed=8)
    experts = random_experts(25, 4, 2, seed=8)
    plan = topk_moe.dispatch(experts, 4, capacity=9, backend=backend)
    N = plan.token.shape[0]
    rows = np.random.default_rng(8).standard_normal((N, 7)).astype(dtype)
    out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                             activation=activation, backend=backend)
    assert out.shape == (N, 7)
    assert out.dtype == result_dtype(backend, dtype)
    expected = np.zeros((N, 7))
    plain = np.zeros((N, 7), dtype=out.dtype)
    for e in range(4):
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        w3 = None if weights.w3 is None else weights.w3[e]
        expected[lo:hi] = expert64(rows[lo:hi], weights.w1[e], weights.w2[e], w3, activation)
        plain[lo:hi] = spec_expert(rows[lo:hi], weights.w1[e], weights.w2[e], w3, activation,
                                   out.dtype)
    assert_close_to_reference(out, expected, plain, name=f"expert_mlp {activation}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity", [None, 3])
def test_combine_sums_kept_assignments_in_j_order(backend, dtype, k, capacity):
    T, D, E = 26, 5, 4
    x, weights, _ = make_inputs(T, D, 3, E, k, dtype=dtype, seed=9)
    routing = topk_moe.route(x, weights.router, k, backend=backend)
    plan = topk_moe.dispatch(routing.experts, E, capacity=capacity, backend=backend)
    N = plan.token.shape[0]
    expert_out = np.random.default_rng(9).standard_normal((N, D)).astype(dtype)
    y = topk_moe.combine(expert_out, routing, plan, backend=backend)
    assert y.shape == (T, D)
    assert y.dtype == result_dtype(backend, dtype)
    expected = np.zeros((T, D), dtype=EXACT)
    plain = np.zeros((T, D), dtype=y.dtype)
    for t in range(T):
        for j in range(k):
            r = plan.row[t, j]
            if r >= 0:
                expected[t] += EXACT(routing.weights[t, j]) * expert_out[r].astype(EXACT)
                plain[t] += routing.weights[t, j].astype(y.dtype) * expert_out[r].astype(y.dtype)
    expected = expected.astype(np.float64)
    dropped = (plan.row < 0).all(axis=1)
    np.testing.assert_array_equal(y[dropped], 0)
    assert_close_to_reference(y, expected, plain, name="combine")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stages_compose_to_moe_forward(backend, dtype, activation):
    x, weights, cfg = make_inputs(30, 8, 6, 5, 2, activation=activation, dtype=dtype, seed=12,
                                  capacity_factor=0.75)
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    routing = topk_moe.route(x, weights.router, 2, backend=backend)
    plan = topk_moe.dispatch(routing.experts, 5, capacity=topk_moe.capacity(cfg, 30), backend=backend)
    assert_plan_equal(plan, out.plan)
    rows = topk_moe.permute(x, plan, backend=backend)
    expert_out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                                    activation=activation, backend=backend)
    y = topk_moe.combine(expert_out, routing, plan, backend=backend)
    args = (x, weights.w1, weights.w2, weights.w3, activation,
            routing.experts, routing.weights, plan.row)
    expected, plain = spec_moe64(*args), spec_moe(*args, dtype=y.dtype)
    assert_close_to_reference(y, expected, plain, name="stages")
    assert_close_to_reference(out.y, expected, plain, name="moe_forward")


# ---------------------------------------------------------------------------
# T = 0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_zero_tokens_give_empty_results(backend, dtype, k, capacity_factor, activation):
    D, F, E = 6, 4, 3
    x, weights, cfg = make_inputs(0, D, F, E, k, activation=activation, dtype=dtype,
                                  capacity_factor=capacity_factor)
    fdtype = result_dtype(backend, dtype)
    assert x.shape == (0, D)

    routing = topk_moe.route(x, weights.router, k, backend=backend)
    assert routing.experts.shape == (0, k) and routing.experts.dtype == np.int32
    assert routing.weights.shape == (0, k) and routing.weights.dtype == fdtype
    assert routing.probs.shape == (0, E) and routing.probs.dtype == fdtype

    C = topk_moe.capacity(cfg, 0)
    assert C == (None if capacity_factor is None else 0)
    plan = topk_moe.dispatch(routing.experts, E, capacity=C, backend=backend)
    assert_plan_equal(plan, (np.zeros(E), np.zeros(E + 1), np.zeros(0), np.zeros((0, k))))

    rows = topk_moe.permute(x, plan, backend=backend)
    assert rows.shape == (0, D) and rows.dtype == fdtype
    expert_out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                                    activation=activation, backend=backend)
    assert expert_out.shape == (0, D) and expert_out.dtype == fdtype
    y = topk_moe.combine(expert_out, routing, plan, backend=backend)
    assert y.shape == (0, D) and y.dtype == fdtype

    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    assert out.y.shape == (0, D) and out.y.dtype == fdtype
    assert out.routing.experts.shape == (0, k)
    assert_plan_equal(out.plan, plan)

    w3 = None if weights.w3 is None else weights.w3[0]
    dense = topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation=activation,
                              backend=backend)
    assert dense.shape == (0, D) and dense.dtype == fdtype


# ---------------------------------------------------------------------------
# nothing is modified in place


def frozen_copies(*arrays):
    """Read-only views (a write raises) plus copies to compare afterwards."""
    kept = []
    for a in arrays:
        if a is not None:
            a.setflags(write=False)
            kept.append((a, a.copy()))
    return kept


def assert_unchanged(kept):
    for a, before in kept:
        np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inputs_not_modified(backend, dtype, activation):
    x, weights, cfg = make_inputs(21, 6, 5, 4, 2, activation=activation, dtype=dtype, seed=6,
                                  capacity_factor=0.5)
    kept = frozen_copies(x, weights.router, weights.w1, weights.w2, weights.w3)

    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    assert_unchanged(kept)

    routing = topk_moe.route(x, weights.router, 2, backend=backend)
    kept += frozen_copies(routing.experts, routing.weights, routing.probs)
    plan = topk_moe.dispatch(routing.experts, 4, capacity=topk_moe.capacity(cfg, 21), backend=backend)
    kept += frozen_copies(plan.counts, plan.offsets, plan.token, plan.row)
    rows = topk_moe.permute(x, plan, backend=backend)
    kept += frozen_copies(rows)
    expert_out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                                    activation=activation, backend=backend)
    kept += frozen_copies(expert_out)
    topk_moe.combine(expert_out, routing, plan, backend=backend)
    w3 = None if weights.w3 is None else weights.w3[0]
    topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], w3, activation=activation, backend=backend)
    assert_unchanged(kept)
    assert out.y.shape == (21, 6)


# ---------------------------------------------------------------------------
# init_weights


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [None, np.float32, np.float64])
def test_init_weights_shapes_and_dtypes(activation, dtype):
    D, F, E = 6, 10, 4
    cfg = topk_moe.MoEConfig(D, F, E, 2, activation=activation)
    w = topk_moe.init_weights(cfg) if dtype is None else topk_moe.init_weights(cfg, dtype=dtype)
    want = np.dtype(np.float32 if dtype is None else dtype)
    assert isinstance(w, topk_moe.MoEWeights)
    assert w.router.shape == (D, E) and w.router.dtype == want
    assert w.w1.shape == (E, D, F) and w.w1.dtype == want
    assert w.w2.shape == (E, F, D) and w.w2.dtype == want
    if activation == "swiglu":
        assert w.w3 is not None
        assert w.w3.shape == (E, D, F) and w.w3.dtype == want
    else:
        assert w.w3 is None
    for a in (w.router, w.w1, w.w2, w.w3):
        if a is not None:
            assert np.isfinite(a).all() and np.abs(a).max() > 0


def test_init_weights_seed_determinism():
    cfg = topk_moe.MoEConfig(8, 12, 4, 2, activation="swiglu")
    a = topk_moe.init_weights(cfg, seed=3)
    b = topk_moe.init_weights(cfg, seed=3)
    c = topk_moe.init_weights(cfg, seed=4)
    d = topk_moe.init_weights(cfg)  # seed defaults to 0
    e = topk_moe.init_weights(cfg, seed=0)
    for name in ("router", "w1", "w2", "w3"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(getattr(d, name), getattr(e, name))
        assert not np.array_equal(getattr(a, name), getattr(c, name))


def test_init_weights_feed_moe_forward(backend):
    cfg = topk_moe.MoEConfig(8, 12, 4, 2, activation="swiglu", capacity_factor=1.0)
    w = topk_moe.init_weights(cfg, seed=1)
    x = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    out = topk_moe.moe_forward(x, w, cfg, backend=backend)
    assert out.y.shape == (10, 8) and np.isfinite(out.y).all()
