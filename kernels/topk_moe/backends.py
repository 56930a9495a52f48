"""Which backend runs a call: "reference", "cpu", "cuda" or "cuda-emulated".

`backend=None` means the MOE_BACKEND environment variable if set, else "cpu".
The CUDA backend is imported only when asked for, so importing `topk_moe`
never imports CuPy and never touches a GPU.

"cuda-emulated" is the CUDA kernels on the CPU, for testing: slow. The same
`.cu` files and launchers as "cuda", built by the host C++ compiler and run by
kernels/topk_moe/cuda/emulator (cuBLAS, used by the dense baseline's GEMMs, is NumPy
there). It is available wherever a C++ compiler is; its results are CPU results.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

KNOWN_BACKENDS = ("reference", "cpu", "cuda", "cuda-emulated")
DEFAULT_BACKEND = "cpu"
ENV_VARIABLE = "MOE_BACKEND"
#: The module of each backend. The CUDA backend lives in a sub-package whose
#: __init__ imports nothing, so its CuPy-free tools (nvcc's build report)
#: import without CuPy; its backend module imports CuPy at the top.
BACKEND_MODULES = {"reference": "topk_moe.reference", "cpu": "topk_moe.cpu", "cuda": "topk_moe.cuda.backend",
                   "cuda-emulated": "topk_moe.cuda.emulator.backend"}


def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA backend can run here, else why it cannot."""
    try:
        backend_found = importlib.util.find_spec(BACKEND_MODULES["cuda"]) is not None
    except ModuleNotFoundError:  # the topk_moe.cuda package itself is missing
        backend_found = False
    if not backend_found:
        return "the CUDA backend (kernels/topk_moe/cuda) is not part of this build"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install -e '.[cuda12]' or '.[cuda13]')"
    try:
        import cupy  # imported here, never at package import

        device_count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CuPy raises its own CUDA error types
        return f"CuPy finds no usable CUDA device ({type(error).__name__}: {error})"
    if device_count == 0:
        return "CuPy finds no CUDA device"
    return None


def emulator_unavailable_reason() -> Optional[str]:
    """None when the "cuda-emulated" backend can run here, else why it cannot."""
    try:
        found = importlib.util.find_spec(BACKEND_MODULES["cuda-emulated"]) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return "the CUDA emulator (kernels/topk_moe/cuda/emulator) is not part of this build"
    from .cuda.emulator.build import compiler  # noqa: PLC0415 - imports nothing heavy

    if compiler() is None:
        return "no C++ compiler found (set $CXX or install g++)"
    return None


def available_backends() -> tuple:
    """The backends that can run on this machine: "cuda" only where CuPy finds a
    device, "cuda-emulated" (the CUDA kernels on the CPU, for testing: slow)
    where a C++ compiler is."""
    names = ("reference", "cpu")
    if cuda_unavailable_reason() is None:
        names += ("cuda",)
    if emulator_unavailable_reason() is None:
        names += ("cuda-emulated",)
    return names


def resolve(backend: Optional[str]) -> ModuleType:
    """The module that implements `backend` (see the module docstring for None)."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VARIABLE) or DEFAULT_BACKEND
        source = f"backend (from ${ENV_VARIABLE})"
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"{source}: expected one of {KNOWN_BACKENDS}, got {backend!r}")
    if backend == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(f"{source}: 'cuda' is not available here: {reason}")
    if backend == "cuda-emulated":
        reason = emulator_unavailable_reason()
        if reason is not None:
            raise ValueError(f"{source}: 'cuda-emulated' is not available here: {reason}")
    return importlib.import_module(BACKEND_MODULES[backend])
