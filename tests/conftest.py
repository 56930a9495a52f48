"""Shared fixtures and helpers for the contract tests.

Every test body that takes the `backend` fixture runs once per backend, so one
body checks the whole contract on each of them. The helpers here build inputs
and compute expected results independently of the `kernels` package, straight
from the words of the contract (loops, float64), so a shared mistake in the
package cannot hide itself.

Dimension letters as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token, C expert capacity, N kept assignments.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import topk_moe

BACKENDS = ("reference", "cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def no_backend_env(monkeypatch):
    """Tests of the default backend must not see a MOE_BACKEND set outside."""
    monkeypatch.delenv("MOE_BACKEND", raising=False)


# ---------------------------------------------------------------------------
# Inputs


def make_weights_arrays(D, F, E, *, activation="swiglu", dtype=np.float64, seed=0):
    """Random router (D, E), w1 (E, D, F), w2 (E, F, D), w3 (E, D, F) or None.

    Scaled like a real layer (1/sqrt(fan_in)) so values stay O(1).
    """
    rng = np.random.default_rng(seed)
    router = rng.standard_normal((D, E)) / math.sqrt(D)
    w1 = rng.standard_normal((E, D, F)) / math.sqrt(D)
    w2 = rng.standard_normal((E, F, D)) / math.sqrt(F)
    w3 = rng.standard_normal((E, D, F)) / math.sqrt(D) if activation == "swiglu" else None
    cast = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)
    return cast(router), cast(w1), cast(w2), cast(w3)


def make_inputs(T, D, F, E, K, *, activation="swiglu", dtype=np.float64, seed=0,
                capacity_factor=None, renormalize=True):
    """(x, weights, cfg): random tokens x (T, D), MoEWeights and the MoEConfig."""
    rng = np.random.default_rng(seed + 1_000_003)
    x = np.ascontiguousarray(rng.standard_normal((T, D)), dtype=dtype)
    router, w1, w2, w3 = make_weights_arrays(D, F, E, activation=activation, dtype=dtype, seed=seed)
    weights = topk_moe.MoEWeights(router=router, w1=w1, w2=w2, w3=w3)
    cfg = topk_moe.MoEConfig(D, F, E, K, activation=activation, renormalize=renormalize,
                            capacity_factor=capacity_factor)
    return x, weights, cfg


def make_integer_inputs(T, D, E, *, dtype=np.float64, seed=0, low=-3, high=4):
    """Small integer-valued x (T, D) and router (D, E): logits are exact in any
    summation order and any dtype, so routing and its ties are exact too."""
    rng = np.random.default_rng(seed)
    x = rng.integers(low, high, size=(T, D)).astype(dtype)
    router = rng.integers(low, high, size=(D, E)).astype(dtype)
    return x, router


# ---------------------------------------------------------------------------
# Independent formulas, written from the contract, in any dtype
#
# The tolerance rule needs an `expected` (float64 or better) and a `plain`
# result in the tested result's dtype. Both come from these formulas: expected
# in EXACT (long double, then rounded), plain in the result's dtype. They never
# go through the kernels package, so a mistake shared by the reference and a
# backend cannot widen the bound it is judged by.

EXACT = np.longdouble


def softmax_in(logits, dtype):
    logits = np.asarray(logits, dtype=dtype)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax64(logits):
    return softmax_in(logits, EXACT).astype(np.float64)


def _erf(v, dtype):
    # math.erf is double precision; that is below the rounding of every dtype tested
    flat = [math.erf(float(a)) for a in np.asarray(v).ravel()]
    return np.array(flat, dtype=np.float64).reshape(np.shape(v)).astype(dtype)


def spec_expert(v, w1, w2, w3, activation, dtype=EXACT):
    """One expert (or the dense MLP) on rows v, computed in `dtype`:
    relu/gelu: act(v @ w1) @ w2; swiglu: (silu(v @ w1) * (v @ w3)) @ w2;
    gelu the exact erf form 0.5 h (1 + erf(h / sqrt 2)); silu(h) = h * sigmoid(h)."""
    cast = lambda a: np.asarray(a, dtype=dtype)
    v = cast(v)
    h = v @ cast(w1)
    if activation == "relu":
        a = np.maximum(h, 0)
    elif activation == "gelu":
        sqrt2 = np.sqrt(np.asarray(2, dtype=dtype))
        a = np.asarray(0.5, dtype=dtype) * h * (1 + _erf(h / sqrt2, dtype))
    elif activation == "swiglu":
        with np.errstate(over="ignore"):
            a = h / (1 + np.exp(-h)) * (v @ cast(w3))
    else:  # pragma: no cover - the tests only pass the three names
        raise AssertionError(activation)
    return (a @ cast(w2)).astype(dtype)


def expert64(v, w1, w2, w3, activation):
    """The expert in long double, rounded to float64: an `expected` for the rule."""
    return spec_expert(v, w1, w2, w3, activation, EXACT).astype(np.float64)


def spec_route_choices(logits, k):
    """Top-k of each row: descending, equal logits -> smaller index first."""
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    out = np.zeros((T, k), dtype=np.int64)
    for t in range(T):
        # Sort by (-logit, index): a stable sort on -logit keeps index order on ties.
        order = sorted(range(E), key=lambda e: (-logits[t, e], e))
        out[t] = order[:k]
    return out


def spec_plan(experts, n_experts, capacity=None):
    """The dispatch plan written out from the contract, one assignment at a time."""
    experts = np.asarray(experts)
    T, K = experts.shape
    per_expert = [[] for _ in range(n_experts)]  # assignments (t, j) in j-major order
    for j in range(K):
        for t in range(T):
            per_expert[int(experts[t, j])].append((t, j))
    kept = [a if capacity is None else a[:capacity] for a in per_expert]
    counts = np.array([len(a) for a in kept], dtype=np.int64)
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    token = np.zeros(int(offsets[-1]), dtype=np.int64)
    row = np.full((T, K), -1, dtype=np.int64)
    r = 0
    for e in range(n_experts):
        for t, j in kept[e]:
            token[r] = t
            row[t, j] = r
            r += 1
    return counts, offsets, token, row


def spec_moe(x, w1, w2, w3, activation, experts, route_weights, row, dtype=EXACT):
    """y[t] = sum over kept j (in j order) of weights[t, j] * expert(x[t]), in `dtype`."""
    x = np.asarray(x)
    T, D = x.shape
    y = np.zeros((T, D), dtype=dtype)
    for t in range(T):
        for j in range(np.shape(experts)[1]):
            if row[t, j] < 0:
                continue
            e = int(experts[t, j])
            out = spec_expert(x[t:t + 1], w1[e], w2[e], None if w3 is None else w3[e],
                              activation, dtype)[0]
            y[t] = y[t] + np.asarray(route_weights[t, j], dtype=dtype) * out
    return y


def spec_moe64(*args):
    """spec_moe in long double, rounded to float64: an `expected` for the rule."""
    return spec_moe(*args, dtype=EXACT).astype(np.float64)


def reference_from_routing(x, weights, cfg, routing):
    """The float64 reference y for a GIVEN routing (say, the cpu's), built from
    the reference backend's stage functions, so near-tied routing decisions of
    a float32 backend do not count as errors."""
    C = topk_moe.capacity(cfg, x.shape[0])
    plan = topk_moe.dispatch(routing.experts, cfg.n_experts, capacity=C, backend="reference")
    rows = topk_moe.permute(x, plan, backend="reference")
    out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                             activation=cfg.activation, backend="reference")
    return topk_moe.combine(out, routing, plan, backend="reference"), plan


def routing_margin(logits, k):
    """Per-token gap that a rounding error would have to bridge to change the
    routing: between the k-th and (k+1)-th largest logit, and for k = 2 also
    between the 1st and the 2nd (which decides their order)."""
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    if T == 0:
        return np.zeros(0)
    s = -np.sort(-logits, axis=1)
    gaps = []
    if E > k:
        gaps.append(s[:, k - 1] - s[:, k])
    if k == 2:
        gaps.append(s[:, 0] - s[:, 1])
    if not gaps:
        return np.full(T, np.inf)
    return np.min(np.stack(gaps, axis=1), axis=1)


MARGIN = 1e-4


# ---------------------------------------------------------------------------
# Comparisons


def field_names(obj):
    if dataclasses.is_dataclass(obj):
        return tuple(f.name for f in dataclasses.fields(obj))
    return tuple(obj._fields)


def assert_plan_equal(actual, expected):
    """Bit-for-bit equality of two plans (or a plan and a spec_plan tuple), dtypes included."""
    if isinstance(expected, tuple) and not hasattr(expected, "counts"):
        expected = dict(zip(("counts", "offsets", "token", "row"), expected))
    else:
        expected = {name: getattr(expected, name) for name in ("counts", "offsets", "token", "row")}
    for name, want in expected.items():
        got = np.asarray(getattr(actual, name))
        want = np.asarray(want)
        assert got.dtype == np.int64, f"plan.{name} dtype {got.dtype}, expected int64"
        assert got.shape == want.shape, f"plan.{name} shape {got.shape}, expected {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=f"plan.{name}")


def assert_plan_invariants(plan, experts, n_experts, capacity=None):
    """The structural rules of a plan, checked without rebuilding it."""
    experts = np.asarray(experts)
    T, K = experts.shape
    counts, offsets = np.asarray(plan.counts), np.asarray(plan.offsets)
    token, row = np.asarray(plan.token), np.asarray(plan.row)
    N = token.shape[0]
    assert counts.shape == (n_experts,) and offsets.shape == (n_experts + 1,)
    assert row.shape == (T, K)
    assert offsets[0] == 0 and offsets[-1] == N
    np.testing.assert_array_equal(np.diff(offsets), counts)
    assert (counts >= 0).all()
    if capacity is not None:
        assert (counts <= capacity).all()
    kept = row >= 0
    assert ((row == -1) | kept).all(), "dropped rows must be exactly -1"
    assert kept.sum() == N
    # every kept assignment appears exactly once, at a row owned by its expert
    assert sorted(row[kept].tolist()) == list(range(N))
    tt, jj = np.nonzero(kept)
    np.testing.assert_array_equal(token[row[tt, jj]], tt)
    owner = np.searchsorted(offsets, row[tt, jj], side="right") - 1
    np.testing.assert_array_equal(owner, experts[tt, jj])
    if capacity is None:
        assert kept.all(), "dropless dispatch must keep every assignment"
    else:
        # an expert below capacity dropped nothing routed to it
        for e in range(n_experts):
            if counts[e] < capacity:
                assert kept[experts == e].all()


# ---------------------------------------------------------------------------
# Fixtures of the measurement and chapter tests


@pytest.fixture(scope="session")
def tiny_sweep_results(tmp_path_factory):
    """A results folder holding one run of the tiny CPU sweep (T = 1 and 16, k = 1
    and 2), made once per test session. Read it, or copy it before adding records."""
    from analysis.measure import sweep, sweep_plan  # noqa: PLC0415 - only these tests need the sweep

    plan = sweep_plan.with_overrides(sweep_plan.PLANS["cpu-tiny"], tokens=(1, 16), top_ks=(1, 2))
    root = tmp_path_factory.mktemp("tiny-sweep-results")
    sweep.run_sweep(plan, progress=False, results_dir=root, echo=lambda message: None)
    return root


@pytest.fixture
def cpu_forward_one_percent_off(monkeypatch):
    """topk_moe.cpu.moe_forward with y 1% too large: what a wrong layer looks like
    to the checks that must refuse to time it."""
    forward = topk_moe.cpu.moe_forward

    def one_percent_off(*arguments):
        y, routing, plan = forward(*arguments)
        return y * 1.01, routing, plan

    monkeypatch.setattr(topk_moe.cpu, "moe_forward", one_percent_off)


# ---------------------------------------------------------------- helpers shared by test files


def site_line(source, name: str) -> str:
    """'kernels/topk_moe/cuda/<source file>:<line>' of the line of ``source`` (a test
    kernel file, a Path) marked `// site: name`: how the emulator labels its accesses."""
    import re

    for number, text in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if re.search(rf"// site: {name}$", text):
            return f"kernels/topk_moe/cuda/{source.name}:{number}"
    raise AssertionError(f"no site {name} in {source.name}")


def write_model_records(root, tokens, *, sanity: bool = False) -> None:
    """The GPU model's records (two kernels' occupancy, the predictions at ``tokens``, and with
    ``sanity`` the check against vLLM's published times), written as
    ``python -m analysis.measure.gpu_model`` writes them, into ``root``/predicted-model."""
    from analysis import records
    from analysis.measure import gpu_model

    rows = [{"file": "expert_mlp.cu", "kernel": "expert_mlp_v3_hidden_f16", "defines": {}, "registers": 126,
             "shared_bytes": 38912, "spill_stores": 0, "spill_loads": 0},
            {"file": "router.cu", "kernel": "router_top2_f16", "defines": {}, "registers": 43,
             "shared_bytes": 1792, "spill_stores": 0, "spill_loads": 0}]
    folder = gpu_model.predicted_root(root)
    records.write_records(gpu_model.OCCUPANCY_KIND, [gpu_model.occupancy_record(r, a) for r in rows for a in (80, 90)],
                          results_dir=folder)
    records.write_records(gpu_model.PREDICTION_KIND, gpu_model.predictions({}, tokens=tuple(tokens)),
                          results_dir=folder)
    if sanity:
        records.write_records(gpu_model.SANITY_KIND, gpu_model.sanity_records(), results_dir=folder)
