"""The memory formula (analysis.measure.memory): exact for every array the layer
returns, and the CPU backend's measured peak (tracemalloc, the first call in a fresh
process) matches the model, the worker threads' scratch buffers included."""

from __future__ import annotations

import math

import numpy as np
import pytest

import topk_moe
from analysis.measure import memory

#: Small allocations beyond the model that do not grow with T (index temporaries, views, Python
#: objects; 20-60 KiB measured at the test's shapes).
SLACK_BYTES = 96 * 1024


def _arrays_of_the_layer(shape: memory.LayerShape) -> dict:
    """Every intermediate the CPU backend makes at ``shape``, run stage by stage."""
    cfg = topk_moe.MoEConfig(shape.D, shape.F, shape.E, shape.k, activation=shape.activation)
    weights = topk_moe.init_weights(cfg, seed=0, dtype=np.dtype(shape.dtype))
    x = np.random.default_rng(1).standard_normal((shape.T, shape.D)).astype(shape.dtype)
    routing = topk_moe.route(x, weights.router, shape.k, backend="cpu")
    plan = topk_moe.dispatch(routing.experts, shape.E, backend="cpu")
    rows = topk_moe.permute(x, plan, backend="cpu")
    expert_out = topk_moe.expert_mlp(rows, plan, weights.w1, weights.w2, weights.w3,
                                    activation=shape.activation, backend="cpu")
    y = topk_moe.combine(expert_out, routing, plan, backend="cpu")
    return {"probs": routing.probs, "experts": routing.experts, "weights": routing.weights,
            "counts": plan.counts, "offsets": plan.offsets, "token": plan.token, "row": plan.row,
            "rows": rows, "expert_out": expert_out, "y": y}


@pytest.mark.parametrize("T, k, dtype, activation", [
    (13, 1, "float32", "swiglu"), (13, 2, "float64", "relu"), (0, 2, "float32", "gelu"), (40, 2, "float32", "gelu"),
])
def test_formula_gives_the_bytes_of_every_array_the_layer_returns(T, k, dtype, activation):
    shape = memory.LayerShape(T, 16, 24, 4, k, dtype, activation)
    arrays = _arrays_of_the_layer(shape)
    formula = {row["array"]: row["bytes"] for row in memory.intermediates(shape)}
    assert {name: array.nbytes for name, array in arrays.items()} == {name: formula[name] for name in arrays}
    # The hidden activations are not returned; their formula is N F s (twice for swiglu).
    hidden = [row for row in memory.intermediates(shape) if row["lives"] == "expert stage"]
    assert len(hidden) == (2 if activation == "swiglu" else 1)
    assert all(row["bytes"] == T * k * 24 * np.dtype(dtype).itemsize for row in hidden)


def test_k2_doubles_the_token_sized_intermediates():
    one, two = (memory.LayerShape(100, 64, 128, 8, k) for k in (1, 2))
    by_array = [{row["array"]: row["bytes"] for row in memory.intermediates(shape)} for shape in (one, two)]
    for name in ("rows", "hidden", "gate", "expert_out", "token", "row", "weights", "experts"):
        assert by_array[1][name] == 2 * by_array[0][name], name
    for name in ("probs", "counts", "offsets", "y"):
        assert by_array[1][name] == by_array[0][name], name


def test_capacity_drops_shrink_the_rows():
    full, capped = memory.LayerShape(10, 8, 8, 4, 2), memory.LayerShape(10, 8, 8, 4, 2, n_kept=12)
    rows = [next(r["bytes"] for r in memory.intermediates(s) if r["array"] == "rows") for s in (full, capped)]
    assert rows == [20 * 8 * 4, 12 * 8 * 4]


# T = 600 is above the CPU backend's largest row block (512), so the hidden is made in blocks.
@pytest.mark.parametrize("T", [64, 600])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_cpu_peak_lies_between_the_held_arrays_and_the_whole_layer(T, k, activation):
    """The floor: every array the layer returns exists at once. The ceiling: the layer
    run stage by stage with the whole hidden at once, plus the CPU backend's
    temporaries; its fused, blocked experts keep it below that."""
    shape = memory.LayerShape(T, 256, 512, 8, k, "float32", activation)
    measured = memory.measure_peak(shape, "moe", "cpu").peak_bytes
    assert memory.held_bytes(shape) <= measured
    assert measured <= 1.02 * memory.peak_bytes(shape, memory.cpu_temporaries(activation)) + SLACK_BYTES
    dense = memory.measure_peak(shape, "dense", "cpu", dense_width=k * 512).peak_bytes
    # At least the output and one worker's scratch for one block (the hidden is made, a block at a time).
    assert T * 256 * 4 + memory.cpu_scratch_bytes(memory.cpu_block_rows(T), 256, k * 512, "float32", activation,
                                                  fused=False) <= dense
    assert dense <= 1.02 * memory.dense_peak_bytes(T, 256, k * 512, "float32", activation,
                                                   memory.cpu_temporaries(activation)) + SLACK_BYTES


def test_cpu_k2_adds_into_one_output():
    """The cpu backend's moe_forward adds the rows of both experts of a token into
    one (T, D) y, so a later call's peak (the scratch buffers already made) at
    k = 2 exceeds k = 1's by its larger routing and plan arrays and a block's rows
    gathered from y, and by less than a second (T, D) array (the K T x D buffer of
    slots it once made had two). The first call's peak also holds the scratch,
    whose blocks are larger at k = 2 (twice the rows), so it is not compared here."""
    shapes = [memory.LayerShape(1024, 256, 512, 8, k) for k in (1, 2)]
    one, two = (memory.measure_peak(shape, "moe", "cpu").repeat_peak_bytes for shape in shapes)
    assert two - one >= memory.held_bytes(shapes[1]) - memory.held_bytes(shapes[0])
    assert two - one < 1024 * 256 * 4


def test_dense_peak_grows_with_its_hidden_width():
    """The dense MLP's hidden activations are counted: its measured peak grows with its width F'
    by at least one worker's scratch for a block (the hidden, gate and activation work of a
    block's rows), and stays within the output plus every worker's scratch for the largest
    block. (Measured after a warm-up call in the same process, the scratch already existed and
    every width measured the output alone.)"""
    T, D = 512, 256
    rows = memory.cpu_block_rows(T)  # 64: eight blocks, shared by the workers
    shape = memory.LayerShape(T, D, 512, 8, 1)
    peaks = {}
    for width in (512, 1024, 4096):
        measured = memory.measure_peak(shape, "dense", "cpu", dense_width=width)
        one_block = memory.cpu_scratch_bytes(rows, D, width, fused=False)
        every_worker = measured.workers * memory.cpu_scratch_bytes(math.ceil(1.5 * rows), D, width, fused=False)
        assert T * D * 4 + one_block <= measured.peak_bytes <= T * D * 4 + every_worker + SLACK_BYTES, width
        # A later call finds the scratch made: little more than the output.
        assert measured.repeat_peak_bytes < T * D * 4 + SLACK_BYTES
        peaks[width] = measured.peak_bytes
    for narrow, wide in ((512, 1024), (1024, 4096)):
        grown = memory.cpu_scratch_bytes(rows, D, wide, fused=False) - memory.cpu_scratch_bytes(rows, D, narrow,
                                                                                               fused=False)
        assert peaks[wide] - peaks[narrow] >= grown, (narrow, wide)


def test_cpu_scratch_bytes_counts_the_backends_buffers():
    """The scratch formula against the CPU backend's own buffers, after one dense call on this
    thread alone (one worker: BLAS pinned to one thread)."""
    from threadpoolctl import threadpool_limits

    from topk_moe import cpu

    rng = np.random.default_rng(0)
    for activation, dtype in (("swiglu", "float32"), ("gelu", "float32"), ("gelu", "float64"), ("relu", "float32")):
        x = rng.standard_normal((64, 32)).astype(dtype)
        w1, w3 = (rng.standard_normal((32, 48)).astype(dtype) for _ in range(2))
        w2 = rng.standard_normal((48, 32)).astype(dtype)
        cpu._scratch.buffers.clear()  # this thread's, left by earlier tests
        with threadpool_limits(1, user_api="blas"):
            topk_moe.dense_mlp(x, w1, w2, w3 if activation == "swiglu" else None, activation=activation,
                               backend="cpu")
        held = sum(buffer.nbytes for buffer in cpu._scratch.buffers.values())
        assert memory.cpu_block_rows(64) == 64  # so the 64 rows are one block
        assert held == memory.cpu_scratch_bytes(64, 32, 48, dtype, activation, fused=False), activation


def test_measure_peak_refuses_bad_arguments():
    shape = memory.LayerShape(4, 8, 8, 4, 1)
    with pytest.raises(ValueError, match="arm: expected 'moe' or 'dense', got 'sparse'"):
        memory.measure_peak(shape, "sparse")
    with pytest.raises(ValueError, match="dense_width: expected a positive integer"):
        memory.measure_peak(shape, "dense")
    with pytest.raises(ValueError, match="backend: expected 'cpu' or 'cuda', got 'tpu'"):
        memory.measure_peak(shape, "moe", "tpu")


def test_whole_hidden_dominates_at_large_T():
    shape = memory.LayerShape(4096, 512, 1024, 8, 2)
    hidden = sum(r["bytes"] for r in memory.intermediates(shape) if r["lives"] == "expert stage")
    staged = sum(r["bytes"] for r in memory.intermediates(shape) if r["array"] in ("rows", "expert_out"))
    assert memory.peak_bytes(shape) == memory.held_bytes(shape) - 4096 * 512 * 4 + staged + hidden


@pytest.mark.parametrize("field, value, message", [
    ("k", 3, "k: expected 1 or 2, got 3"), ("T", -1, "T: expected an integer >= 0, got -1"),
    ("dtype", "int8", "dtype: expected one of"), ("E", 0, "E: expected an integer >= 1, got 0"),
])
def test_bad_shapes_say_what_is_wrong(field, value, message):
    fields = dict(T=4, D=8, F=8, E=4, k=2)
    fields[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        memory.LayerShape(**fields)


def test_run_writes_records_with_formula_beside_measurement(tmp_path):
    found = memory.run("tiny", tokens=[8], top_ks=[1], results_dir=tmp_path, echo=lambda message: None)
    assert [r["arm"] for r in found] == [arm for arm, _ in memory.arms(memory.LayerShape(8, 64, 128, 4, 1))]
    (path,) = tmp_path.glob("cpu-*/memory.jsonl")
    assert path.read_text().count("\n") == 3
    for record in found:
        assert record["held_bytes"] <= record["peak_bytes"]
        assert record["peak_bytes"] <= 2 * record["model_peak_bytes"] + SLACK_BYTES
        assert record["repeat_peak_bytes"] <= record["peak_bytes"]
        assert record["workers"] >= 1
        assert "scratch" in record["peak_includes"] and "fresh process" in record["peak_includes"]
