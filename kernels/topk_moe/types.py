"""The data types of the contract: the layer's configuration, its weights, and
the three results (Routing, DispatchPlan, MoEOutput).

Dimension letters, as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token, C expert capacity, N kept assignments.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

ACTIVATIONS = ("relu", "gelu", "swiglu")
TOP_K_CHOICES = (1, 2)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return int(value)


@dataclass(frozen=True)
class MoEConfig:
    """Shape and semantics of one MoE layer.

    d_model (D), d_ff (F, the hidden width of each expert), n_experts (E),
    top_k (K, 1 or 2), activation ("relu", "gelu" or "swiglu"), renormalize
    (divide the K routing weights by their sum), capacity_factor (None for
    dropless routing, else > 0: each expert keeps at most
    ceil(capacity_factor * T * K / E) assignments).

    The configuration checks itself when it is made, so a bad value fails
    where it was written rather than deep inside a kernel.
    """

    d_model: int
    d_ff: int
    n_experts: int
    top_k: int
    activation: str = "swiglu"
    renormalize: bool = True
    capacity_factor: Optional[float] = None

    def __post_init__(self) -> None:
        _positive_int("d_model", self.d_model)
        _positive_int("d_ff", self.d_ff)
        _positive_int("n_experts", self.n_experts)
        if isinstance(self.top_k, bool) or self.top_k not in TOP_K_CHOICES:
            raise ValueError(f"top_k: expected 1 or 2, got {self.top_k!r}")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k: expected at most n_experts={self.n_experts}, got {self.top_k}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.renormalize, (bool, np.bool_)):
            raise TypeError(f"renormalize: expected a bool, got {self.renormalize!r}")
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, numbers.Real):
                raise TypeError(
                    f"capacity_factor: expected None or a number > 0, got {self.capacity_factor!r}"
                )
            if not math.isfinite(self.capacity_factor) or self.capacity_factor <= 0:
                raise ValueError(
                    f"capacity_factor: expected None or a finite number > 0, got {self.capacity_factor!r}"
                )

    @property
    def has_gate(self) -> bool:
        """True when the expert needs the third matrix w3 (SwiGLU's gate)."""
        return self.activation == "swiglu"


@dataclass(frozen=True)
class MoEWeights:
    """The layer's parameters: router (D, E), w1 and w3 (E, D, F), w2 (E, F, D).

    w3 is present exactly when the activation is "swiglu". Shapes are checked
    against a config where the weights are used (moe_forward), since the
    same arrays may serve several configs (say, k = 1 and k = 2).
    """

    router: Any
    w1: Any
    w2: Any
    w3: Any = None


@dataclass(frozen=True)
class Routing:
    """What the router decided for each token.

    experts (T, K) int32: the K largest logits in descending order, ties to
    the smaller expert index. weights (T, K): the softmax probabilities of
    those experts, renormalised to sum to 1 when asked. probs (T, E): the
    full softmax.
    """

    experts: Any
    weights: Any
    probs: Any


@dataclass(frozen=True)
class DispatchPlan:
    """Where each (token, choice) assignment goes in the expert-sorted batch.

    counts (E,) int64 kept rows per expert; offsets (E+1,) int64 exclusive
    prefix sum (expert e owns rows offsets[e]:offsets[e+1], offsets[E] == N);
    token (N,) int64, the token of each row; row (T, K) int64, the row of
    assignment (t, j), or -1 where the capacity dropped it.
    """

    counts: Any
    offsets: Any
    token: Any
    row: Any

    @property
    def n_kept(self) -> int:
        """N, the number of kept assignments (rows of the expert batch)."""
        return int(self.token.shape[0])


@dataclass(frozen=True)
class MoEOutput:
    """moe_forward's result: y (T, D) and the routing and plan that made it."""

    y: Any
    routing: Routing
    plan: DispatchPlan
