"""The PyTorch model: its MoE layer is the kernels contract, it learns, its checkpoints round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import topk_moe
from topk_moe import testing
from analysis.study import corpus
from analysis.study.moe_model import (ByteTransformer, MoELayer, ModelConfig, balance_loss, load_checkpoint,
                                parameter_counts, round_to_checkpoint, save_checkpoint, to_kernels)

TINY = dict(seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=16, n_experts=4)


def _layer(top_k, activation="swiglu", seed=0, D=12, F=10, E=5):
    torch.manual_seed(seed)
    layer = MoELayer(D, F, E, top_k, renormalize=top_k == 2, activation=activation)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.4)
    return layer


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_torch_layer_equals_kernels_moe_forward(top_k, activation, backend):
    layer = _layer(top_k, activation)
    h = torch.randn(33, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, routing, *_ = layer(h)
    cfg, weights = to_kernels(layer)
    assert cfg.renormalize == (top_k == 2)
    x = h.numpy()
    out = topk_moe.moe_forward(x, weights, cfg, backend=backend)
    np.testing.assert_array_equal(out.routing.experts, routing.experts.numpy())
    np.testing.assert_allclose(out.routing.weights, routing.weights.numpy(), rtol=1e-5, atol=1e-7)
    expected = testing.expected_moe_forward(x, weights, cfg, out.routing)
    plain = testing.plain_moe_forward(x, weights, cfg, out.routing)
    testing.assert_close_to_reference(y.numpy(), expected, plain, name="torch MoE layer")
    testing.assert_close_to_reference(out.y, expected, plain, name=f"kernels ({backend})", dtype=np.float32)


@pytest.mark.parametrize("top_k, capacity_factor", [(1, 0.5), (2, 0.5), (2, 1.0), (2, 1.25)])
def test_capacity_keeps_what_kernels_dispatch_keeps(top_k, capacity_factor):
    layer = _layer(top_k, seed=3)
    h = torch.randn(31, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, routing, *_ = layer(h, capacity_factor=capacity_factor)
    cfg, weights = to_kernels(layer)
    cfg = topk_moe.MoEConfig(**{**cfg.__dict__, "capacity_factor": capacity_factor})
    out = topk_moe.moe_forward(h.numpy(), weights, cfg, backend="cpu")
    np.testing.assert_array_equal(routing.kept.numpy(), np.asarray(out.plan.row) >= 0)
    assert not routing.kept.all()  # the case does drop something
    expected = testing.expected_moe_forward(h.numpy(), weights, cfg, out.routing)
    plain = testing.plain_moe_forward(h.numpy(), weights, cfg, out.routing)
    testing.assert_close_to_reference(y.numpy(), expected, plain, name="torch MoE layer with capacity")


def test_ties_go_to_the_smaller_expert_index():
    layer = _layer(2)
    with torch.no_grad():
        layer.router.zero_()  # every logit equal
    experts, weights, probs, _ = layer.route(torch.randn(3, 12), 2, True)
    assert experts.tolist() == [[0, 1]] * 3
    assert torch.allclose(weights, torch.full((3, 2), 0.5))


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert float(balance_loss(torch.arange(8)[:, None] % E, uniform, E)) == pytest.approx(1.0)
    collapsed = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), E).float()
    assert float(balance_loss(torch.zeros(8, 1, dtype=torch.long), collapsed, E)) == pytest.approx(E)


def test_parameter_counts_match_the_model():
    for ffn, top_k in (("dense", 1), ("moe", 1), ("moe", 2)):
        cfg = ModelConfig(**TINY, ffn=ffn, top_k=top_k)
        model = ByteTransformer(cfg)
        assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("ffn, top_k", [("dense", 1), ("moe", 1), ("moe", 2)])
def test_a_few_training_steps_lower_the_loss(ffn, top_k):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, ffn=ffn, top_k=top_k, renormalize=top_k == 2)
    model = ByteTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = corpus.load_corpus()["train"][:8 * 17].astype(np.int64).reshape(8, 17)
    batch = torch.from_numpy(text)
    losses = []
    for _ in range(15):
        out = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[0] == pytest.approx(math.log(256), rel=0.1)  # starts near uniform over bytes
    assert losses[-1] < losses[0] - 0.5
    if ffn == "moe":
        assert model.blocks[0].ffn.router.grad is not None and model.blocks[0].ffn.router.grad.abs().sum() > 0


def test_checkpoints_round_trip_in_float16(tmp_path):
    torch.manual_seed(0)
    model = ByteTransformer(ModelConfig(**TINY, ffn="moe", top_k=2, renormalize=True))
    round_to_checkpoint(model)
    path = save_checkpoint(tmp_path / "m.pt", model, {"arm": "x"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"arm": "x"} and loaded.cfg == model.cfg
    tokens = torch.randint(0, 256, (2, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert path.stat().st_size < sum(p.numel() for p in model.parameters()) * 2 + 20_000


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(top_k=3)
    with pytest.raises(ValueError, match="ffn"):
        ModelConfig(ffn="sparse")
