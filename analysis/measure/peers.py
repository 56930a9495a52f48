"""The MoE layers a user would otherwise run, in PyTorch, on the same inputs.

Two peers, each the same layer as ``topk_moe.moe_forward`` (dropless, top-k
with renormalised weights, no biases):

- ``hf_eager_moe``: the Hugging Face Mixtral block's eager loop. Route with a
  softmax in float32 and ``torch.topk``, then, for every expert that got a
  token, gather its tokens (``torch.where`` on a one-hot mask), run the
  expert with ``torch.matmul`` and add the weighted result back with
  ``index_add_``. One host synchronisation per step, many small launches.
- ``grouped_mm_moe``: the grouped-GEMM path of recent Hugging Face and
  torchtitan code. Sort the assignments by expert, count them with
  ``torch.histc`` (no host synchronisation), and run all experts in one
  ``torch._grouped_mm`` per matrix (w1 and w3 fused into one); combine with
  ``index_add_``. On CUDA, ``torch._grouped_mm`` takes bfloat16 only, so this
  peer computes in bfloat16 there whatever the layer's dtype (its records say
  so); on the CPU it takes float32.

On the GPU the dense baselines need no peer: ``topk_moe.dense_mlp(backend="cuda")``
is cuBLAS through CuPy. On the CPU, ``torch_dense_mlp`` is PyTorch's dense MLP
(MKL or oneDNN on PyTorch's OpenMP threads), the dense layer a user would write.

Arrays come in as NumPy (CPU) or CuPy (GPU) and are shared with PyTorch
without a copy (``torch.from_numpy``, DLPack). Dimension letters as in the
contract: T tokens, D model width, F expert hidden width, E experts, K experts
per token.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Optional

import numpy

PEERS = ("hf-eager", "torch-grouped-mm")


def _torch():
    import torch  # noqa: PLC0415 - torch is an optional extra; imported when a peer is asked for

    return torch


def torch_unavailable_reason(device: str) -> Optional[str]:
    """None when PyTorch can run the peers on ``device`` ("cpu" or "cuda"), else why not."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install -e '.[torch]')"
    if device == "cuda":
        torch = _torch()
        if not torch.cuda.is_available():
            return f"PyTorch {torch.__version__} sees no CUDA device"
    elif device != "cpu":
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    return None


def grouped_mm_dtype(device: str) -> str:
    """The dtype the grouped-GEMM peer computes in: torch's CUDA kernel takes
    bfloat16 only; its CPU fallback takes float32."""
    return "bfloat16" if device == "cuda" else "float32"


def grouped_mm_unavailable_reason(device: str) -> Optional[str]:
    """None when ``torch._grouped_mm`` runs on ``device`` (tried on a tiny
    problem), else why not."""
    reason = torch_unavailable_reason(device)
    if reason is not None:
        return reason
    torch = _torch()
    if not hasattr(torch, "_grouped_mm"):
        return f"PyTorch {torch.__version__} has no torch._grouped_mm"
    dtype = getattr(torch, grouped_mm_dtype(device))
    try:
        rows = torch.ones((32, 16), dtype=dtype, device=device)
        weight = torch.ones((2, 16, 16), dtype=dtype, device=device).transpose(-2, -1)
        offsets = torch.tensor([16, 32], dtype=torch.int32, device=device)
        torch._grouped_mm(rows, weight, offs=offsets)
    except Exception as error:  # unsupported device, dtype or GPU generation
        return f"torch._grouped_mm fails on {device} {grouped_mm_dtype(device)}: {type(error).__name__}: {error}"
    return None


def as_torch(array: Any, dtype: Optional[str] = None):
    """A torch tensor sharing ``array``'s memory (NumPy or CuPy), cast to
    ``dtype`` (a torch dtype name) when given, which copies."""
    torch = _torch()
    if isinstance(array, numpy.ndarray):
        tensor = torch.from_numpy(numpy.ascontiguousarray(array))
    else:
        tensor = torch.from_dlpack(array)
    return tensor if dtype is None else tensor.to(getattr(torch, dtype))


@dataclasses.dataclass(frozen=True)
class TorchLayer:
    """The layer's weights as torch tensors: router (D, E), w1 and w3 (E, D, F),
    w2 (E, F, D), as the contract lays them out."""

    router: Any
    w1: Any
    w2: Any
    w3: Any
    activation: str
    top_k: int
    renormalize: bool = True


def torch_layer(weights, cfg, dtype: Optional[str] = None) -> TorchLayer:
    """``topk_moe.MoEWeights`` as a ``TorchLayer`` on the arrays' device."""
    convert = lambda a: None if a is None else as_torch(a, dtype)  # noqa: E731
    return TorchLayer(router=convert(weights.router), w1=convert(weights.w1), w2=convert(weights.w2),
                      w3=convert(weights.w3), activation=cfg.activation, top_k=cfg.top_k,
                      renormalize=cfg.renormalize)


def _route(x, layer: TorchLayer):
    """(weights (T, K) in x's dtype, experts (T, K) int64), as the HF block routes."""
    torch = _torch()
    logits = x @ layer.router.to(x.dtype)
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    weights, experts = torch.topk(probs, layer.top_k, dim=-1)
    if layer.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


def activate(hidden, gate, activation: str):
    """The activation as the PyTorch layers here apply it: relu, exact-erf
    gelu, or swiglu's ``silu(hidden) * gate`` (a new tensor; the inputs stay)."""
    torch = _torch()
    if activation == "swiglu":
        return torch.nn.functional.silu(hidden) * gate
    if activation == "relu":
        return torch.relu(hidden)
    return torch.nn.functional.gelu(hidden)  # the exact erf form, as the contract's


def torch_dense_mlp(x, w1, w2, w3, activation: str):
    """y (T, D): the dense MLP in PyTorch, ``act(x @ w1) @ w2`` (swiglu:
    ``(silu(x @ w1) * (x @ w3)) @ w2``), as ``topk_moe.dense_mlp`` computes it."""
    gate = x @ w3 if w3 is not None else None
    return activate(x @ w1, gate, activation) @ w2


def hf_eager_moe(x, layer: TorchLayer):
    """y (T, D): the Hugging Face Mixtral block's eager loop over the experts."""
    torch = _torch()
    T, D = x.shape
    E = layer.w1.shape[0]
    weights, experts = _route(x, layer)
    y = torch.zeros((T, D), dtype=x.dtype, device=x.device)
    mask = torch.nn.functional.one_hot(experts, num_classes=E).permute(2, 1, 0)  # (E, K, T)
    experts_hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in experts_hit:
        choice, token = torch.where(mask[e])
        rows = x[token]
        gate = rows @ layer.w3[e] if layer.w3 is not None else None
        hidden = activate(rows @ layer.w1[e], gate, layer.activation)
        out = (hidden @ layer.w2[e]) * weights[token, choice, None]
        y.index_add_(0, token, out.to(x.dtype))
    return y


@dataclasses.dataclass(frozen=True)
class GroupedLayer:
    """Weights laid out for ``torch._grouped_mm`` as HF and torchtitan pass them:
    w13 (E, D, G*F) and w2 (E, F, D) as column-major views (stored (E, G*F, D)
    and (E, D, F)), w1 and w3 fused so GEMM 1 is one call."""

    router: Any
    w13: Any
    w2: Any
    d_ff: int
    activation: str
    top_k: int
    renormalize: bool = True


def grouped_layer(layer: TorchLayer, dtype: str) -> GroupedLayer:
    """``layer`` copied into ``dtype`` and the grouped-GEMM layout (done once, untimed)."""
    torch = _torch()
    target = getattr(torch, dtype)
    w13 = layer.w1 if layer.w3 is None else torch.cat([layer.w1, layer.w3], dim=2)
    as_column_major = lambda w: w.to(target).transpose(-2, -1).contiguous().transpose(-2, -1)  # noqa: E731
    return GroupedLayer(router=layer.router.to(target), w13=as_column_major(w13), w2=as_column_major(layer.w2),
                        d_ff=layer.w1.shape[2], activation=layer.activation, top_k=layer.top_k,
                        renormalize=layer.renormalize)


def grouped_mm_moe(x, layer: GroupedLayer):
    """y (T, D): sort by expert, one ``torch._grouped_mm`` per GEMM, ``index_add_`` back.
    ``x`` must already be in the layer's dtype."""
    torch = _torch()
    T, D = x.shape
    E = layer.w13.shape[0]
    routed = TorchLayer(layer.router, None, None, None, layer.activation, layer.top_k, layer.renormalize)
    weights, experts = _route(x, routed)
    flat_experts = experts.reshape(-1)  # assignment a = t * K + j
    order = torch.argsort(flat_experts, stable=True)
    token = order // layer.top_k
    # histc, not bincount: bincount reads the maximum back to the host.
    counts = torch.histc(flat_experts.to(torch.float32), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)
    rows = x[token]
    hidden = torch._grouped_mm(rows, layer.w13, offs=offsets)
    if layer.activation == "swiglu":
        hidden = activate(hidden[:, :layer.d_ff], hidden[:, layer.d_ff:], "swiglu")
    else:
        hidden = activate(hidden, None, layer.activation)
    out = torch._grouped_mm(hidden, layer.w2, offs=offsets)
    out = out * weights.reshape(-1)[order, None]
    y = torch.zeros((T, D), dtype=x.dtype, device=x.device)
    y.index_add_(0, token, out.to(x.dtype))
    return y


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64 on the host."""
    def host(a):
        if hasattr(a, "detach"):
            a = a.detach().float().cpu().numpy()
        elif hasattr(a, "get"):
            a = a.get()
        return numpy.asarray(a, dtype=numpy.float64)

    actual, expected = host(actual), host(expected)
    if expected.size == 0:
        return 0.0
    scale = float(numpy.max(numpy.abs(expected))) or 1.0
    return float(numpy.max(numpy.abs(actual - expected))) / scale
