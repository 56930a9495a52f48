"""Scoring is causal: no later byte changes an earlier prediction, for every arm and capacity.

The batch-wide capacity (the kernels' contract, one call of every token) is not
causal for k = 2: all first choices outrank all second choices, so a later
position's first choice can push out an earlier position's second choice. The
per-position scope (each position of the batch one call, as in batched
decoding) is what the evaluation uses; these tests hold it to that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import topk_moe
from analysis.study import evaluation, train
from analysis.study.moe_model import ByteTransformer, kept_mask

B, S, CUT = 6, 16, 9  # bytes after position CUT are changed


def _model(arm: str) -> ByteTransformer:
    torch.manual_seed(7)
    model = ByteTransformer(train.model_config(train.PRESETS["tiny"], train.ARMS[arm]))
    if model.cfg.is_moe:  # a router far from uniform, so that experts fill unevenly and drop
        with torch.no_grad():
            for _, layer in model.moe_layers():
                layer.router.normal_(std=1.0)
    return model.eval()


def _two_batches():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (B, S), generator=generator)
    changed = tokens.clone()
    changed[:, CUT + 1:] = torch.randint(0, 256, (B, S - CUT - 1), generator=generator)
    assert not torch.equal(tokens[:, CUT + 1:], changed[:, CUT + 1:])
    return tokens, changed


#: Unchanged up to float32 rounding: an expert's GEMM runs on the rows routed to it, and
#: a later byte changes how many rows that is, which may change BLAS's blocking and so
#: the last bit of an earlier row (measured: at most 1e-7). A causality violation moves
#: logits by 1e-2 to 1 (the batch-wide rule below).
ROUNDING = 1e-6


def _earlier_change(model, capacity_factor, capacity_scope="position") -> float:
    tokens, changed = _two_batches()
    with torch.no_grad():
        before = model(tokens, capacity_factor=capacity_factor, capacity_scope=capacity_scope)
        after = model(changed, capacity_factor=capacity_factor, capacity_scope=capacity_scope)
    assert not torch.equal(before.logits[:, CUT + 1:], after.logits[:, CUT + 1:])  # the change reached the model
    return float((before.logits[:, :CUT + 1] - after.logits[:, :CUT + 1]).abs().max())


@pytest.mark.parametrize("capacity_factor", evaluation.CAPACITY_FACTORS, ids=lambda f: f"capacity-{f}")
@pytest.mark.parametrize("arm", list(train.ARMS))
def test_changing_future_bytes_leaves_every_earlier_logit_unchanged(arm, capacity_factor):
    model = _model(arm)
    assert _earlier_change(model, capacity_factor) <= ROUNDING
    tokens, _ = _two_batches()
    with torch.no_grad():
        before = model(tokens, capacity_factor=capacity_factor)
    if model.cfg.is_moe and capacity_factor is not None and capacity_factor <= 1.0:
        # The capacity really dropped something, so the test is not vacuous.
        assert any(not bool(routing.kept.all()) for routing in before.routing)


@pytest.mark.parametrize("arm", ["moe-k1", "moe-k2-half", "moe-k2"])
def test_the_batch_wide_capacity_is_not_causal(arm):
    """The kernels' one call of every token of the batch lets later bytes change earlier
    logits, for k = 1 too: with (batch, position) flattened, sequence 1's first
    position arrives after sequence 0's last. (This is also what shows that the test
    above can fail.)"""
    assert _earlier_change(_model(arm), 1.0, capacity_scope="batch") > 1e-3


def test_the_batch_wide_capacity_is_not_causal_for_k2():
    """The counter-example behind the per-position scope, by hand: E = 2, C = 1, two
    tokens. Token 0 chooses (0, 1). Token 1 (later) chooses (1, 0) or (0, 1)."""
    early = torch.tensor([[0, 1]])
    for later, token0_second_kept in (([[1, 0]], False), ([[0, 1]], True)):
        experts = torch.cat([early, torch.tensor(later)])
        kept = kept_mask(experts, 2, capacity=1, calls=1)
        assert bool(kept[0, 1]) == token0_second_kept  # decided by the later token's first choice
        # One call per position: token 0's fate depends on token 0 only.
        assert bool(kept_mask(experts, 2, capacity=1, calls=2)[0, 1])


@pytest.mark.parametrize("top_k", [1, 2])
def test_each_position_keeps_what_kernels_dispatch_keeps_on_that_position(top_k):
    generator = torch.Generator().manual_seed(top_k)
    E, capacity = 4, 2
    experts = torch.stack([torch.randperm(E, generator=generator)[:top_k] for _ in range(B * S)])
    kept = kept_mask(experts, E, capacity, calls=S).reshape(B, S, top_k)
    per_position = experts.reshape(B, S, top_k)
    for s in range(S):
        plan = topk_moe.dispatch(per_position[:, s].numpy().astype(np.int32), E, capacity=capacity, backend="cpu")
        np.testing.assert_array_equal(kept[:, s].numpy(), np.asarray(plan.row) >= 0)
    assert not kept.all()


def test_scoring_uses_the_causal_scope():
    """evaluate_model with a capacity scores exactly what per-position calls give."""
    model = _model("moe-k2")
    data = np.random.default_rng(0).integers(1, 256, size=2 * 4 * 16 + 1).astype(np.uint8)
    scored = evaluation.evaluate_model(model, data, batch_size=4, capacity_factor=1.0)
    assert scored["drop_rate"] > 0
    nats = 0.0
    with torch.no_grad():
        for batch in evaluation.eval_windows(data, model.cfg.seq_len, 4):
            batch = torch.from_numpy(batch)
            logits = model(batch[:, :-1], capacity_factor=1.0, capacity_scope="position").logits
            nats += float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1),
                                                            reduction="sum"))
    assert scored["loss"] == pytest.approx(nats / scored["n_bytes"], rel=1e-12)


def test_an_unknown_capacity_scope_is_an_error():
    model = _model("moe-k1")
    tokens, _ = _two_batches()
    with pytest.raises(ValueError, match="capacity_scope: expected one of"):
        model(tokens, capacity_factor=1.0, capacity_scope="sequence")
