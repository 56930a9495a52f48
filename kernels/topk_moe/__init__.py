"""Top-k Mixture-of-Experts routing kernels.

The public surface is the contract in book/contract.md (the book's chapter
"The contract"): one set of functions, four backends ("reference": float64
NumPy, the specification; "cpu": the fast vectorised baseline; "cuda": CuPy
raw CUDA where a GPU is present; "cuda-emulated": the same CUDA kernels on the
CPU, for testing: slow). Importing this package never imports CuPy.
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
