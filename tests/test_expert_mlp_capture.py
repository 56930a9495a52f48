"""expert_mlp under CUDA graph capture, on the CPU emulator (CPU emulation:
no GPU result): the version a graph captures is the one an eager call picks,
given the bound a layer knows (T), and the capture keeps alive only the
arrays it made, never the caller's weights.

Capture itself needs a GPU (tests/test_cuda.py captures moe_forward there);
here the emulated device says it is capturing, which is all the launcher
looks at to decide."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from topk_moe.backends import emulator_unavailable_reason
from topk_moe.cuda import device as device_module
from topk_moe.cuda import expert_mlp

pytestmark = pytest.mark.skipif(emulator_unavailable_reason() is not None,
                                reason=f"the CUDA emulator can't run here: {emulator_unavailable_reason()}")


def _logging_device(capturing: bool):
    """The emulated device, saying whether it captures, logging the kernels it is asked for."""
    base = device_module.emulated_device()
    names = []

    def get_kernel(file, name, **defines):
        names.append(name)
        return base.get_kernel(file, name, **defines)

    return dataclasses.replace(base, get_kernel=get_kernel, capturing=lambda: capturing), names


def _decode_sized_batch(xp, activation="relu"):
    """T = 4 tokens, k = 2, E = 8: N = 8 rows, no expert with more than T = 4."""
    rng = np.random.default_rng(3)
    T, k, E, D, F = 4, 2, 8, 32, 32
    counts = np.array([4, 2, 1, 1, 0, 0, 0, 0])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = rng.standard_normal((T * k, D)).astype(np.float16)
    w1 = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float16)
    w2 = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(np.float16)
    w3 = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float16) if activation == "swiglu" else None
    return T, tuple(None if a is None else xp.asarray(a) for a in (rows, offsets, w1, w2, w3))


def test_a_captured_decode_batch_runs_the_kernels_an_eager_call_runs(monkeypatch):
    """At T = 4, k = 2 an eager call reads the counts (busiest expert: 4 rows)
    and picks decode; under capture N = 8 alone bounded them and picked v3, so
    the graph timed other kernels than the eager run. With max_expert_rows = T
    the bound is min(N, T) = 4: decode again."""
    monkeypatch.setattr(device_module, "GRAPH_KEEPALIVE", [])
    eager, eager_names = _logging_device(capturing=False)
    T, (rows, offsets, w1, w2, w3) = _decode_sized_batch(eager.xp)
    expert_mlp.grouped_mlp(rows, offsets, w1, w2, w3, "relu", device=eager)
    captured, captured_names = _logging_device(capturing=True)
    expert_mlp.grouped_mlp(rows, offsets, w1, w2, w3, "relu", device=captured, max_expert_rows=T)
    assert eager_names == ["expert_mlp_decode_hidden_f16", "expert_mlp_decode_out_f16"]
    assert captured_names == eager_names
    assert expert_mlp.largest_expert_rows(offsets, 8, captured) == 8  # without the bound: N
    assert expert_mlp.largest_expert_rows(offsets, 8, captured, bound=T) == 4
    assert expert_mlp.largest_expert_rows(offsets, 8, eager, bound=1) == 4  # eager reads the counts


def test_max_expert_rows_is_checked():
    emulated = device_module.emulated_device()
    T, (rows, offsets, w1, w2, w3) = _decode_sized_batch(emulated.xp)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_expert_rows"):
            expert_mlp.grouped_mlp(rows, offsets, w1, w2, w3, "relu", device=emulated, max_expert_rows=bad)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_capture_keeps_alive_what_it_made_and_not_the_weights(monkeypatch, activation):
    """A replay writes hidden (and tile starts) again, so they must outlive the
    call; the weights are the caller's (for relu and gelu w1 stands in for w3,
    and w1 itself was kept: every captured layer's weights, for the life of
    the process)."""
    keepalive = []
    monkeypatch.setattr(device_module, "GRAPH_KEEPALIVE", keepalive)
    captured, _ = _logging_device(capturing=True)
    T, given = _decode_sized_batch(captured.xp, activation)
    rows, offsets, w1, w2, w3 = given
    out = expert_mlp.grouped_mlp(rows, offsets, w1, w2, w3, activation, device=captured, version="v1")
    assert keepalive, "hidden must be kept alive for the graph's replays"
    assert any(tuple(a.shape) == (rows.shape[0], w1.shape[2]) for a in keepalive)  # hidden (N, F)
    for kept in keepalive:
        assert all(kept is not mine for mine in given if mine is not None), "a caller's array was kept"
        assert kept is not out
    copies = w1[:, :, ::2]  # not contiguous: the launcher makes a copy, which the graph then reads
    keepalive.clear()
    expert_mlp.grouped_mlp(rows, offsets, copies, w2[:, ::2, :], None if w3 is None else w3[:, :, ::2], activation,
                           device=captured, version="v1")
    assert sum(tuple(a.shape) == tuple(copies.shape) for a in keepalive) >= 1, "the copy of w1 must be kept"


def test_moe_forward_hands_the_cuda_launcher_T_as_the_row_bound(monkeypatch):
    """The bound reaches the launcher from the public layer: under a capture the
    decode batch above runs decode kernels, as it does eagerly."""
    import topk_moe
    from topk_moe.cuda.emulator import backend as emulated_backend

    bounds = []
    real = emulated_backend.expert_mlp

    def spy(*args, max_expert_rows=None, **kwargs):
        bounds.append(max_expert_rows)
        return real(*args, max_expert_rows=max_expert_rows, **kwargs)

    monkeypatch.setattr(emulated_backend, "expert_mlp", spy)
    cfg = topk_moe.MoEConfig(d_model=32, d_ff=32, n_experts=8, top_k=2, activation="relu")
    weights = topk_moe.init_weights(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    topk_moe.moe_forward(x, weights, cfg, backend="cuda-emulated")
    assert bounds == [4]
    bounds.clear()
    topk_moe.moe_forward(x, weights, cfg, backend="cpu")  # the host backends take no bound
    assert bounds == []
