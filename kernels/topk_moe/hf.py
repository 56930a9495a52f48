"""Reading transformers' sparse MoE blocks into the contract's weights and config.

``topk_moe.torch.MoELayer.from_hf`` calls ``read_block``; this module knows the
layouts, the module does the computing. Layouts read (the router is always a
bias-free (E, D) weight, ``block.gate.weight``):

- fused experts (transformers 5.x: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE):
  ``experts.gate_up_proj`` (E, 2F, D), the gate's F rows first, and
  ``experts.down_proj`` (E, D, F); the router a ``*TopKRouter`` holding
  ``top_k`` (and ``norm_topk_prob``, except Mixtral's); the block returns the
  output tensor alone;
- per-expert linears (transformers 4.x): ``experts`` a ModuleList, each expert
  either Mixtral's ``w1`` (gate), ``w3`` (up), ``w2`` (down) or OLMoE's and
  Qwen's ``gate_proj``, ``up_proj``, ``down_proj``; the router an
  ``nn.Linear``; ``block.top_k`` (and ``block.norm_topk_prob``); the block
  returns ``(output, router_logits)``.

Renormalisation: the block's ``norm_topk_prob`` where it has one; Mixtral
always renormalises and has none. Qwen2-MoE's shared expert (a dense SwiGLU
MLP, ``shared_expert.gate_proj``/``up_proj``/``down_proj``, whose output is
scaled by ``sigmoid(shared_expert_gate(x))`` and added) is read into a
``SharedExpert``. Anything else a block holds (biases, ...) is refused with an
error that names it, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .types import MoEConfig, MoEWeights

#: Activations of the gated experts, by the class name of transformers' act_fn:
#: act(gate) * up with act = SiLU is the contract's "swiglu".
_SILU_CLASSES = ("SiLU", "SiLUActivation")


@dataclasses.dataclass(frozen=True)
class SharedExpert:
    """Qwen2-MoE's shared expert in the contract's dense layout: w1 (gate) and
    w3 (up) (D, F_shared), w2 (F_shared, D), and its gate (D, 1): the block adds
    sigmoid(x @ gate) * dense_mlp(x, w1, w2, w3, activation="swiglu")."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    gate: torch.Tensor


@dataclasses.dataclass(frozen=True)
class BlockReading:
    """What ``read_block`` found: the layer's weights (contiguous tensors in the
    contract's layout), its config, and how the block's forward behaves."""

    weights: MoEWeights
    cfg: MoEConfig
    returns_router_logits: bool  # transformers 4.x blocks return (output, router_logits)
    jitter_noise: float  # Mixtral's router jitter, applied by the block in training mode only
    layout: str  # "fused gate_up_proj/down_proj" or "per-expert w1/w2/w3" or "per-expert gate/up/down_proj"
    shared_expert: Optional[SharedExpert] = None


def _block_name(block: Any) -> str:
    return type(block).__name__


def _refuse(block: Any, feature: str, why: str) -> None:
    raise ValueError(f"block: {_block_name(block)} uses {feature}, which topk_moe.torch.MoELayer does not support: {why}")


def _check_activation(block: Any, act_fn: Any) -> str:
    name = type(act_fn).__name__
    if name not in _SILU_CLASSES:
        _refuse(block, f"the gated activation {name}",
                "the contract's only gated expert is SwiGLU (act(gate) * up with act = SiLU, 'swiglu')")
    return "swiglu"


def _weight(tensor: Any) -> torch.Tensor:
    """A detached, contiguous copy in the contract's layout: made once, at conversion."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _router_weight(block: Any) -> torch.Tensor:
    gate = getattr(block, "gate", None)
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"block: expected {_block_name(block)}.gate.weight, an (E, D) router weight, "
                         f"got {type(gate).__name__ if gate is not None else 'no gate'}")
    if getattr(gate, "bias", None) is not None:
        _refuse(block, "a router bias (gate.bias)", "the contract's router is logits = x @ router, without a bias")
    return weight


def _renormalize(block: Any, router: Any) -> bool:
    for holder in (router, block):
        value = getattr(holder, "norm_topk_prob", None)
        if value is not None:
            return bool(value)
    if _block_name(block).startswith("Mixtral") or type(router).__name__.startswith("Mixtral"):
        return True  # Mixtral always renormalises its top-k weights
    raise ValueError(
        f"block: expected a norm_topk_prob attribute on {_block_name(block)} or its gate (or a Mixtral block, "
        f"which always renormalises), got neither: the renormalisation rule is unknown"
    )


def _top_k(block: Any, router: Any) -> int:
    for holder in (router, block):
        value = getattr(holder, "top_k", None)
        if value is not None:
            break
    else:
        raise ValueError(f"block: expected top_k on {_block_name(block)} or its gate, got neither")
    if value not in (1, 2):
        _refuse(block, f"top-{value} routing (num_experts_per_tok = {value})", "the contract routes top-1 or top-2")
    return int(value)


def _check_fused_experts(block: Any, experts: Any) -> None:
    """The switches transformers' use_experts_implementation puts on fused experts."""
    for flag, unsupported, feature in (
        ("has_bias", True, "expert biases"),
        ("has_gate", False, "ungated experts (up_proj only)"),
        ("is_transposed", True, "transposed expert weights"),
        ("is_concatenated", False, "interleaved gate/up weights"),
        ("has_post_expert_norm", True, "a norm after each expert"),
        ("_is_expert_parallel", True, "expert parallelism"),
    ):
        if getattr(experts, flag, not unsupported) == unsupported:
            _refuse(block, feature, f"experts.{flag} is {unsupported}")


def _read_fused(block: Any) -> tuple:
    experts = block.experts
    _check_fused_experts(block, experts)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    n_experts, two_f, d_model = gate_up.shape
    d_ff = two_f // 2
    if two_f != 2 * d_ff or down.shape != (n_experts, d_model, d_ff):
        raise ValueError(f"block: expected experts.gate_up_proj (E, 2F, D) and down_proj (E, D, F), "
                         f"got {tuple(gate_up.shape)} and {tuple(down.shape)}")
    activation = _check_activation(block, experts.act_fn)
    # gate, up = (v @ gate_up[e].T).chunk(2): the gate's weight is the first F rows.
    w1 = _weight(gate_up[:, :d_ff, :].transpose(1, 2))
    w3 = _weight(gate_up[:, d_ff:, :].transpose(1, 2))
    w2 = _weight(down.transpose(1, 2))
    known = {"experts.gate_up_proj", "experts.down_proj"}
    return w1, w2, w3, activation, known, "fused gate_up_proj/down_proj"


#: Per-expert linears of transformers 4.x: (gate, up, down) attribute names.
_PER_EXPERT_NAMES = {"per-expert w1/w2/w3": ("w1", "w3", "w2"),
                     "per-expert gate/up/down_proj": ("gate_proj", "up_proj", "down_proj")}


def _read_per_expert(block: Any) -> tuple:
    experts = list(block.experts)
    if not experts:
        raise ValueError(f"block: expected at least one expert in {_block_name(block)}.experts, got none")
    for layout, (gate_name, up_name, down_name) in _PER_EXPERT_NAMES.items():
        if all(hasattr(experts[0], name) for name in (gate_name, up_name, down_name)):
            break
    else:
        raise ValueError(f"block: expected experts with w1/w2/w3 or gate_proj/up_proj/down_proj linears, "
                         f"got {type(experts[0]).__name__}")
    activation = _check_activation(block, experts[0].act_fn)
    known = set()
    gates, ups, downs = [], [], []
    for index, expert in enumerate(experts):
        _check_activation(block, expert.act_fn)
        for name, stack in ((gate_name, gates), (up_name, ups), (down_name, downs)):
            stack.append(_linear_weight(block, f"experts[{index}].{name}", getattr(expert, name)))
            known.add(f"experts.{index}.{name}.weight")
    w1, w3, w2 = (_weight(torch.stack(stack)) for stack in (gates, ups, downs))
    return w1, w2, w3, activation, known, layout


def _linear_weight(block: Any, name: str, linear: Any) -> torch.Tensor:
    """An nn.Linear's weight transposed to (in, out), the contract's layout; biases refused."""
    if getattr(linear, "bias", None) is not None:
        _refuse(block, f"a bias in {name}", "the contract's MLPs have no biases")
    return linear.weight.detach().t()


def _read_shared_expert(block: Any, known: set) -> SharedExpert:
    shared, gate = block.shared_expert, getattr(block, "shared_expert_gate", None)
    if gate is None or not all(hasattr(shared, name) for name in ("gate_proj", "up_proj", "down_proj")):
        _refuse(block, "a shared expert without gate_proj/up_proj/down_proj and a shared_expert_gate",
                "only Qwen2-MoE's shared expert is read")
    _check_activation(block, shared.act_fn)
    parts = {name: _linear_weight(block, f"shared_expert.{name}", getattr(shared, name))
             for name in ("gate_proj", "up_proj", "down_proj")}
    known.update(f"shared_expert.{name}.weight" for name in parts)
    known.add("shared_expert_gate.weight")
    return SharedExpert(w1=_weight(parts["gate_proj"]), w2=_weight(parts["down_proj"]), w3=_weight(parts["up_proj"]),
                        gate=_weight(_linear_weight(block, "shared_expert_gate", gate)))


def read_block(block: Any) -> BlockReading:
    """The contract's weights and config for one transformers sparse MoE block.

    ValueError names what is unsupported (router or expert biases, top-k other than 1 or 2, an activation other than SiLU-gated,
    any parameter the layouts above do not account for); TypeError for
    bfloat16 weights (no topk_moe backend takes bfloat16).
    """
    if not isinstance(block, torch.nn.Module):
        raise TypeError(f"block: expected a transformers sparse MoE block (a torch.nn.Module), got {type(block).__name__}")
    experts = getattr(block, "experts", None)
    if experts is None:
        raise ValueError(f"block: expected a sparse MoE block with .experts and .gate, got {_block_name(block)}")
    if hasattr(experts, "gate_up_proj"):
        w1, w2, w3, activation, known, layout = _read_fused(block)
        returns_router_logits = False
    elif isinstance(experts, torch.nn.ModuleList):
        w1, w2, w3, activation, known, layout = _read_per_expert(block)
        returns_router_logits = True
    else:
        raise ValueError(f"block: expected experts with fused gate_up_proj/down_proj or a ModuleList of "
                         f"per-expert linears, got {type(experts).__name__}")
    router_weight = _router_weight(block)
    known.add("gate.weight")
    shared_expert = _read_shared_expert(block, known) if hasattr(block, "shared_expert") else None
    unknown = sorted(name for name, _ in block.named_parameters() if name not in known)
    unknown += sorted(name for name, _ in block.named_buffers())
    if unknown:
        _refuse(block, f"parameters or buffers the layouts do not account for ({', '.join(unknown)})",
                "converting without them would change the block's output")
    checked = [("gate.weight", router_weight), ("expert weights", w1)]
    if shared_expert is not None:
        checked.append(("shared expert weights", shared_expert.w1))
    for name, tensor in checked:
        if tensor.dtype == torch.bfloat16:
            raise TypeError(f"block: {_block_name(block)}'s {name} are bfloat16, which no topk_moe backend takes "
                            f"(NumPy and CuPy have no bfloat16); convert the model to float32 or float16 first")
    n_experts, d_model, d_ff = w1.shape
    if router_weight.shape != (n_experts, d_model):
        raise ValueError(f"block: expected gate.weight of shape (E, D) = ({n_experts}, {d_model}), "
                         f"got {tuple(router_weight.shape)}")
    router = block.gate
    cfg = MoEConfig(d_model=d_model, d_ff=d_ff, n_experts=n_experts, top_k=_top_k(block, router),
                    activation=activation, renormalize=_renormalize(block, router))
    weights = MoEWeights(router=_weight(router_weight.t()), w1=w1, w2=w2, w3=w3)
    return BlockReading(weights=weights, cfg=cfg, returns_router_logits=returns_router_logits,
                        jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0), layout=layout,
                        shared_expert=shared_expert)
