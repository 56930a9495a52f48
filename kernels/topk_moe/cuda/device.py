"""The two seams of the CUDA backend: where arrays live and who compiles kernels.

A ``Device`` bundles them for the launchers (``stages.Stages``, ``expert_mlp``):

- ``xp``: the array module, CuPy on a GPU, ``emulator.arrays`` (guarded NumPy
  buffers) on the emulator; the launchers call only ``empty``, ``zeros``,
  ``asarray``, ``ascontiguousarray``, ``isfinite``, ``matmul`` and dtypes on it;
- ``get_kernel``: ``topk_moe.cuda.loader.get_kernel`` (CuPy's NVRTC) or
  ``emulator.loader.get_kernel`` (the host C++ compiler), same signature, and
  kernels called the same way.

plus what differs in reading arrays: a device pointer, a copy to the host, the
number of multiprocessors (the grid-stride kernels' grid), and whether a CUDA
graph is being captured. Nothing here imports CuPy until ``cupy_device()``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy


#: Arrays that launches captured into a CUDA graph write to but no result holds
#: (topk_moe.cuda.stages, expert_mlp), gathered during a capture until the
#: capturer takes them (take_graph_keepalive) to hold beside its graph.
GRAPH_KEEPALIVE: list = []


def keep_for_graph(arrays) -> None:
    """Add the arrays (None skipped) that the capture in progress must keep alive."""
    GRAPH_KEEPALIVE.extend(a for a in arrays if a is not None)


def take_graph_keepalive() -> list:
    """The arrays gathered since the last call, and an empty list for the next
    capture. Whoever captures a graph calls this right after ending the capture
    and keeps the list as long as the graph may replay (analysis.measure.timing
    keeps it with the graph's outputs), so the arrays die with the graph rather
    than living for the rest of the process."""
    taken = GRAPH_KEEPALIVE[:]
    GRAPH_KEEPALIVE.clear()
    return taken


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    xp: Any
    get_kernel: Callable
    address: Callable[[Any], int]
    to_host: Callable[[Any], numpy.ndarray]
    multiprocessors: Callable[[], int]
    capturing: Callable[[], bool]
    arch: Callable[[], int]  # compute capability x 10 (80 for sm_80)
    emulated: bool


@functools.lru_cache(maxsize=None)
def cupy_device() -> Device:
    import cupy  # noqa: PLC0415 - only where the real backend is asked for

    from . import loader

    def get_kernel(file: str, name: str, **defines):
        # Looked up at each call, so a tool may wrap topk_moe.cuda.loader.get_kernel
        # (Nsight ranges per kernel, analysis.measure.utilisation) for every launcher.
        return vars(loader)["get_kernel"](file, name, **defines)

    def multiprocessors() -> int:
        return _multiprocessors(cupy.cuda.Device().id)

    def capturing() -> bool:
        return bool(cupy.cuda.get_current_stream().is_capturing())

    def arch() -> int:
        return int(cupy.cuda.Device().compute_capability)

    return Device(name="cuda", xp=cupy, get_kernel=get_kernel, address=lambda a: a.data.ptr,
                  to_host=cupy.asnumpy, multiprocessors=multiprocessors, capturing=capturing, arch=arch,
                  emulated=False)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id: int) -> int:
    import cupy  # noqa: PLC0415

    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


#: The grid-stride kernels size their grids by multiprocessors; the emulator
#: reports a small count so its grids stay CI-sized while still having several
#: blocks (each block runs in turn, so this is no speed setting).
EMULATED_MULTIPROCESSORS = 2


#: The emulator implements the sm_80 instructions expert_mlp.cu's v3 uses.
EMULATED_ARCH = 80


@functools.lru_cache(maxsize=None)
def emulated_device() -> Device:
    from .emulator import arrays, loader  # noqa: PLC0415

    return Device(name="cuda-emulated", xp=arrays, get_kernel=loader.get_kernel,
                  address=lambda a: a.ctypes.data, to_host=lambda a: numpy.array(a, copy=True),
                  multiprocessors=lambda: EMULATED_MULTIPROCESSORS, capturing=lambda: False,
                  arch=lambda: EMULATED_ARCH, emulated=True)
