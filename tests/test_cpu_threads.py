"""The cpu backend on several threads: the same input gives bitwise the same
output whatever the number of threads, the workers really run at once, and the
caller's BLAS setting is left as it was."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import topk_moe
import topk_moe.cpu as cpu
from topk_moe.testing import assert_close_to_reference, expected_moe_forward, plain_moe_forward

THREAD_COUNTS = (1, 2, 3)  # 3: more workers than this machine's two cores still gives the same bits

#: Shapes that exercise every way the backend cuts work: one task on the
#: calling thread (decode, GEMV rows), experts of a few rows on several workers,
#: many experts of a few rows grouped into fewer tasks (a token's two experts
#: may fall in one group), blocks of several activation slices (the last one
#: short) and route and combine over several token blocks (T > TOKEN_BLOCK).
CASES = [
    pytest.param(1, 1, 4, id="T=1 k=1 (one task, GEMV)"),
    pytest.param(5, 2, 4, id="T=5 k=2 (a few rows per expert, a stage too small to share out)"),
    pytest.param(16, 2, 64, id="T=16 k=2 E=64 (experts grouped into tasks)"),
    pytest.param(200, 1, 24, id="T=200 k=1 E=24 (groups of a few experts)"),
    pytest.param(300, 2, 4, id="T=300 k=2 (small row blocks)"),
    pytest.param(cpu.TOKEN_BLOCK * 2 + 77, 2, 4, id="T>2 token blocks k=2 (several row blocks)"),
]


def blas_threads() -> list[int]:
    return [library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"]


def layer(T: int, k: int, activation: str, seed: int = 3, E: int = 4):
    D, F = 136, 552
    cfg = topk_moe.MoEConfig(D, F, E, k, activation=activation)
    weights = topk_moe.init_weights(cfg, seed=seed)
    x = np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)
    return x, weights, cfg


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("T, k, E", CASES)
def test_moe_forward_is_bitwise_the_same_on_any_number_of_threads(T, k, E, activation):
    x, weights, cfg = layer(T, k, activation, E=E)
    outputs = {}
    for threads in THREAD_COUNTS:
        with threadpool_limits(limits=threads, user_api="blas"):
            assert cpu.threads() == threads
            outputs[threads] = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    first = outputs[THREAD_COUNTS[0]]
    for threads, output in outputs.items():
        assert output.y.tobytes() == first.y.tobytes(), f"y differs between 1 and {threads} threads"
        assert output.routing.weights.tobytes() == first.routing.weights.tobytes()
        assert output.routing.probs.tobytes() == first.routing.probs.tobytes()
        np.testing.assert_array_equal(output.routing.experts, first.routing.experts)
        np.testing.assert_array_equal(output.plan.token, first.plan.token)


@pytest.mark.parametrize("T", [1, 40, 3 * cpu.ROW_BLOCK + 9])
def test_dense_mlp_and_stages_are_bitwise_the_same_on_any_number_of_threads(T):
    x, weights, cfg = layer(T, 2, "swiglu")
    results = {}
    for threads in THREAD_COUNTS:
        with threadpool_limits(limits=threads, user_api="blas"):
            routing = topk_moe.route(x, weights.router, 2, backend="cpu")
            plan = topk_moe.dispatch(routing.experts, cfg.n_experts, backend="cpu")
            rows = topk_moe.permute(x, plan, backend="cpu")
            out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3, activation="swiglu",
                                     backend="cpu")
            y = topk_moe.combine(out, routing, plan, backend="cpu")
            dense = topk_moe.dense_mlp(x, weights.w1[0], weights.w2[0], weights.w3[0], activation="swiglu",
                                      backend="cpu")
            results[threads] = [a.tobytes() for a in (rows, out, y, dense)]
    for threads in THREAD_COUNTS:
        assert results[threads] == results[1], f"a stage differs between 1 and {threads} threads"


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("T, k, E", CASES)
def test_the_fused_layer_equals_its_stages(T, k, E, activation, capacity_factor):
    """moe_forward gathers, scales and adds into y inside its expert tasks;
    the stages (permute, expert_mlp, combine) run the same GEMMs on the same
    rows and the same products, so y is the same to the bit. For k = 2 even
    the sign of a zero agrees (both start from +0 and add the two rows, the
    fused layer in whichever order its workers finish); for k = 1 the fused
    layer writes each row, so a -0 stays -0 where combine's 0 + (-0) is +0."""
    x, weights, _ = layer(T, k, activation, E=E)
    cfg = topk_moe.MoEConfig(x.shape[1], weights.w1.shape[2], weights.w1.shape[0], k, activation=activation,
                            capacity_factor=capacity_factor)
    fused = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    rows = topk_moe.permute(x, fused.plan, backend="cpu")
    out = topk_moe.expert_mlp(rows, fused.plan, weights.w1, weights.w2, weights.w3, activation=activation,
                             backend="cpu")
    staged = topk_moe.combine(out, fused.routing, fused.plan, backend="cpu")
    np.testing.assert_array_equal(fused.y, staged)
    if k == 2:
        np.testing.assert_array_equal(fused.y.view(np.uint32), staged.view(np.uint32))
    if capacity_factor is not None and T > 1:
        assert (fused.plan.row < 0).any()  # some assignments were dropped, and the test covered them


def test_grouped_experts_keep_both_rows_of_a_token():
    """T = 16, k = 2, E = 64: the experts of a few rows each run in groups,
    and a token whose two experts share a group gets both rows (an
    ``y[token] += rows`` with a token twice would add one of them)."""
    x, weights, cfg = layer(16, 2, "relu", E=64)
    fused = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    bounds = fused.plan.offsets.tolist()
    small = sum(1 for e in range(64) if bounds[e] < bounds[e + 1])
    assert small > cpu.MIN_TASKS  # more experts than tasks: groups of several
    # The project's one tolerance rule, routed as the layer routed.
    assert_close_to_reference(fused.y, expected_moe_forward(x, weights, cfg, fused.routing),
                              plain_moe_forward(x, weights, cfg, fused.routing), name="grouped y")


def test_workers_run_at_once():
    """Two tasks that each wait for the other can finish only if two workers run them together."""
    meeting = threading.Barrier(2, timeout=20)
    seen = set()

    def meet():
        seen.add(threading.get_ident())
        meeting.wait()

    cpu._run([meet, meet], workers=2)
    assert len(seen) == 2


@pytest.mark.parametrize("T, helpers_expected", [(2, False), (512, True)])
def test_a_small_expert_stage_stays_on_the_calling_thread(monkeypatch, T, helpers_expected):
    """k = 2 touches at least two experts, two tasks; below PARALLEL_MIN_WORK
    they run on the calling thread (no helper is asked for), above it on two workers."""
    x, weights, cfg = layer(T, 2, "relu", E=4)
    asked = []
    real_helpers = cpu._helpers
    monkeypatch.setattr(cpu, "_helpers", lambda count: asked.append(count) or real_helpers(count))
    with threadpool_limits(limits=2, user_api="blas"):
        out = topk_moe.moe_forward(x, weights, cfg, backend="cpu")
    touched = int((out.plan.counts > 0).sum())
    assert touched >= 2  # more than one task to share out
    work = (T * cfg.top_k + cpu.WEIGHT_READ_COST * touched) * cfg.d_model * cfg.d_ff * 2
    assert (work >= cpu.PARALLEL_MIN_WORK) == helpers_expected
    assert bool(asked) == helpers_expected


def test_a_failing_task_raises_and_the_blas_setting_is_restored():
    before = blas_threads()

    def fail():
        raise RuntimeError("task failed on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        with cpu._pinned_blas() as workers:
            assert blas_threads() == [1] * len(before)  # pinned inside the call
            cpu._run([lambda: None, fail, lambda: None], workers=max(workers, 2))
    assert blas_threads() == before


def test_the_worker_count_follows_blas():
    with threadpool_limits(limits=1, user_api="blas"):
        assert cpu.threads() == 1
        x, weights, cfg = layer(64, 2, "relu")
        topk_moe.moe_forward(x, weights, cfg, backend="cpu")
        assert blas_threads() == [1] * len(blas_threads())  # the call left the caller's limit alone
    with threadpool_limits(limits=2, user_api="blas"):
        assert cpu.threads() == 2
