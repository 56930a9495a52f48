"""MoELayer.from_hf: a drop-in for the sparse MoE blocks of the installed transformers
(Mixtral, OLMoE, Qwen2-MoE with its shared expert, Qwen3-MoE).

Tiny randomly initialised models (from configs: nothing is downloaded) have
every sparse block replaced. Their logits must pass the project's tolerance
rule (topk_moe.testing) with the original model in float64 as the reference
and the original in float32 as the plain implementation, and 20 greedy
tokens must be identical. The weights are drawn with initializer_range 0.2
instead of the default 0.02: at 0.02 the experts' part of the logits is under
1% (swapping gate and up moves logits of about 0.4 by 3e-3), at 0.2 it is most
of them (the swap moves logits of about 4 by 3.8). The generation test asserts
that every greedy choice beats its runner-up by far more than the logits may
differ, so a near-tie cannot make it pass or fail by luck.
Transformers 4.x blocks (per-expert linears) cannot be installed beside 5.x:
they are rebuilt here with the structure 4.x used.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="topk_moe.torch needs torch (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="the drop-in tests need transformers (the test extra)")

import topk_moe  # noqa: E402
from topk_moe.testing import assert_close_to_reference, error_bound  # noqa: E402
from topk_moe.torch import MoELayer  # noqa: E402

VOCAB = 128
PROMPT_TOKENS = 12
NEW_TOKENS = 20
INITIALIZER_RANGE = 0.2
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=128, initializer_range=INITIALIZER_RANGE,
              eos_token_id=None, pad_token_id=None, bos_token_id=None)


def _config(family: str, **overrides):
    """A tiny config of one model family: D = 32, E = 4 experts of F = 64, top-2."""
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, **{**COMMON, **overrides})
    if family == "olmoe":  # norm_topk_prob=False by default: the top-2 weights are not renormalised
        return transformers.OlmoeConfig(intermediate_size=64, num_experts=4, **{**COMMON, **overrides})
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=64, num_experts=4,
                                           head_dim=8, **{"norm_topk_prob": True, **COMMON, **overrides})
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=64, num_experts=4,
                                           shared_expert_intermediate_size=64, **{**COMMON, **overrides})
    raise ValueError(family)


MODEL_CLASSES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM"}


def _model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model_class = getattr(transformers, MODEL_CLASSES[family])
    return model_class(_config(family, **overrides)).eval()


def _sparse_blocks(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def _converted(model, make_layer=MoELayer.from_hf):
    converted = copy.deepcopy(model)
    for layer in converted.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = make_layer(layer.mlp)
    return converted


def _float64(model):
    reference = copy.deepcopy(model).double()
    reference.set_experts_implementation("eager")  # grouped_mm has no float64
    return reference


def _prompt(seed: int = 1, batch: int = 2):
    return torch.randint(0, VOCAB, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.numpy()


def _assert_logits_pass_the_rule(converted, model, ids):
    expected = _logits(_float64(model), ids)
    plain = _logits(model, ids)
    assert_close_to_reference(_logits(converted, ids), expected, plain, name="logits", dtype=np.float32)
    return error_bound(expected, plain, np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_a_converted_model_gives_the_same_logits_and_greedy_tokens(family):
    model = _model(family)
    converted = _converted(model)
    assert all(isinstance(layer.mlp, MoELayer) for layer in converted.model.layers)
    ids = _prompt()
    bound = _assert_logits_pass_the_rule(converted, model, ids)

    with torch.no_grad():
        original = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
        ours = converted.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False)
    # Each greedy choice beats the runner-up by far more than the logits may
    # differ: the comparison of tokens below tests the layer, not a near-tie.
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in original.scores]
    assert min(margins) > 100 * bound, f"a greedy near-tie (margin {min(margins):.2e}): choose another seed"
    assert ours.shape[1] == PROMPT_TOKENS + NEW_TOKENS
    assert ours.tolist() == original.sequences.tolist()


@pytest.mark.parametrize("family, renormalize", [("mixtral", True), ("olmoe", False), ("qwen2_moe", False),
                                                 ("qwen3_moe", True)])
def test_each_family_keeps_its_renormalisation_rule(family, renormalize):
    block = _sparse_blocks(_model(family))[0]
    assert MoELayer.from_hf(block).cfg.renormalize is renormalize
    if family != "mixtral":  # Mixtral has no switch: it always renormalises
        flipped = _sparse_blocks(_model(family, norm_topk_prob=not renormalize))[0]
        assert MoELayer.from_hf(flipped).cfg.renormalize is (not renormalize)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_the_unrenormalised_rule_is_what_makes_the_logits_match(family):
    """A layer that renormalises where the block does not (or the reverse) fails
    the rule: the comparison sees the renormalisation."""
    model = _model(family)

    def flipped(block):
        layer = MoELayer.from_hf(block)
        cfg = layer.cfg
        wrong = topk_moe.MoEConfig(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, renormalize=not cfg.renormalize)
        return MoELayer(layer.weights, wrong)

    with pytest.raises(AssertionError, match="logits: max error"):
        _assert_logits_pass_the_rule(_converted(model, flipped), model, _prompt())


def test_negative_control_gate_and_up_swapped_fails_the_comparison():
    model = _model("mixtral")

    def swapped(block):
        layer = MoELayer.from_hf(block)
        w = layer.weights
        return MoELayer(topk_moe.MoEWeights(router=w.router, w1=w.w3, w2=w.w2, w3=w.w1), layer.cfg)

    with pytest.raises(AssertionError, match="logits: max error"):
        _assert_logits_pass_the_rule(_converted(model, swapped), model, _prompt())


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_the_layer_has_the_blocks_forward_signature_and_return_value(family):
    block = _sparse_blocks(_model(family))[0]
    layer = MoELayer.from_hf(block)
    assert list(inspect.signature(layer.forward).parameters) == list(inspect.signature(block.forward).parameters)
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        ours, theirs = layer(hidden), block(hidden)
    assert type(ours) is type(theirs) is torch.Tensor
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


@pytest.mark.slow
def test_the_emulated_cuda_kernels_run_a_converted_model():
    """The torch path on "cuda-emulated": the CUDA kernels, on the CPU (CPU emulation, not a GPU result)."""
    from topk_moe.backends import emulator_unavailable_reason

    if emulator_unavailable_reason() is not None:
        pytest.skip(f"cuda-emulated: {emulator_unavailable_reason()}")
    model = _model("mixtral")
    converted = _converted(model, lambda block: MoELayer.from_hf(block, backend="cuda-emulated"))
    _assert_logits_pass_the_rule(converted, model, _prompt(batch=1))


# ---------------------------------------------------------------------------
# transformers 4.x blocks: per-expert linears, (output, router_logits) returned


class _Mixtral4Expert(torch.nn.Module):
    """transformers 4.x MixtralBlockSparseTop2MLP: w1 gate, w3 up, w2 down."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, ffn, bias=False)
        self.w2 = torch.nn.Linear(ffn, hidden, bias=False)
        self.w3 = torch.nn.Linear(hidden, ffn, bias=False)
        self.act_fn = transformers.activations.ACT2FN["silu"]

    def forward(self, hidden_states):
        return self.w2(self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states))


class _Qwen4Expert(torch.nn.Module):
    """transformers 4.x OlmoeMLP / Qwen2MoeMLP / Qwen3MoeMLP: gate_proj, up_proj, down_proj."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, ffn, bias=False)
        self.up_proj = torch.nn.Linear(hidden, ffn, bias=False)
        self.down_proj = torch.nn.Linear(ffn, hidden, bias=False)
        self.act_fn = transformers.activations.ACT2FN["silu"]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _SparseMoeBlock4(torch.nn.Module):
    """The 4.x sparse block's structure and forward (Mixtral's, with OLMoE's and
    Qwen's norm_topk_prob switch when ``norm_topk_prob`` is not None)."""

    def __init__(self, expert_class, hidden=32, ffn=48, n_experts=4, top_k=2, norm_topk_prob=None,
                 shared_expert=False):
        super().__init__()
        if shared_expert:  # Qwen2-MoE 4.x: a gated dense MLP added to the routed experts
            self.shared_expert = _Qwen4Expert(hidden, 2 * ffn)
            self.shared_expert_gate = torch.nn.Linear(hidden, 1, bias=False)
        self.top_k = top_k
        self.num_experts = n_experts
        if norm_topk_prob is not None:
            self.norm_topk_prob = norm_topk_prob
        self.gate = torch.nn.Linear(hidden, n_experts, bias=False)
        self.experts = torch.nn.ModuleList([expert_class(hidden, ffn) for _ in range(n_experts)])

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = torch.nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current = self.experts[expert_idx](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current.to(hidden_states.dtype))
        if hasattr(self, "shared_expert"):
            shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
            final_hidden_states = final_hidden_states + shared
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class MixtralSparseMoeBlock(_SparseMoeBlock4):  # the 4.x class name: Mixtral always renormalises
    def __init__(self, **kwargs):
        super().__init__(_Mixtral4Expert, **kwargs)


@pytest.mark.parametrize("expert_class, norm_topk_prob, shared_expert", [
    (None, None, False),  # Mixtral 4.x: w1/w2/w3, always renormalised
    (_Qwen4Expert, False, False),  # OLMoE 4.x
    (_Qwen4Expert, False, True),  # Qwen2-MoE 4.x, with its shared expert
    (_Qwen4Expert, True, False),  # Qwen3-MoE 4.x
])
def test_transformers_4_blocks_convert_with_their_return_value(expert_class, norm_topk_prob, shared_expert):
    torch.manual_seed(7)
    if expert_class is None:
        block = MixtralSparseMoeBlock()
    else:
        block = _SparseMoeBlock4(expert_class, norm_topk_prob=norm_topk_prob, shared_expert=shared_expert)
    for parameter in block.parameters():  # weights that move the output, as the models above
        torch.nn.init.normal_(parameter, std=INITIALIZER_RANGE)
    layer = MoELayer.from_hf(block)
    assert layer.cfg.renormalize is (norm_topk_prob is not False)
    assert (layer.shared_w1 is not None) is shared_expert
    hidden = torch.randn(3, 7, 32)
    with torch.no_grad():
        (ours, our_logits), (theirs, their_logits) = layer(hidden), block(hidden)
        expected, expected_logits = copy.deepcopy(block).double()(hidden.double())
    assert_close_to_reference(ours.numpy(), expected.numpy(), theirs.numpy(), name="output")
    assert_close_to_reference(our_logits.numpy(), expected_logits.numpy(), their_logits.numpy(), name="router_logits")
    assert ours.shape == hidden.shape and our_logits.shape == (21, 4)


# ---------------------------------------------------------------------------
# What is not supported says so


def test_negative_control_qwen2_moe_without_its_shared_expert_fails_the_comparison():
    model = _model("qwen2_moe")

    def routed_experts_only(block):
        layer = MoELayer.from_hf(block)
        assert layer.shared_w1 is not None and layer.shared_gate.shape == (32, 1)
        return MoELayer(layer.weights, layer.cfg)

    with pytest.raises(AssertionError, match="logits: max error"):
        _assert_logits_pass_the_rule(_converted(model, routed_experts_only), model, _prompt())


def test_a_shared_expert_that_is_not_qwen2_moes_is_refused_by_name():
    block = _sparse_blocks(_model("qwen2_moe"))[0]
    del block.shared_expert_gate
    with pytest.raises(ValueError, match="uses a shared expert without .* shared_expert_gate"):
        MoELayer.from_hf(block)


def test_top_k_beyond_two_is_refused():
    block = _sparse_blocks(_model("olmoe", num_experts_per_tok=4))[0]
    with pytest.raises(ValueError, match=r"top-4 routing \(num_experts_per_tok = 4\)"):
        MoELayer.from_hf(block)


def test_an_activation_other_than_silu_is_refused():
    block = _sparse_blocks(_model("mixtral", hidden_act="gelu"))[0]
    with pytest.raises(ValueError, match="the gated activation GELUActivation"):
        MoELayer.from_hf(block)


def test_bfloat16_is_refused_at_conversion():
    block = _sparse_blocks(_model("mixtral"))[0].to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        MoELayer.from_hf(block)


def test_router_jitter_is_refused_in_training_mode():
    model = _model("mixtral", router_jitter_noise=0.1)
    layer = MoELayer.from_hf(_sparse_blocks(model)[0])
    with torch.no_grad():
        layer(torch.randn(1, 3, 32))  # eval mode: the block applies no jitter either
        layer.train()
        with pytest.raises(ValueError, match="router jitter"):
            layer(torch.randn(1, 3, 32))


def test_a_router_bias_and_unknown_parameters_are_refused():
    block = MixtralSparseMoeBlock()
    block.gate = torch.nn.Linear(32, 4, bias=True)
    with pytest.raises(ValueError, match=r"a router bias \(gate.bias\)"):
        MoELayer.from_hf(block)
    block = MixtralSparseMoeBlock()
    block.extra_scale = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(ValueError, match="parameters or buffers the layouts do not account for .*extra_scale"):
        MoELayer.from_hf(block)


def test_a_model_run_with_grad_mode_on_is_refused():
    model = _converted(_model("mixtral"))
    with pytest.raises(ValueError, match="MoELayer is inference only"):
        model(_prompt())  # the embeddings require grad, so the hidden states do


# ---------------------------------------------------------------------------
# The documentation's examples run


def _python_blocks(markdown: str) -> list:
    blocks, inside, lines = [], False, []
    for line in markdown.splitlines():
        if line.strip() == "```python":
            inside, lines = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(lines))
        elif inside:
            lines.append(line)
    return blocks


@pytest.mark.slow
def test_the_contract_example_from_pytorch_and_transformers_runs():
    from pathlib import Path

    contract = (Path(__file__).resolve().parents[1] / "book" / "contract.md").read_text(encoding="utf-8")
    section = contract.split("## From PyTorch and transformers", 1)[1].split("\n## ", 1)[0]
    (example,) = _python_blocks(section)
    namespace = {}
    exec(compile(example, "book/contract.md (From PyTorch and transformers)", "exec"), namespace)
    assert all(isinstance(layer.mlp, MoELayer) for layer in namespace["model"].model.layers)
    assert namespace["tokens"].shape == (1, 8 + 5)
