"""Launchers for kernels/topk_moe/cuda/expert_mlp.cu: every expert's MLP, one launch per GEMM.

    rows (N, D) in expert order, offsets (E+1,) int64 on the device
    hidden = act(rows @ w1[e])  or  silu(rows @ w1[e]) * (rows @ w3[e])   (N, F)
    out    = hidden @ w2[e]                                               (N, D)

for the rows offsets[e]:offsets[e+1] of each expert e. `grouped_mlp` checks,
allocates, launches and returns; nothing waits for the device, so the call can be
captured in a CUDA graph. The versions (numbered as in the header of the .cu file):

    "v1"      naive, one thread per output element             float32, float16
    "v2"      tiled SGEMM on FFMA (no TF32)                      float32
    "v3"      tensor cores (mma.sync m16n8k16, cp.async)         float16
    "decode"  streams each selected expert's weights once        float32, float16

`version=None` picks by `choose_version`, the one place the rule lives.

Precision: both GEMMs accumulate in float32 whatever the dtype. The hidden
activations are stored in the input dtype: float16 inputs round hidden to float16
once, after the float32 activation (as a plain float16 implementation stores it),
and that rounded hidden is GEMM2's tensor-core input. `out` is rounded once.
float32 runs FFMA throughout, so its error stays that of a plain float32 GEMM.

Where the arrays live and who compiles the kernels is the `device` argument
(topk_moe.cuda.device): CuPy and NVRTC by default, or the CPU emulator. CuPy is
imported on the first call, not at import (as in `loader`), so that nvcc-only
tools can read COMPILE_DEFINES without it.

Architecture: v3 needs sm_80 or newer (cp.async, mma.sync m16n8k16). On older
GPUs expert_mlp.cu still builds (its PTX helpers compile to a trap there), the
default rule never picks v3, and asking for it raises ValueError.
"""

from __future__ import annotations

import numpy

SOURCE = "expert_mlp.cu"

# The -D constants every launch passes: the launchers override ACTIVATION and
# VECTOR_LOADS per call; the block shapes are fixed by the thread mappings (the .cu
# static_asserts them) and the grids below are computed from these same numbers.
# The defaults are the heaviest variant (swiglu, 16-byte loads), for build checks.
# A plain literal, so a build check can read it with ast.literal_eval, without CuPy.
COMPILE_DEFINES = {
    "ACTIVATION": 2,            # 0 relu, 1 gelu, 2 swiglu
    "VECTOR_LOADS": 1,          # 0 where D, F or a base pointer isn't a multiple of 16 bytes
    "THREADS": 256,             # every kernel but v1's
    "V1_BLOCK_COLS": 128,
    "V2_BLOCK_ROWS": 128,
    "V2_BLOCK_COLS": 128,
    "V2_BLOCK_COLS_GATED": 64,  # 64 columns of w1 and 64 of w3
    "V3_BLOCK_ROWS": 128,
    "V3_BLOCK_COLS": 128,
    "V3_BLOCK_COLS_GATED": 64,
    "DECODE_ROWS": 4,           # rows per expert per pass over its weights
    "DECODE_HIDDEN_LANES": 8,   # lanes sharing one weight row: slice = lanes * 16 bytes
    "DECODE_OUT_LANES": 4,
}

THREADS = COMPILE_DEFINES["THREADS"]
ACTIVATIONS = {"relu": 0, "gelu": 1, "swiglu": 2}
VERSIONS = ("v1", "v2", "v3", "decode")
VERSION_DTYPES = {
    "v1": (numpy.dtype(numpy.float32), numpy.dtype(numpy.float16)),
    "v2": (numpy.dtype(numpy.float32),),
    "v3": (numpy.dtype(numpy.float16),),
    "decode": (numpy.dtype(numpy.float32), numpy.dtype(numpy.float16)),
}
MAX_GRID_Y = 65535
INT32_LIMIT = 2**31


#: The oldest architecture (compute capability x 10) with cp.async and mma.m16n8k16.
V3_MIN_ARCH = 80


def choose_version(largest_expert_rows: int, n_experts: int, dtype, arch: int = V3_MIN_ARCH) -> str:
    """The default version: the whole rule.

    decode when the busiest expert has at most DECODE_ROWS rows: decode streams an
    expert's weights once per DECODE_ROWS of its rows, so it is chosen by the
    largest per-expert row count, not the average (a hot expert under skewed
    routing would be read many times). Else the grouped GEMM for the dtype: v3
    (tensor cores, sm_80+) for float16, v1 for float16 on older GPUs, v2 for float32.
    """
    if largest_expert_rows <= COMPILE_DEFINES["DECODE_ROWS"] and n_experts <= MAX_GRID_Y:
        return "decode"
    if numpy.dtype(dtype) == numpy.float16:
        return "v3" if arch >= V3_MIN_ARCH else "v1"
    return "v2"


def largest_expert_rows(offsets, n_rows: int, device, bound=None) -> int:
    """max over e of offsets[e+1] - offsets[e]: read from the device (one wait),
    except under CUDA graph capture, where no wait is allowed: then the least of
    N and ``bound``, an upper bound the caller knows (a layer's T: a token picks
    each expert at most once, so no expert gets more than T of its T * k rows).
    With the bound, a decode-sized batch (T <= DECODE_ROWS) picks decode under
    capture as it does eagerly, so a graph times the kernels an eager call runs."""
    if device.capturing() or n_rows == 0:
        return n_rows if bound is None else min(n_rows, int(bound))
    counts = device.to_host(offsets)
    return int(numpy.diff(counts).max()) if counts.size > 1 else 0


def grouped_mlp(rows, offsets, w1, w2, w3, activation: str, *, version=None, device=None,
                max_expert_rows=None):
    """out (N, D): expert e's MLP on rows offsets[e]:offsets[e+1], all experts at once.

    rows (N, D); offsets (E+1,) int64 with offsets[0] = 0, non-decreasing,
    offsets[E] = N (read on the device only); w1, w3 (E, D, F); w2 (E, F, D);
    activation "relu" | "gelu" | "swiglu" (w3 required exactly for swiglu).
    float32 or float16, all the same dtype; out has that dtype. version: None (see
    `choose_version`) or one of VERSIONS. device: topk_moe.cuda.device.Device
    (default: CuPy's). max_expert_rows: None or an upper bound of any expert's
    row count that the caller knows (T for a layer); used only under CUDA graph
    capture, where the counts can't be read (see `largest_expert_rows`).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if (w3 is not None) != (activation == "swiglu"):
        expected = "an (E, D, F) array" if activation == "swiglu" else "None"
        raise ValueError(f"w3: expected {expected} for activation {activation!r}, got "
                         f"{'None' if w3 is None else tuple(w3.shape)}")
    dtype = numpy.dtype(rows.dtype)
    if dtype not in (numpy.float32, numpy.float16):
        raise TypeError(f"rows: expected float32 or float16, got {dtype}")
    for name, array in (("w1", w1), ("w2", w2), ("w3", w3)):
        if array is not None and numpy.dtype(array.dtype) != dtype:
            raise TypeError(f"{name}: expected {dtype} like rows, got {numpy.dtype(array.dtype)}")
    if rows.ndim != 2:
        raise ValueError(f"rows: expected (N, D), got shape {tuple(rows.shape)}")
    if w1.ndim != 3:
        raise ValueError(f"w1: expected (E, D, F), got shape {tuple(w1.shape)}")
    n_rows, d_model = rows.shape
    n_experts, _, d_ff = w1.shape
    if tuple(w1.shape) != (n_experts, d_model, d_ff):
        raise ValueError(f"w1: expected (E, {d_model}, F), got {tuple(w1.shape)}")
    if tuple(w2.shape) != (n_experts, d_ff, d_model):
        raise ValueError(f"w2: expected {(n_experts, d_ff, d_model)}, got {tuple(w2.shape)}")
    if w3 is not None and tuple(w3.shape) != tuple(w1.shape):
        raise ValueError(f"w3: expected {tuple(w1.shape)} like w1, got {tuple(w3.shape)}")
    if tuple(offsets.shape) != (n_experts + 1,):
        raise ValueError(f"offsets: expected ({n_experts + 1},), got {tuple(offsets.shape)}")
    if n_experts == 0 and n_rows > 0:
        raise ValueError(f"w1: expected at least one expert for {n_rows} rows, got E = 0")
    bad_bound = isinstance(max_expert_rows, bool) or not isinstance(max_expert_rows, (int, numpy.integer))
    if max_expert_rows is not None and (bad_bound or max_expert_rows < 0):
        raise ValueError(f"max_expert_rows: expected None or an integer >= 0, got {max_expert_rows!r}")
    if max(n_rows, d_model, d_ff) >= INT32_LIMIT:
        raise ValueError(f"rows, w1: N, D and F must each be below 2**31, got {n_rows}, {d_model}, {d_ff}")

    if device is None:
        from .device import cupy_device  # noqa: PLC0415 - see the module docstring

        device = cupy_device()
    arch = device.arch()
    if version is None:
        version = choose_version(largest_expert_rows(offsets, n_rows, device, max_expert_rows), n_experts, dtype, arch)
    if version not in VERSIONS:
        raise ValueError(f"version: expected None or one of {VERSIONS}, got {version!r}")
    if dtype not in VERSION_DTYPES[version]:
        raise TypeError(f"rows: version {version!r} takes {[str(d) for d in VERSION_DTYPES[version]]}, got {dtype}")
    if version == "decode" and n_experts > MAX_GRID_Y:
        raise ValueError(f"version: 'decode' takes at most {MAX_GRID_Y} experts, got {n_experts}")
    if version == "v3" and arch < V3_MIN_ARCH:
        raise ValueError(f"version: 'v3' needs a GPU of compute capability 8.0 or newer (cp.async, "
                         f"mma.sync), this one is {arch // 10}.{arch % 10}")

    xp = device.xp
    out = xp.empty((n_rows, d_model), dtype=dtype)
    if n_rows == 0 or d_model == 0:
        return out
    if d_ff == 0:  # act(0) = 0 for all three activations: out = 0 @ w2
        out.fill(0)
        return out

    given = (rows, offsets, w1, w2, w3)
    rows, w1, w2 = (xp.ascontiguousarray(xp.asarray(a)) for a in (rows, w1, w2))
    offsets = xp.ascontiguousarray(xp.asarray(offsets, dtype=numpy.int64))
    w3 = w1 if w3 is None else xp.ascontiguousarray(xp.asarray(w3))  # w1 stands in: relu, gelu never read it
    hidden = xp.empty((n_rows, d_ff), dtype=dtype)
    addresses = [device.address(a) for a in (rows, w1, w2, w3, hidden, out)]
    defines = launch_defines(activation, vector_loads_allowed(dtype, d_model, d_ff, addresses))

    launch = {"v1": _launch_v1, "v2": _launch_v2, "v3": _launch_v3, "decode": _launch_decode}[version]
    tile_starts = launch(device, rows, offsets, w1, w2, w3, hidden, out, defines)
    if device.capturing():
        # A replay writes hidden and tile_starts again and reads the arrays made
        # here: keep them alive (see topk_moe.cuda.stages). Only what this call
        # made: the caller's own arrays (the weights above all; w3 is w1 for
        # relu and gelu) stay the caller's to hold, not the process's.
        from .device import keep_for_graph  # noqa: PLC0415

        keep_for_graph(made_here([hidden, tile_starts, rows, offsets, w1, w2, w3], given))
    return out


def made_here(arrays, given) -> list:
    """The arrays of ``arrays`` that are none of ``given`` (the caller's own), each once."""
    found: list = []
    for array in arrays:
        if array is not None and all(array is not other for other in given) \
                and all(array is not other for other in found):
            found.append(array)
    return found


def vector_loads_allowed(dtype, d_model: int, d_ff: int, addresses) -> bool:
    """16-byte accesses are safe when every row starts on a 16-byte boundary:
    D and F multiples of 16 bytes and every base address 16-byte aligned."""
    per_16_bytes = 16 // numpy.dtype(dtype).itemsize
    return (d_model % per_16_bytes == 0 and d_ff % per_16_bytes == 0
            and all(address % 16 == 0 for address in addresses))


def launch_defines(activation: str, vector_loads: bool) -> dict:
    return {**COMPILE_DEFINES, "ACTIVATION": ACTIVATIONS[activation], "VECTOR_LOADS": int(vector_loads)}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def row_tile_bound(n_rows: int, n_experts: int, block_rows: int) -> int:
    """An upper bound of sum over e of ceil(count_e / block_rows), from N and E alone:
    at most floor((N + E (block_rows - 1)) / block_rows), and at most N."""
    return min(n_rows, (n_rows + n_experts * (block_rows - 1)) // block_rows)


def _tile_starts(device, offsets, n_experts: int, block_rows: int, defines: dict):
    """tile_starts (E+1,) int32 on the device: the first row tile of each expert."""
    tile_starts = device.xp.empty(n_experts + 1, dtype=numpy.int32)
    kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_tile_starts", **defines)
    kernel((1,), (THREADS,), (offsets, numpy.int32(n_experts), numpy.int32(block_rows), tile_starts))
    return tile_starts


def _launch_v1(device, rows, offsets, w1, w2, w3, hidden, out, defines):
    n_rows, d_model = rows.shape
    n_experts, _, d_ff = w1.shape
    block_cols = COMPILE_DEFINES["V1_BLOCK_COLS"]
    _check_grid_y(_ceil_div(max(d_ff, d_model), block_cols))
    if rows.dtype == numpy.float32:
        hidden_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v1_hidden_f32", **defines)
        out_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v1_out_f32", **defines)
    else:
        hidden_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v1_hidden_f16", **defines)
        out_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v1_out_f16", **defines)
    e, d, f = numpy.int32(n_experts), numpy.int32(d_model), numpy.int32(d_ff)
    hidden_kernel((n_rows, _ceil_div(d_ff, block_cols)), (block_cols,), (rows, offsets, e, w1, w3, hidden, d, f))
    out_kernel((n_rows, _ceil_div(d_model, block_cols)), (block_cols,), (hidden, offsets, e, w2, out, f, d))


def _launch_v2(device, rows, offsets, w1, w2, w3, hidden, out, defines):
    hidden_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v2_hidden_f32", **defines)
    out_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v2_out_f32", **defines)
    return _launch_grouped(device, hidden_kernel, out_kernel, "V2", rows, offsets, w1, w2, w3, hidden, out, defines)


def _launch_v3(device, rows, offsets, w1, w2, w3, hidden, out, defines):
    hidden_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v3_hidden_f16", **defines)
    out_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_v3_out_f16", **defines)
    return _launch_grouped(device, hidden_kernel, out_kernel, "V3", rows, offsets, w1, w2, w3, hidden, out, defines)


def _launch_grouped(device, hidden_kernel, out_kernel, prefix, rows, offsets, w1, w2, w3, hidden, out, defines):
    """Grid (row tiles, column tiles): an upper bound of row tiles on x; each block
    finds its expert from tile_starts on the device, blocks past the end exit."""
    n_rows, d_model = rows.shape
    n_experts, _, d_ff = w1.shape
    block_rows = COMPILE_DEFINES[f"{prefix}_BLOCK_ROWS"]
    gated = defines["ACTIVATION"] == ACTIVATIONS["swiglu"]
    hidden_cols = COMPILE_DEFINES[f"{prefix}_BLOCK_COLS_GATED" if gated else f"{prefix}_BLOCK_COLS"]
    out_cols = COMPILE_DEFINES[f"{prefix}_BLOCK_COLS"]
    row_tiles = row_tile_bound(n_rows, n_experts, block_rows)
    hidden_grid = (row_tiles, _ceil_div(d_ff, hidden_cols))
    out_grid = (row_tiles, _ceil_div(d_model, out_cols))
    _check_grid_y(max(hidden_grid[1], out_grid[1]))

    tile_starts = _tile_starts(device, offsets, n_experts, block_rows, defines)
    e, d, f = numpy.int32(n_experts), numpy.int32(d_model), numpy.int32(d_ff)
    hidden_kernel(hidden_grid, (THREADS,), (rows, offsets, tile_starts, e, w1, w3, hidden, d, f))
    out_kernel(out_grid, (THREADS,), (hidden, offsets, tile_starts, e, w2, out, f, d))
    return tile_starts


def _launch_decode(device, rows, offsets, w1, w2, w3, hidden, out, defines):
    """Grid (column slices, E): block (x, e) streams slice x of expert e's weights;
    blocks of experts without rows exit before reading anything."""
    n_experts, _, d_ff = w1.shape
    d_model = rows.shape[1]
    per_16_bytes = 16 // rows.dtype.itemsize
    hidden_slice = COMPILE_DEFINES["DECODE_HIDDEN_LANES"] * per_16_bytes
    out_slice = COMPILE_DEFINES["DECODE_OUT_LANES"] * per_16_bytes
    if rows.dtype == numpy.float32:
        hidden_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_decode_hidden_f32", **defines)
        out_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_decode_out_f32", **defines)
    else:
        hidden_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_decode_hidden_f16", **defines)
        out_kernel = device.get_kernel("expert_mlp.cu", "expert_mlp_decode_out_f16", **defines)
    d, f = numpy.int32(d_model), numpy.int32(d_ff)
    hidden_kernel((_ceil_div(d_ff, hidden_slice), n_experts), (THREADS,), (rows, offsets, w1, w3, hidden, d, f))
    out_kernel((_ceil_div(d_model, out_slice), n_experts), (THREADS,), (hidden, offsets, w2, out, f, d))


def _check_grid_y(blocks: int) -> None:
    if blocks > MAX_GRID_Y:
        raise ValueError(f"w1: D and F too wide for one launch ({blocks} column tiles > {MAX_GRID_Y})")
