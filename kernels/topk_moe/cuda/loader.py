"""The one loader of the CUDA backend: a `.cu` file of this folder, compiled by
CuPy (NVRTC) with `-D` constants, once per (file, options).

    kernel = get_kernel("router.cu", "router_top2_f32", N_EXPERTS=64, ROUTER_TOKENS=8)
    kernel((blocks,), (threads,), (x, router, numpy.int64(T), ...))

Conventions the tests rely on: every launcher calls ``get_kernel`` with the
file and the kernel name as string literals (tests/test_cuda_build.py matches
them against the ``extern "C" __global__`` kernels of the sources), and passes
scalars as NumPy scalars of the kernel's C type (``numpy.int64`` for
``long long``, ``numpy.int32`` for ``int``).

CuPy appends ``-ftz=true`` to every compile (float32 subnormals flush to
zero); the kernels' results are checked with it, and nvcc's report
(``build_report``) compiles with it too.

A local ``#include "name.cuh"`` is pasted into the source text here, so that
CuPy's on-disk kernel cache, which hashes the source and the options, notices
a changed header. System headers (``<...>``) are left to NVRTC. CuPy is
imported on the first compile, not at import: nvcc-only tools import this file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent

#: Options of every compile, nvcc's build report included (``build_report``).
BASE_OPTIONS = ("-std=c++17",)

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[^\n]*$", re.MULTILINE)


def define_options(**defines) -> tuple:
    """``-DNAME=value`` options, sorted by name so equal sets give equal keys."""
    for name, value in defines.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an integer compile-time constant, got {value!r}")
    return tuple(f"-D{name}={int(value)}" for name, value in sorted(defines.items()))


def source_text(file: str) -> str:
    """The text of ``file`` with its local includes pasted in (each file once)."""
    pasted: set = set()

    def expand(name: str) -> str:
        path = KERNEL_DIR / name
        if path.name in pasted:
            return f"// {name}: already included above\n"
        pasted.add(path.name)
        text = path.read_text(encoding="utf-8")
        if name != file:  # pasted text is part of the main file, where `#pragma once` warns
            text = _PRAGMA_ONCE.sub("", text)
        return _LOCAL_INCLUDE.sub(lambda match: expand(match.group(1)), text)

    return expand(file)


@functools.lru_cache(maxsize=None)
def _module(file: str, options: tuple):
    import cupy  # noqa: PLC0415 - see the module docstring

    return cupy.RawModule(code=source_text(file), options=BASE_OPTIONS + options)


@functools.lru_cache(maxsize=None)
def _kernel(file: str, name: str, options: tuple):
    return _module(file, options).get_function(name)


def get_kernel(file: str, name: str, **defines):
    """The compiled kernel ``name`` of ``file`` (in this folder), built with
    ``-D`` for each of ``defines``; cached per (file, name, defines)."""
    return _kernel(file, name, define_options(**defines))
