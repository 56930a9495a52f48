"""A small byte-level decoder-only transformer whose FFN is dense or a top-k MoE layer.

The MoE layer follows the kernels contract (book/contract.md) so that
its trained weights load into ``topk_moe.MoEWeights`` unchanged:

    router (D, E), w1 and w3 (E, D, F), w2 (E, F, D), no biases;
    logits = h @ router; probs = softmax(logits);
    experts = the k largest logits, descending, ties to the smaller index;
    weights = probs of the chosen experts, divided by their sum when renormalising;
    y[t] = sum over kept j of weights[t, j] * expert_{experts[t, j]}(h[t]).

k = 1 uses ``renormalize=False`` (Switch Transformer): the single weight is
the router probability, so the router gets a gradient through the output.
With renormalisation that weight would always be 1.0 and the router would
learn only from the balancing loss. k = 2 renormalises (the contract's
default, GShard and Mixtral). The choice is part of the model config and
travels with each checkpoint into ``topk_moe.MoEConfig``.

Every arm uses the same expert MLP, SwiGLU ``(silu(h @ w1) * (h @ w3)) @ w2``,
the dense FFN included: it is the contract's default activation, it is what
the MoE models whose published numbers the book quotes use (Mixtral,
DeepSeekMoE), and it exercises the gate matrix w3 in the kernels cross-check.

Capacity applies only when asked (inference experiments); training is
dropless. With a capacity factor, a call with T tokens keeps at most
C = ceil(capacity_factor * T * K / E) assignments per expert, taken in the
contract's j-major order (all first choices in token order, then all second
choices), exactly as ``topk_moe.dispatch`` does. Which tokens form one call is
the capacity scope (``CAPACITY_SCOPES``):

- ``"position"`` (the default for the whole model): each position of the batch
  is one call of B tokens, one from each sequence, as in batched decoding. The
  drops at position s depend only on the tokens at position s of the B
  sequences, which depend only on their bytes up to s, so the model stays
  causal: no byte after position s, in any sequence of the batch, can change a
  prediction at s. This is the rule for scoring a language model.
- ``"batch"``: the whole batch, flattened (batch, position), is one call, the
  kernels' contract (GShard's batch-wide rule, what a prefill kernel sees).
  It is not causal: whether a token's second choice is kept depends on the
  first choices of every later position, since all first choices outrank all
  second choices; and, with sequences flattened one after another, even for
  k = 1 the first positions of one sequence arrive after the last positions
  of the one before, whose bytes then decide what they keep. Use it to study
  the kernels, not to score next-byte loss.

Dimension letters as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F_nn
from torch import nn

import topk_moe

FFN_KINDS = ("dense", "moe")
#: Which tokens share one capacity (see the module docstring).
CAPACITY_SCOPES = ("position", "batch")
ACTIVATIONS = ("relu", "gelu", "swiglu")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and losses of one model (gpt-fast style: a frozen dataclass, presets elsewhere)."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    ffn: str = "dense"  # "dense" or "moe"
    d_ff: int = 128  # F: the dense FFN's width, or each expert's
    n_experts: int = 8  # E (MoE only)
    top_k: int = 1  # K (MoE only)
    renormalize: bool = False  # divide the K routing weights by their sum
    activation: str = "swiglu"
    balance_loss_weight: float = 0.01  # Switch's alpha
    z_loss_weight: float = 0.0  # ST-MoE router z-loss; 0 turns it off

    def __post_init__(self) -> None:
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn: expected one of {FFN_KINDS}, got {self.ffn!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.top_k not in (1, 2) or self.top_k > self.n_experts:
            raise ValueError(f"top_k: expected 1 or 2 and at most n_experts={self.n_experts}, got {self.top_k}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}")

    @property
    def is_moe(self) -> bool:
        return self.ffn == "moe"


def default_renormalize(top_k: int) -> bool:
    """k = 1: the router probability (Switch); k = 2: weights summing to 1 (GShard, Mixtral)."""
    return top_k == 2


def expert_capacity(capacity_factor: Optional[float], n_tokens: int, top_k: int, n_experts: int) -> Optional[int]:
    """C, by topk_moe.capacity itself, so the PyTorch layer drops exactly what the kernels drop."""
    if capacity_factor is None:
        return None
    # d_model and d_ff don't enter the capacity; 1 satisfies MoEConfig's checks.
    cfg = topk_moe.MoEConfig(1, 1, n_experts, top_k, capacity_factor=capacity_factor)
    return topk_moe.capacity(cfg, n_tokens)


def _activate(hidden: torch.Tensor, gate: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F_nn.silu(hidden) * gate
    if activation == "gelu":
        return F_nn.gelu(hidden)  # the exact erf form, as the contract's gelu
    return F_nn.relu(hidden)


@dataclass
class LayerRouting:
    """What one MoE layer's router did on one call (tensors, detached).

    experts (T, K) int64, weights (T, K), probs (T, E), logits (T, E),
    kept (T, K) bool: False where the capacity dropped the assignment.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    kept: torch.Tensor


class DenseFFN(nn.Module):
    """act(h @ w1) @ w2, or (silu(h @ w1) * (h @ w3)) @ w2: topk_moe.dense_mlp's layout."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(d_model, d_ff)) if activation == "swiglu" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = h @ self.w3 if self.w3 is not None else None
        return _activate(h @ self.w1, gate, self.activation) @ self.w2


class MoELayer(nn.Module):
    """Top-k MoE with the contract's semantics (see the module docstring)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, renormalize: bool, activation: str):
        super().__init__()
        self.n_experts, self.top_k, self.renormalize, self.activation = n_experts, top_k, renormalize, activation
        self.router = nn.Parameter(torch.empty(d_model, n_experts))
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_ff)) if activation == "swiglu" else None

    def route(self, h: torch.Tensor, top_k: int, renormalize: bool):
        """(experts (T, K), weights (T, K), probs (T, E), logits (T, E)) for h (T, D)."""
        logits = h @ self.router
        probs = torch.softmax(logits.float(), dim=-1)
        # argmax returns the first maximum, so ties go to the smaller index;
        # masking the winner and asking again gives the runner-up by the same rule.
        first = torch.argmax(logits, dim=-1)
        if top_k == 1:
            experts = first[:, None]
        else:
            masked = logits.detach().clone()
            masked[torch.arange(logits.shape[0]), first] = -torch.inf
            experts = torch.stack([first, torch.argmax(masked, dim=-1)], dim=1)
        weights = probs.gather(1, experts)
        if renormalize:
            weights = weights / weights.sum(dim=1, keepdim=True)
        return experts, weights.to(h.dtype), probs, logits

    def kept_mask(self, experts: torch.Tensor, capacity: Optional[int], *, calls: int = 1) -> torch.Tensor:
        """(T, K) bool: see ``kept_mask``."""
        return kept_mask(experts, self.n_experts, capacity, calls=calls)

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        gate = h @ self.w3[e] if self.w3 is not None else None
        return _activate(h @ self.w1[e], gate, self.activation) @ self.w2[e]

    def forward(self, h: torch.Tensor, *, top_k: Optional[int] = None, renormalize: Optional[bool] = None,
                capacity_factor: Optional[float] = None, calls: int = 1):
        """h (T, D) -> (y (T, D), LayerRouting, experts, probs, logits with grad for the losses).

        ``calls``: the T tokens are cut into this many capacity calls, token t in call
        t % calls (see ``kept_mask``); 1, the default, is the kernels' one call of T tokens."""
        top_k = self.top_k if top_k is None else top_k
        renormalize = self.renormalize if renormalize is None else renormalize
        experts, weights, probs, logits = self.route(h, top_k, renormalize)
        if h.shape[0] % calls:
            raise ValueError(f"calls: expected a divisor of the {h.shape[0]} tokens, got {calls}")
        capacity = expert_capacity(capacity_factor, h.shape[0] // calls, top_k, self.n_experts)
        kept = self.kept_mask(experts, capacity, calls=calls)
        y = torch.zeros_like(h)
        for e in range(self.n_experts):
            token, choice = torch.nonzero((experts == e) & kept, as_tuple=True)
            if token.numel() == 0:
                continue
            out = self.expert(e, h[token]) * weights[token, choice, None]
            y = y.index_add(0, token, out)
        routing = LayerRouting(experts=experts.detach(), weights=weights.detach(), probs=probs.detach(),
                               logits=logits.detach(), kept=kept)
        return y, routing, experts, probs, logits


def kept_mask(experts: torch.Tensor, n_experts: int, capacity: Optional[int], *, calls: int = 1) -> torch.Tensor:
    """(T, K) bool: assignment (t, j) is among the first `capacity` arrivals at its expert
    within its call, arrivals ordered j-major (topk_moe.dispatch's rule).

    The T tokens form ``calls`` calls of T / calls tokens each, token t in call
    t % calls, in increasing t within the call. With (batch, position) flattened
    and calls = S, call s holds position s of every sequence (the causal scope);
    calls = 1 is one call of all T tokens, exactly topk_moe.dispatch on them.
    """
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    T, K = experts.shape
    if T % calls:
        raise ValueError(f"calls: expected a divisor of T = {T}, got {calls}")
    per_call = T // calls
    # (per_call, calls, K) -> (calls, K, per_call): each call's arrivals j-major, then in token order.
    arrivals = experts.reshape(per_call, calls, K).permute(1, 2, 0).reshape(calls, K * per_call)
    one_hot = F_nn.one_hot(arrivals, n_experts)
    rank = (one_hot.cumsum(dim=1) - 1).gather(2, arrivals[..., None])[..., 0]
    return (rank < capacity).reshape(calls, K, per_call).permute(2, 0, 1).reshape(T, K)


def balance_loss(experts: torch.Tensor, probs: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss for one layer, E * sum_e f_e * P_e.

    f_e: the fraction of all T*K assignments (both choices pooled when K = 2) that
    went to expert e, so sum_e f_e = 1 (no gradient); P_e: the mean router
    probability of e over the T tokens. Equals 1 when both are uniform, for K = 1
    and K = 2 alike; its gradient pushes probability away from overloaded experts.
    For K = 1 it is Switch's loss (Fedus et al., eq. 4-6).

    For K = 2 it is half of Hugging Face's Mixtral loss (transformers'
    ``load_balancing_loss_func``), which takes f per choice, a (K, E) table whose
    row j is the fraction of the T tokens whose j-th choice is e, and sums all K
    rows: E * sum_j sum_e f_je * P_e, which equals K (2 here) when uniform. The same
    weight therefore pushes half as hard here. (That function also pools every
    layer's tokens into one loss; ByteTransformer averages this per-layer loss
    over its MoE layers.)
    """
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return n_experts * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attention_norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.attention_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        if cfg.is_moe:
            self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.renormalize, cfg.activation)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(D, dim=-1)
        q, k, v = (t.reshape(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        out = F_nn.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attention_out(out.transpose(1, 2).reshape(B, S, D))


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, vocab)
    loss: Optional[torch.Tensor]  # mean cross-entropy in nats, when targets were given
    aux_loss: torch.Tensor  # weighted balancing + z losses (0 for dense)
    balance_loss: torch.Tensor  # unweighted, mean over MoE layers
    z_loss: torch.Tensor  # unweighted, mean over MoE layers
    routing: list  # LayerRouting per MoE layer, in layer order


#: ffn_override(layer_index, ffn_module, h (T, D)) -> y (T, D): replaces a block's FFN call.
FFNOverride = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


class ByteTransformer(nn.Module):
    """Pre-LayerNorm decoder: byte embedding + learned positions, blocks of causal
    attention then FFN (dense or MoE), final LayerNorm, output tied to the embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Parameter(torch.empty(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal weights with std 1/sqrt(fan-in); residual outputs (attention_out, w2)
        further divided by sqrt(2 * layers), as in GPT-2; embeddings and router small."""
        cfg = self.cfg
        residual_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(block.attention_out.weight, std=cfg.d_model ** -0.5 * residual_scale)
            ffn = block.ffn
            for name in ("w1", "w3"):
                if getattr(ffn, name) is not None:
                    nn.init.normal_(getattr(ffn, name), std=cfg.d_model ** -0.5)
            nn.init.normal_(ffn.w2, std=cfg.d_ff ** -0.5 * residual_scale)
            if isinstance(ffn, MoELayer):
                nn.init.normal_(ffn.router, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                top_k: Optional[int] = None, renormalize: Optional[bool] = None,
                capacity_factor: Optional[float] = None, capacity_scope: str = "position",
                ffn_override: Optional[FFNOverride] = None) -> ModelOutput:
        """tokens (B, S) int64 -> ModelOutput. ``top_k``, ``renormalize`` and
        ``capacity_factor`` override the MoE layers' settings (inference experiments);
        ``capacity_scope`` says which tokens share a capacity (module docstring)."""
        cfg = self.cfg
        B, S = tokens.shape
        if capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope: expected one of {CAPACITY_SCOPES}, got {capacity_scope!r}")
        # Flattened (batch, position): token b * S + s is in call (b * S + s) % S = s.
        calls = S if capacity_scope == "position" else 1
        x = self.embedding(tokens) + self.position[:S]
        zero = x.new_zeros(())
        balance_terms, z_terms, routing = [], [], []
        for index, block in enumerate(self.blocks):
            x = x + block.attention(x)
            h = block.ffn_norm(x).reshape(B * S, cfg.d_model)
            if ffn_override is not None:
                y = ffn_override(index, block.ffn, h)
            elif isinstance(block.ffn, MoELayer):
                y, layer_routing, experts, probs, logits = block.ffn(
                    h, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor, calls=calls)
                routing.append(layer_routing)
                balance_terms.append(balance_loss(experts, probs, cfg.n_experts))
                z_terms.append(router_z_loss(logits))
            else:
                y = block.ffn(h)
            x = x + y.reshape(B, S, cfg.d_model)
        logits = self.final_norm(x) @ self.embedding.weight.T
        balance = torch.stack(balance_terms).mean() if balance_terms else zero
        z = torch.stack(z_terms).mean() if z_terms else zero
        aux = cfg.balance_loss_weight * balance + cfg.z_loss_weight * z
        loss = None
        if targets is not None:
            loss = F_nn.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), targets.reshape(-1))
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, balance_loss=balance.detach(),
                           z_loss=z.detach(), routing=routing)

    def moe_layers(self) -> list:
        """(layer index, MoELayer) for every MoE block."""
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)]


def parameter_counts(cfg: ModelConfig) -> dict:
    """Total and active (per token) parameters, FFN and router included, embeddings included once."""
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    matrices = 3 if cfg.activation == "swiglu" else 2
    per_expert = matrices * D * F
    attention = 4 * D * D + 4 * D  # qkv, out, two LayerNorms
    if cfg.is_moe:
        ffn_total, ffn_active, router = E * per_expert, cfg.top_k * per_expert, D * E
    else:
        ffn_total, ffn_active, router = per_expert, per_expert, 0
    shared = cfg.vocab_size * D + cfg.seq_len * D + 2 * D
    per_layer_total = attention + ffn_total + router
    per_layer_active = attention + ffn_active + router
    return {
        "total": shared + cfg.n_layers * per_layer_total,
        "active": shared + cfg.n_layers * per_layer_active,
        "ffn_total": cfg.n_layers * ffn_total,
        "ffn_active": cfg.n_layers * ffn_active,
    }


# ---------------------------------------------------------------- kernels interchange


def _float32_numpy(parameter: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if parameter is None else parameter.detach().to(torch.float32).cpu().numpy().copy()


def to_kernels(layer: MoELayer):
    """(topk_moe.MoEConfig, topk_moe.MoEWeights) holding this layer's weights as float32 NumPy."""
    import topk_moe

    D, E = layer.router.shape
    F = layer.w1.shape[2]
    cfg = topk_moe.MoEConfig(d_model=D, d_ff=F, n_experts=E, top_k=layer.top_k,
                            activation=layer.activation, renormalize=bool(layer.renormalize))
    weights = topk_moe.MoEWeights(router=_float32_numpy(layer.router), w1=_float32_numpy(layer.w1),
                                 w2=_float32_numpy(layer.w2), w3=_float32_numpy(layer.w3))
    return cfg, weights


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path, model: ByteTransformer, meta: dict) -> Path:
    """Weights only, as float16 (half the bytes; what is saved is what gets evaluated:
    see ``round_to_checkpoint``), with the model config and ``meta`` beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(torch.float16).cpu().clone() for name, tensor in model.state_dict().items()}
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": dataclasses.asdict(model.cfg), "state_dict": state, "meta": dict(meta)}, temporary)
    temporary.replace(path)  # a checkpoint file is either whole or absent
    return path


@torch.no_grad()
def round_to_checkpoint(model: ByteTransformer) -> None:
    """Round the weights in place to what ``save_checkpoint`` stores (float16), so a
    model evaluated right after training scores exactly as its checkpoint will."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))


def load_checkpoint(path, *, device: str = "cpu"):
    """(ByteTransformer in float32 eval mode, meta dict) from ``save_checkpoint``'s file."""
    blob = torch.load(Path(path), map_location=device, weights_only=True)
    model = ByteTransformer(ModelConfig(**blob["config"]))
    model.load_state_dict({name: tensor.to(torch.float32) for name, tensor in blob["state_dict"].items()})
    model.to(device).eval()
    return model, dict(blob["meta"])


def numpy_routing(routing: LayerRouting) -> dict:
    """A LayerRouting as NumPy arrays (experts int32, as the contract has them)."""
    return {
        "experts": routing.experts.cpu().numpy().astype(np.int32),
        "weights": routing.weights.float().cpu().numpy(),
        "probs": routing.probs.float().cpu().numpy(),
        "kept": routing.kept.cpu().numpy(),
    }
