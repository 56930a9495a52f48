"""The PyTorch peers compute the contract's layer (on the CPU, float32), and
say clearly when PyTorch, CUDA or torch._grouped_mm is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import topk_moe
from analysis.measure import peers

pytest.importorskip("torch", reason="the peers need the torch extra")


@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
@pytest.mark.parametrize("k", [1, 2])
def test_peers_match_the_layer(activation, k):
    cfg = topk_moe.MoEConfig(32, 24, 6, k, activation=activation)
    weights = topk_moe.init_weights(cfg, seed=2)
    x = np.random.default_rng(5).standard_normal((37, 32)).astype(np.float32)
    expected = topk_moe.moe_forward(x, weights, cfg, backend="reference").y
    layer = peers.torch_layer(weights, cfg)
    x_torch = peers.as_torch(x)
    assert peers.relative_error(peers.hf_eager_moe(x_torch, layer), expected) < 1e-5
    if peers.grouped_mm_unavailable_reason("cpu") is None:
        grouped = peers.grouped_layer(layer, peers.grouped_mm_dtype("cpu"))
        assert peers.relative_error(peers.grouped_mm_moe(x_torch, grouped), expected) < 1e-5


def test_an_expert_without_tokens_is_fine():
    cfg = topk_moe.MoEConfig(16, 8, 4, 1)
    weights = topk_moe.init_weights(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)  # one token: one expert used
    expected = topk_moe.moe_forward(x, weights, cfg, backend="reference").y
    layer = peers.torch_layer(weights, cfg)
    assert peers.relative_error(peers.hf_eager_moe(peers.as_torch(x), layer), expected) < 1e-5


def test_dtypes_and_reasons():
    import torch

    assert peers.grouped_mm_dtype("cuda") == "bfloat16" and peers.grouped_mm_dtype("cpu") == "float32"
    assert peers.torch_unavailable_reason("cpu") is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in peers.torch_unavailable_reason("cuda")
        assert "no CUDA device" in peers.grouped_mm_unavailable_reason("cuda")
    with pytest.raises(ValueError, match="device"):
        peers.torch_unavailable_reason("tpu")
    assert peers.as_torch(np.ones(3, dtype=np.float32), "float64").dtype == torch.float64
    assert peers.relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)
    assert peers.relative_error(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0


def test_missing_torch_is_a_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    assert "PyTorch is not installed" in peers.torch_unavailable_reason("cpu")
    assert "PyTorch is not installed" in peers.grouped_mm_unavailable_reason("cpu")


def test_missing_grouped_mm_is_a_message(monkeypatch):
    import torch

    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert "no torch._grouped_mm" in peers.grouped_mm_unavailable_reason("cpu")
