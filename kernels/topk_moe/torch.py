"""The contract on torch tensors: ``topk_moe.torch``.

Importing ``topk_moe`` never imports torch; this module does (and CuPy only
when a CUDA tensor arrives). Tensors cross to the backends without a copy:

- a CPU tensor becomes a NumPy view of the same memory (``Tensor.numpy()``),
  and a NumPy result becomes a tensor over the same memory (``torch.from_numpy``);
- a CUDA tensor becomes a CuPy array through DLPack, exchanged on the current
  torch stream, and a CuPy result comes back through DLPack the same way.

Everything here is inference only: a tensor that requires grad while grad
mode is on is refused, since the backends compute no gradient and a result
that silently has none would be wrong.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import numpy as np
import torch  # the real torch: absolute import, this module is topk_moe.torch

from . import api
from .api import capacity
from .backends import DEFAULT_BACKEND, ENV_VARIABLE, KNOWN_BACKENDS
from .hf import SharedExpert, read_block
from .types import DispatchPlan, MoEConfig, MoEOutput, MoEWeights, Routing

__all__ = [
    "as_array", "as_tensor",
    "init_weights", "route", "dispatch", "permute", "expert_mlp", "combine", "moe_forward", "dense_mlp",
    "capacity", "MoELayer", "SharedExpert", "MoEConfig", "MoEWeights", "Routing", "DispatchPlan", "MoEOutput",
]


def _check_tensor(name: str, tensor: Any) -> "torch.Tensor":
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}: expected a tensor that does not require grad (topk_moe computes no gradients), "
            f"got one with requires_grad=True while grad mode is on; "
            f"call it under torch.no_grad() or torch.inference_mode(), or pass tensor.detach()"
        )
    if tensor.dtype == torch.bfloat16:
        raise TypeError(
            f"{name}: expected float32, float16 or float64, got torch.bfloat16 "
            f"(no topk_moe backend takes bfloat16: NumPy and CuPy have no bfloat16 dtype)"
        )
    if not (tensor.is_cpu or tensor.is_cuda):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {tensor.device}")
    return tensor


@contextlib.contextmanager
def cuda_stream(device: "torch.device") -> Iterator[None]:
    """Make CuPy work on ``device`` and on torch's current stream there.

    Inside, CuPy's current device is ``device`` and its current stream is torch's
    current stream on it (wrapped, not created: cupy.cuda.ExternalStream), so
    kernels launched by the cuda backend are ordered with the caller's torch
    work and no host synchronisation is added. A no-op for CPU devices.
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    import cupy  # noqa: PLC0415 - only where a CUDA tensor arrives

    index = device.index if device.index is not None else torch.cuda.current_device()
    torch_stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index):
        with cupy.cuda.ExternalStream(torch_stream.cuda_stream, index):
            yield


def as_array(tensor: "torch.Tensor", name: str = "tensor") -> Any:
    """The backends' array over the same memory as ``tensor``, no copy.

    CPU: a NumPy view (``tensor.numpy()``; writes through either are seen by
    both). CUDA: a CuPy array through DLPack on the current torch stream of
    the tensor's device. Refused: a tensor that requires grad while grad mode
    is on (ValueError), bfloat16 (TypeError), other devices (ValueError).
    ``name`` is the argument named in those messages.
    """
    tensor = _check_tensor(name, tensor)
    with _on_stream(tensor.device):
        return _view(tensor)


def as_tensor(array: Any, device: Optional[Any] = None) -> "torch.Tensor":
    """A torch tensor over the same memory as ``array``, no copy.

    NumPy arrays become CPU tensors (``torch.from_numpy``; a read-only array is
    copied, since torch has no read-only tensors); CuPy arrays become
    CUDA tensors on their own device (``torch.from_dlpack``, on torch's current
    stream). ``device``, when given, is where the caller expects the result: a
    tensor that would land elsewhere is a ValueError rather than a silent copy.
    """
    if isinstance(array, np.ndarray):
        if not array.flags.writeable:
            # torch has no read-only tensors (from_numpy would warn and hand out
            # writable memory): such an array is copied. No backend returns one.
            array = array.copy()
        tensor = torch.from_numpy(array)
    elif hasattr(array, "__dlpack__") and hasattr(array, "__cuda_array_interface__"):
        device_id = array.device.id
        with cuda_stream(torch.device("cuda", device_id)):
            tensor = torch.from_dlpack(array)
    else:
        raise TypeError(f"array: expected a NumPy or CuPy array, got {type(array).__name__}")
    if device is not None:
        expected = torch.device(device)
        if expected.type == "cuda" and expected.index is None:
            expected = torch.device("cuda", torch.cuda.current_device())
        if tensor.device != expected:
            raise ValueError(f"device: expected the array to live on {expected}, got an array on {tensor.device}")
    return tensor


# -- the contract's functions on tensors ---------------------------------------

#: The arguments that may be None (the gate, absent for relu and gelu).
_OPTIONAL = frozenset({"w3", "weights.w3"})


def _checked_device(tensors: dict) -> "torch.device":
    """Check every tensor argument (None only for the optional ones) and return
    their one device (ValueError when they differ)."""
    first_name = first_device = None
    for name, tensor in tensors.items():
        if tensor is None and name in _OPTIONAL:
            continue
        _check_tensor(name, tensor)
        if first_device is None:
            first_name, first_device = name, tensor.device
        elif tensor.device != first_device:
            raise ValueError(
                f"{name}: expected a tensor on {first_device} (the device of {first_name}), got one on {tensor.device}"
            )
    return first_device


def _backend_for(device: "torch.device", backend: Optional[str]) -> Optional[str]:
    """The backend a call on ``device`` runs: results come back on the tensors' own device.

    CUDA tensors run on "cuda" (the default for them). CPU tensors run on a host
    backend: ``backend``, or $MOE_BACKEND, or "cpu", as in ``topk_moe``; "cuda"
    would return CUDA results for CPU tensors, so it is refused.
    """
    if device.type == "cuda":
        if backend not in (None, "cuda"):
            raise ValueError(
                f"backend: expected 'cuda' (or None) for tensors on {device}, got {backend!r} "
                f"(the other backends run on the host: move the tensors to the CPU for them)"
            )
        return "cuda"
    source = "backend"
    name = backend
    if name is None:
        name = os.environ.get(ENV_VARIABLE) or DEFAULT_BACKEND
        source = f"backend (from ${ENV_VARIABLE})" if os.environ.get(ENV_VARIABLE) else "backend"
    if name == "cuda":
        raise ValueError(
            f"{source}: expected a host backend ('reference', 'cpu' or 'cuda-emulated') for CPU tensors, "
            f"got 'cuda' (move the tensors to a CUDA device to run the cuda backend)"
        )
    return backend


def _on_stream(device: "torch.device"):
    """``cuda_stream(device)`` for CUDA tensors; for CPU ones nothing (and no cost)."""
    return cuda_stream(device) if device.type == "cuda" else contextlib.nullcontext()


def _tensor(array: Any) -> "torch.Tensor":
    """A backend's result array as a tensor (no copy); the backend ran where the inputs live."""
    if isinstance(array, np.ndarray) and array.flags.writeable:
        return torch.from_numpy(array)
    return as_tensor(array)


def _routing_tensors(routing: Routing) -> Routing:
    return Routing(experts=_tensor(routing.experts), weights=_tensor(routing.weights), probs=_tensor(routing.probs))


def _plan_tensors_from(plan: DispatchPlan) -> DispatchPlan:
    return DispatchPlan(counts=_tensor(plan.counts), offsets=_tensor(plan.offsets), token=_tensor(plan.token),
                        row=_tensor(plan.row))


def _view(tensor: "torch.Tensor") -> Any:
    """as_array for a tensor already checked, inside ``_on_stream`` of its device."""
    if tensor.requires_grad:  # only under no_grad or inference mode, once checked
        tensor = tensor.detach()
    if tensor.is_cpu:
        return tensor.numpy()
    import cupy  # noqa: PLC0415 - only where a CUDA tensor arrives

    # cupy.from_dlpack passes CuPy's current stream (torch's, inside _on_stream)
    # to tensor.__dlpack__, so the producer orders the exchange on that stream.
    return cupy.from_dlpack(tensor)


def _arrays(tensors: dict) -> dict:
    return {name: None if t is None else _view(t) for name, t in tensors.items()}


def _weights_as_arrays(weights: MoEWeights) -> dict:
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected a topk_moe.MoEWeights of tensors, got {type(weights).__name__}")
    return {"weights.router": weights.router, "weights.w1": weights.w1,
            "weights.w2": weights.w2, "weights.w3": weights.w3}


def _plan_tensors(plan: DispatchPlan) -> dict:
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan: expected a topk_moe.DispatchPlan, got {type(plan).__name__}")
    return {"plan.counts": plan.counts, "plan.offsets": plan.offsets, "plan.token": plan.token, "plan.row": plan.row}


def _plan_from(arrays: dict) -> DispatchPlan:
    return DispatchPlan(**{name[len("plan."):]: a for name, a in arrays.items() if name.startswith("plan.")})


def route(x, router, k: int, *, renormalize: bool = True, backend: Optional[str] = None,
          check_finite: bool = True) -> Routing:
    """``topk_moe.route`` on tensors: x (T, D), router (D, E) -> Routing of tensors on x's device."""
    tensors = {"x": x, "router": router}
    device = _checked_device(tensors)
    backend = _backend_for(device, backend)
    with _on_stream(device):
        a = _arrays(tensors)
        result = api.route(a["x"], a["router"], k, renormalize=renormalize, backend=backend,
                           check_finite=check_finite)
        return _routing_tensors(result)


def dispatch(experts, n_experts: int, *, capacity: Optional[int] = None,
             backend: Optional[str] = None) -> DispatchPlan:
    """``topk_moe.dispatch`` on tensors: experts (T, K) int32 -> DispatchPlan of int64 tensors."""
    device = _checked_device({"experts": experts})
    backend = _backend_for(device, backend)
    with _on_stream(device):
        result = api.dispatch(_view(experts), n_experts, capacity=capacity, backend=backend)
        return _plan_tensors_from(result)


def permute(x, plan: DispatchPlan, *, backend: Optional[str] = None):
    """``topk_moe.permute`` on tensors: row i of the result is x[plan.token[i]]. -> (N, D)"""
    tensors = {"x": x, **_plan_tensors(plan)}
    device = _checked_device(tensors)
    backend = _backend_for(device, backend)
    with _on_stream(device):
        a = _arrays(tensors)
        return _tensor(api.permute(a["x"], _plan_from(a), backend=backend))


def expert_mlp(rows, plan: DispatchPlan, w1, w2, w3=None, *, activation: str = "swiglu",
               backend: Optional[str] = None):
    """``topk_moe.expert_mlp`` on tensors: rows (N, D), w1 and w3 (E, D, F), w2 (E, F, D) -> (N, D)."""
    tensors = {"rows": rows, "w1": w1, "w2": w2, "w3": w3, **_plan_tensors(plan)}
    device = _checked_device(tensors)
    backend = _backend_for(device, backend)
    with _on_stream(device):
        a = _arrays(tensors)
        result = api.expert_mlp(a["rows"], _plan_from(a), a["w1"], a["w2"], a["w3"],
                                activation=activation, backend=backend)
        return _tensor(result)


def combine(expert_out, routing: Routing, plan: DispatchPlan, *, backend: Optional[str] = None):
    """``topk_moe.combine`` on tensors: y[t] = sum over kept j of weights[t, j] * expert_out[row[t, j]]."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing: expected a topk_moe.Routing, got {type(routing).__name__}")
    tensors = {"expert_out": expert_out, "routing.experts": routing.experts, "routing.weights": routing.weights,
               "routing.probs": routing.probs, **_plan_tensors(plan)}
    device = _checked_device(tensors)
    backend = _backend_for(device, backend)
    with _on_stream(device):
        a = _arrays(tensors)
        arrays_routing = Routing(experts=a["routing.experts"], weights=a["routing.weights"], probs=a["routing.probs"])
        return _tensor(api.combine(a["expert_out"], arrays_routing, _plan_from(a), backend=backend))


def moe_forward(x, weights: MoEWeights, cfg: MoEConfig, *, backend: Optional[str] = None,
                check_finite: bool = True) -> MoEOutput:
    """``topk_moe.moe_forward`` on tensors: the whole layer. x (T, D) and a MoEWeights of
    tensors on one device -> MoEOutput of tensors there (y in the backend's dtype)."""
    tensors = {"x": x, **_weights_as_arrays(weights)}
    device = _checked_device(tensors)
    backend = _backend_for(device, backend)
    with _on_stream(device):
        a = _arrays(tensors)
        array_weights = MoEWeights(router=a["weights.router"], w1=a["weights.w1"], w2=a["weights.w2"],
                                   w3=a["weights.w3"])
        result = api.moe_forward(a["x"], array_weights, cfg, backend=backend, check_finite=check_finite)
        return MoEOutput(y=_tensor(result.y), routing=_routing_tensors(result.routing),
                         plan=_plan_tensors_from(result.plan))


def dense_mlp(x, w1, w2, w3=None, *, activation: str = "relu", backend: Optional[str] = None):
    """``topk_moe.dense_mlp`` on tensors: x (T, D), w1 and w3 (D, F), w2 (F, D) -> (T, D)."""
    tensors = {"x": x, "w1": w1, "w2": w2, "w3": w3}
    device = _checked_device(tensors)
    backend = _backend_for(device, backend)
    with _on_stream(device):
        a = _arrays(tensors)
        return _tensor(api.dense_mlp(a["x"], a["w1"], a["w2"], a["w3"], activation=activation, backend=backend))


_TORCH_TO_NUMPY_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def init_weights(cfg: MoEConfig, *, seed: int = 0, dtype: "torch.dtype" = torch.float32,
                 device: Any = "cpu") -> MoEWeights:
    """``topk_moe.init_weights`` as tensors: the same numbers for the same seed, on ``device``."""
    if dtype not in _TORCH_TO_NUMPY_FLOATS:
        raise TypeError(f"dtype: expected torch.float16, torch.float32 or torch.float64, got {dtype}")
    arrays = api.init_weights(cfg, seed=seed, dtype=_TORCH_TO_NUMPY_FLOATS[dtype])
    device = torch.device(device)

    def tensor(a):
        return None if a is None else torch.from_numpy(a).to(device)

    return MoEWeights(router=tensor(arrays.router), w1=tensor(arrays.w1), w2=tensor(arrays.w2), w3=tensor(arrays.w3))


# -- the layer as a torch module -------------------------------------------------

class MoELayer(torch.nn.Module):
    """The contract's MoE layer as a ``torch.nn.Module``, for inference.

    ``MoELayer(weights, cfg, backend=None)`` holds ``weights`` (a MoEWeights of
    tensors in the contract's layout) as buffers, so ``.to(device)`` and
    ``state_dict()`` carry them, and computes ``moe_forward`` where the input
    lives: CUDA hidden states on the "cuda" backend, CPU ones on ``backend``
    (None: $MOE_BACKEND, else "cpu"). ``forward`` takes hidden states
    (..., D) and returns (..., D) in their dtype.

    Inference only: with grad mode on and an input that requires grad, forward
    raises ValueError (the backends compute no gradient; a result silently
    without one would train nothing). Run it under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (``generate`` does).

    ``check_finite`` (an attribute too) is moe_forward's: False skips the
    NaN/infinity check, and with it the host's wait for the router kernel's
    flag; only the "cuda" backend takes False (CUDA graphs, timing).

    ``shared_expert`` (a SharedExpert of tensors, Qwen2-MoE's) adds
    ``sigmoid(x @ gate) * dense_mlp(x, w1, w2, w3, activation="swiglu")`` to the
    routed experts' output: the dense MLP on the backend, the gate in torch.

    ``MoELayer.from_hf(block)`` replaces a transformers sparse MoE block.
    """

    def __init__(self, weights: MoEWeights, cfg: MoEConfig, *, backend: Optional[str] = None,
                 shared_expert: Optional[SharedExpert] = None, returns_router_logits: bool = False,
                 jitter_noise: float = 0.0, check_finite: bool = True):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a topk_moe.MoEConfig, got {type(cfg).__name__}")
        tensors = _weights_as_arrays(weights)
        if shared_expert is not None:
            if not isinstance(shared_expert, SharedExpert):
                raise TypeError(f"shared_expert: expected None or a topk_moe.torch.SharedExpert, "
                                f"got {type(shared_expert).__name__}")
            tensors.update({f"shared_expert.{name}": getattr(shared_expert, name)
                            for name in ("w1", "w2", "w3", "gate")})
            if shared_expert.gate.shape != (cfg.d_model, 1):
                raise ValueError(f"shared_expert.gate: expected shape (D, 1) = ({cfg.d_model}, 1), "
                                 f"got {tuple(shared_expert.gate.shape)}")
        _checked_device(tensors)
        if backend is not None and backend not in KNOWN_BACKENDS:
            raise ValueError(f"backend: expected None or one of {KNOWN_BACKENDS}, got {backend!r}")
        self.cfg = cfg
        self.backend = backend
        self.returns_router_logits = bool(returns_router_logits)
        self.jitter_noise = float(jitter_noise)
        self.check_finite = check_finite
        for name in ("router", "w1", "w2", "w3"):
            tensor = getattr(weights, name)
            self.register_buffer(name, None if tensor is None else tensor.detach())
        for name in ("w1", "w2", "w3", "gate"):
            tensor = None if shared_expert is None else getattr(shared_expert, name)
            self.register_buffer(f"shared_{name}", None if tensor is None else tensor.detach())

    @classmethod
    def from_hf(cls, block: "torch.nn.Module", backend: Optional[str] = None) -> "MoELayer":
        """A drop-in for a transformers sparse MoE block: same forward signature
        (``forward(hidden_states)``) and return value as the block.

        Reads Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE blocks of transformers 5.x
        (fused ``gate_up_proj``/``down_proj`` experts; they return the output
        tensor) and of 4.x (per-expert ``w1``/``w2``/``w3`` or
        ``gate_proj``/``up_proj``/``down_proj`` linears; they return
        ``(output, router_logits)``), keeping the block's renormalisation rule
        (``norm_topk_prob``; Mixtral always renormalises). The weights are
        copied once, into the contract's layout, on the block's device.

        Qwen2-MoE's shared expert is kept (see ``shared_expert``).
        Unsupported, with an error naming it: top-k other than 1 or 2, activations other than SiLU-gated, biases, bfloat16
        weights, router jitter (raised by forward in training mode, where
        Mixtral applies it). Router logits are not recorded by transformers'
        ``output_router_logits`` hooks, which watch the replaced router module.
        """
        reading = read_block(block)
        layer = cls(reading.weights, reading.cfg, backend=backend, shared_expert=reading.shared_expert,
                    returns_router_logits=reading.returns_router_logits, jitter_noise=reading.jitter_noise)
        layer.train(block.training)
        return layer

    @property
    def weights(self) -> MoEWeights:
        """The buffers as a MoEWeights (views, no copy)."""
        return MoEWeights(router=self.router, w1=self.w1, w2=self.w2, w3=self.w3)

    def forward(self, hidden_states: "torch.Tensor"):
        if self.training and self.jitter_noise > 0:
            raise ValueError(
                f"MoELayer: router jitter (jitter_noise={self.jitter_noise}) is applied in training mode, "
                f"which topk_moe does not support; call model.eval() for inference"
            )
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "hidden_states: MoELayer is inference only (topk_moe computes no gradients), got an input that "
                "requires grad while grad mode is on; run the model under torch.no_grad() or "
                "torch.inference_mode()"
            )
        shape = hidden_states.shape
        if hidden_states.ndim < 1 or shape[-1] != self.cfg.d_model:
            raise ValueError(f"hidden_states: expected shape (..., D) with D = {self.cfg.d_model}, got {tuple(shape)}")
        x = hidden_states.reshape(-1, self.cfg.d_model)
        y = moe_forward(x, self.weights, self.cfg, backend=self.backend, check_finite=self.check_finite).y
        if self.shared_w1 is not None:  # Qwen2-MoE: routed experts + sigmoid(x @ gate) * shared expert
            shared = dense_mlp(x, self.shared_w1, self.shared_w2, self.shared_w3, activation="swiglu",
                               backend=self.backend)
            y = y + torch.sigmoid(x @ self.shared_gate.to(x.dtype)).to(y.dtype) * shared
        if y.dtype != hidden_states.dtype:  # the reference backend computes and returns float64
            y = y.to(hidden_states.dtype)
        y = y.reshape(shape)
        if self.returns_router_logits:  # transformers 4.x blocks returned (output, router_logits)
            return y, x @ self.router.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={c.d_model}, d_ff={c.d_ff}, n_experts={c.n_experts}, top_k={c.top_k}, "
                f"activation={c.activation!r}, renormalize={c.renormalize}, backend={self.backend!r}")
