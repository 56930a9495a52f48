"""Bad input: ValueError (or TypeError for a dtype) whose message names the argument.

The contract: wrong rank or shape, mismatched widths, k not in {1, 2}, k > E,
an unknown activation or backend, capacity_factor <= 0, a missing or
unexpected w3 -> ValueError naming the argument, what was expected and what
came; an unsupported dtype -> TypeError, likewise; NaN or infinity in x or
router -> ValueError mentioning "non-finite".
"""

from __future__ import annotations

import numpy as np
import pytest

import topk_moe

from conftest import make_inputs

T, D, F, E = 5, 4, 3, 3


def layer(activation="swiglu", dtype=np.float64, k=2, capacity_factor=None):
    return make_inputs(T, D, F, E, k, activation=activation, dtype=dtype,
                       capacity_factor=capacity_factor)


def replace(weights, **changes):
    fields = dict(router=weights.router, w1=weights.w1, w2=weights.w2, w3=weights.w3)
    fields.update(changes)
    return topk_moe.MoEWeights(**fields)


def arg(name):
    """A pattern for an argument's name as a whole word ("x" must not match "expected")."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


# ---------------------------------------------------------------------------
# MoEConfig validates itself


@pytest.mark.parametrize("kwargs, name", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=-4), "d_model"),
    (dict(d_ff=0), "d_ff"),
    (dict(n_experts=0), "n_experts"),
    (dict(n_experts=-1), "n_experts"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=3), "top_k"),
    (dict(top_k=2, n_experts=1), "top_k"),
    (dict(activation="tanh"), "activation"),
    (dict(activation="ReLU"), "activation"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.5), "capacity_factor"),
])
def test_config_rejects_bad_values(kwargs, name):
    base = dict(d_model=4, d_ff=3, n_experts=3, top_k=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=arg(name)):
        topk_moe.MoEConfig(**base)


@pytest.mark.parametrize("kwargs, name", [
    (dict(d_model=4.5), "d_model"),
    (dict(d_ff="3"), "d_ff"),
    (dict(n_experts=3.0), "n_experts"),
])
def test_config_rejects_non_integer_sizes(kwargs, name):
    base = dict(d_model=4, d_ff=3, n_experts=3, top_k=2)
    base.update(kwargs)
    # a wrong type may be reported as TypeError or ValueError; the name must be in it
    with pytest.raises((TypeError, ValueError), match=arg(name)):
        topk_moe.MoEConfig(**base)


@pytest.mark.parametrize("n_tokens", [-1, -100])
def test_capacity_rejects_negative_token_count(n_tokens):
    cfg = topk_moe.MoEConfig(4, 3, 3, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match=arg("n_tokens")):
        topk_moe.capacity(cfg, n_tokens)


# ---------------------------------------------------------------------------
# route


@pytest.mark.parametrize("x_shape", [(D,), (T, D, 1), (1, T, D)])
def test_route_x_wrong_rank(backend, x_shape):
    _, weights, _ = layer()
    with pytest.raises(ValueError, match=arg("x")) as info:
        topk_moe.route(np.zeros(x_shape), weights.router, 2, backend=backend)
    assert str(x_shape) in str(info.value), "the message should say what came"


@pytest.mark.parametrize("router_shape", [(D,), (D, E, 1)])
def test_route_router_wrong_rank(backend, router_shape):
    x, _, _ = layer()
    with pytest.raises(ValueError, match=arg("router")):
        topk_moe.route(x, np.zeros(router_shape), 2, backend=backend)


def test_route_width_mismatch(backend):
    x, weights, _ = layer()
    with pytest.raises(ValueError, match=rf"{arg('x')}|{arg('router')}"):
        topk_moe.route(x, np.zeros((D + 1, E)), 2, backend=backend)


@pytest.mark.parametrize("k", [0, 3, -1])
def test_route_k_not_one_or_two(backend, k):
    x, weights, _ = layer()
    with pytest.raises(ValueError, match=arg("k")) as info:
        topk_moe.route(x, weights.router, k, backend=backend)
    assert str(k) in str(info.value)


def test_route_k_greater_than_experts(backend):
    x, _, _ = layer()
    router = np.ones((D, 1))
    with pytest.raises(ValueError, match=arg("k")):
        topk_moe.route(x, router, 2, backend=backend)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["x", "router"])
def test_route_non_finite(backend, bad, where):
    x, weights, _ = layer()
    router = weights.router.copy()
    x = x.copy()
    (x if where == "x" else router)[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.route(x, router, 2, backend=backend)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["x", "router"])
def test_moe_forward_non_finite(backend, bad, where):
    x, weights, cfg = layer()
    x = x.copy()
    router = weights.router.copy()
    (x if where == "x" else router)[0, 0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.moe_forward(x, replace(weights, router=router), cfg, backend=backend)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128])
def test_route_non_float_dtype(backend, dtype):
    x, weights, _ = layer()
    with pytest.raises(TypeError, match=arg("x")):
        topk_moe.route(np.ones((T, D), dtype=dtype), weights.router, 2, backend=backend)


def test_cpu_rejects_float16():
    x, weights, cfg = layer(dtype=np.float16)
    with pytest.raises(TypeError):
        topk_moe.route(x, weights.router, 2, backend="cpu")
    with pytest.raises(TypeError):
        topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    with pytest.raises(TypeError):
        topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], weights.w3[0], activation="swiglu",
                          backend="cpu")


def test_cpu_rejects_mixed_dtypes():
    x, weights, cfg = layer(dtype=np.float32)
    with pytest.raises(TypeError):
        topk_moe.route(x, weights.router.astype(np.float64), 2, backend="cpu")
    with pytest.raises(TypeError, match=arg("w1")):
        topk_moe.moe_forward(x, replace(weights, w1=weights.w1.astype(np.float64)), cfg,
                            backend="cpu")
    with pytest.raises(TypeError):
        topk_moe.moe_forward(x.astype(np.float64), weights, cfg, backend="cpu")
    with pytest.raises(TypeError):
        topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0].astype(np.float64),
                          weights.w3[0], activation="swiglu", backend="cpu")


def test_cpu_rejects_integer_inputs():
    _, weights, cfg = layer(activation="relu")
    x = np.ones((T, D), dtype=np.int64)
    intw = replace(weights, router=np.ones((D, E), dtype=np.int64),
                   w1=np.ones((E, D, F), dtype=np.int64), w2=np.ones((E, F, D), dtype=np.int64))
    with pytest.raises(TypeError):
        topk_moe.moe_forward(x, intw, cfg, backend="cpu")
    with pytest.raises(TypeError):
        topk_moe.dense_mlp(x, np.ones((D, F), dtype=np.int64), np.ones((F, D), dtype=np.int64),
                          backend="cpu")


# ---------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_dispatch_experts_not_integer(backend, dtype):
    with pytest.raises(TypeError, match=arg("experts")):
        topk_moe.dispatch(np.zeros((T, 2), dtype=dtype), E, backend=backend)


@pytest.mark.parametrize("shape", [(T,), (T, 2, 1)])
def test_dispatch_experts_wrong_rank(backend, shape):
    with pytest.raises(ValueError, match=arg("experts")):
        topk_moe.dispatch(np.zeros(shape, dtype=np.int32), E, backend=backend)


@pytest.mark.parametrize("bad", [E, E + 5, -1])
def test_dispatch_experts_out_of_range(backend, bad):
    experts = np.zeros((T, 2), dtype=np.int32)
    experts[:, 1] = 1
    experts[3, 0] = bad
    with pytest.raises(ValueError, match=arg("experts")):
        topk_moe.dispatch(experts, E, backend=backend)


@pytest.mark.parametrize("n_experts", [0, -2])
def test_dispatch_bad_n_experts(backend, n_experts):
    with pytest.raises(ValueError, match=arg("n_experts")):
        topk_moe.dispatch(np.zeros((T, 1), dtype=np.int32), n_experts, backend=backend)


def test_dispatch_negative_capacity(backend):
    with pytest.raises(ValueError, match=arg("capacity")):
        topk_moe.dispatch(np.zeros((T, 1), dtype=np.int32), E, capacity=-1, backend=backend)


# ---------------------------------------------------------------------------
# moe_forward: weights against the config


@pytest.mark.parametrize("name, shape", [
    ("router", (D, E + 1)),
    ("router", (D + 1, E)),
    ("router", (D,)),
    ("w1", (E, D, F + 1)),
    ("w1", (E + 1, D, F)),
    ("w1", (D, F)),
    ("w2", (E, F, D + 1)),
    ("w2", (E, F + 1, D)),
    ("w2", (E - 1, F, D)),
    ("w3", (E, D, F + 2)),
    ("w3", (E, D)),
])
def test_moe_forward_wrong_weight_shape(backend, name, shape):
    x, weights, cfg = layer()
    bad = replace(weights, **{name: np.zeros(shape)})
    with pytest.raises(ValueError, match=arg(name)):
        topk_moe.moe_forward(x, bad, cfg, backend=backend)


def test_moe_forward_x_width_mismatch(backend):
    _, weights, cfg = layer()
    with pytest.raises(ValueError, match=arg("x")):
        topk_moe.moe_forward(np.zeros((T, D + 2)), weights, cfg, backend=backend)


@pytest.mark.parametrize("shape", [(D,), (T, D, 1)])
def test_moe_forward_x_wrong_rank(backend, shape):
    _, weights, cfg = layer()
    with pytest.raises(ValueError, match=arg("x")):
        topk_moe.moe_forward(np.zeros(shape), weights, cfg, backend=backend)


def test_moe_forward_missing_w3(backend):
    x, weights, cfg = layer(activation="swiglu")
    with pytest.raises(ValueError, match=arg("w3")):
        topk_moe.moe_forward(x, replace(weights, w3=None), cfg, backend=backend)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_moe_forward_unexpected_w3(backend, activation):
    x, weights, cfg = layer(activation=activation)
    w3 = np.zeros((E, D, F))
    with pytest.raises(ValueError, match=arg("w3")):
        topk_moe.moe_forward(x, replace(weights, w3=w3), cfg, backend=backend)


# ---------------------------------------------------------------------------
# dense_mlp


@pytest.mark.parametrize("activation", ["tanh", "", "SWIGLU", None])
def test_dense_mlp_unknown_activation(backend, activation):
    x, weights, _ = layer(activation="relu")
    with pytest.raises(ValueError, match=arg("activation")):
        topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], activation=activation, backend=backend)


def test_dense_mlp_missing_w3(backend):
    x, weights, _ = layer(activation="swiglu")
    with pytest.raises(ValueError, match=arg("w3")):
        topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], activation="swiglu", backend=backend)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_dense_mlp_unexpected_w3(backend, activation):
    x, weights, _ = layer(activation="swiglu")
    with pytest.raises(ValueError, match=arg("w3")):
        topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], weights.w3[0], activation=activation,
                          backend=backend)


@pytest.mark.parametrize("name, shape", [
    ("w1", (D + 1, F)), ("w1", (E, D, F)), ("w2", (F + 1, D)), ("w2", (F, D + 1)),
    ("w3", (D, F + 1)), ("x", (T, D + 1)), ("x", (D,)),
])
def test_dense_mlp_wrong_shapes(backend, name, shape):
    x, weights, _ = layer(activation="swiglu")
    args = dict(x=x, w1=weights.w1[0], w2=weights.w2[0], w3=weights.w3[0])
    args[name] = np.zeros(shape)
    with pytest.raises(ValueError, match=arg(name) if name != "x" else rf"{arg('x')}|{arg('w1')}"):
        topk_moe.dense_mlp(args["x"], args["w1"], args["w2"], args["w3"], activation="swiglu",
                          backend=backend)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_dense_mlp_non_finite_x(backend, bad):
    x, weights, _ = layer(activation="relu")
    x = x.copy()
    x[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], backend=backend)


# ---------------------------------------------------------------------------
# unknown backend, on every function


def calls_with_backend(name):
    x, weights, cfg = layer(activation="relu", k=1)
    experts = np.zeros((T, 1), dtype=np.int32)
    plan = topk_moe.dispatch(experts, E, backend="reference")
    routing = topk_moe.route(x, weights.router, 1, backend="reference")
    rows = x[plan.token]
    calls = {
        "route": lambda b: topk_moe.route(x, weights.router, 1, backend=b),
        "dispatch": lambda b: topk_moe.dispatch(experts, E, backend=b),
        "moe_forward": lambda b: topk_moe.moe_forward(x, weights, cfg, backend=b),
        "dense_mlp": lambda b: topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], backend=b),
        "permute": lambda b: topk_moe.permute(x, plan, backend=b),
        "expert_mlp": lambda b: topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2,
                                                   activation="relu", backend=b),
        "combine": lambda b: topk_moe.combine(rows, routing, plan, backend=b),
    }
    return calls[name]


@pytest.mark.parametrize("function", ["route", "dispatch", "moe_forward", "dense_mlp", "permute",
                                      "expert_mlp", "combine"])
@pytest.mark.parametrize("name", ["no-such-backend", "", "cuda-but-misspelt"])
def test_unknown_backend(function, name):
    call = calls_with_backend(function)
    with pytest.raises(ValueError, match=arg("backend")) as info:
        call(name)
    if name:
        assert name in str(info.value), "the message should say what came"
