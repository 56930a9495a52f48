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
from typing import Any, Iterator, Optional

import numpy as np
import torch  # the real torch: absolute import, this module is topk_moe.torch

__all__ = ["as_array", "as_tensor"]


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
    if tensor.device.type not in ("cpu", "cuda"):
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
    tensor = _check_tensor(name, tensor).detach()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    import cupy  # noqa: PLC0415 - only where a CUDA tensor arrives

    with cuda_stream(tensor.device):
        # cupy.from_dlpack passes CuPy's current stream (torch's, here) to
        # tensor.__dlpack__, so the producer orders the exchange on that stream.
        return cupy.from_dlpack(tensor)


def as_tensor(array: Any, device: Optional[Any] = None) -> "torch.Tensor":
    """A torch tensor over the same memory as ``array``, no copy.

    NumPy arrays become CPU tensors (``torch.from_numpy``); CuPy arrays become
    CUDA tensors on their own device (``torch.from_dlpack``, on torch's current
    stream). ``device``, when given, is where the caller expects the result: a
    tensor that would land elsewhere is a ValueError rather than a silent copy.
    """
    if isinstance(array, np.ndarray):
        if not array.flags.writeable:
            # torch.from_numpy warns on read-only memory and torch has no
            # read-only tensors; a backend result is never shared, so copy it.
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
