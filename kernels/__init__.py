"""Top-k Mixture-of-Experts routing kernels.

The public surface is the contract in shared/design/contract.md: one set of
functions, three backends ("reference": float64 NumPy, the specification;
"cpu": the fast vectorised baseline; "cuda": CuPy raw CUDA where a GPU is
present). Importing this package never imports CuPy.
"""

from .api import (
    capacity,
    combine,
    dense_mlp,
    dispatch,
    expert_mlp,
    init_weights,
    moe_forward,
    permute,
    route,
)
from .backends import available_backends
from .types import DispatchPlan, MoEConfig, MoEOutput, MoEWeights, Routing

__all__ = [
    "MoEConfig",
    "MoEWeights",
    "Routing",
    "DispatchPlan",
    "MoEOutput",
    "init_weights",
    "route",
    "dispatch",
    "permute",
    "expert_mlp",
    "combine",
    "moe_forward",
    "dense_mlp",
    "capacity",
    "available_backends",
]
