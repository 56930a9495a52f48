"""Compile-time constants and launch shapes of the CUDA kernels, chosen from
the problem's shape.

No CuPy here: the nvcc build report (``build_report``) compiles the same
variants that the launchers ask the loader for, from these functions.
"""

from __future__ import annotations

WARP = 32

# router.cu ------------------------------------------------------------------

#: Warps that split a block's model columns between them (the block's tokens
#: are shared): more warps, shorter dependent loops for decode-sized batches.
ROUTER_WARPS = 8
#: Experts one router kernel handles: up to 32 logits per lane in registers.
MAX_ROUTER_EXPERTS = 1024
#: Logits a lane may hold (tokens per block x experts per lane).
ROUTER_LOGITS_PER_LANE = 32
MAX_ROUTER_TOKENS = 8


def router_lanes(n_experts: int) -> tuple:
    """(expert lanes, experts per lane) of router.cu's warp layout: E >= 32
    spreads the experts over all 32 lanes; a smaller E takes the next power
    of two of lanes and the remaining lanes split the model columns."""
    expert_lanes = WARP if n_experts >= WARP else 1 << max(0, (n_experts - 1).bit_length())
    return expert_lanes, -(-n_experts // expert_lanes)


def router_defines(n_experts: int) -> dict:
    """The -D constants of router.cu for E experts. They depend on E alone,
    never on T, so a token's logits are summed in the same order whatever
    batch it is in."""
    if not 1 <= n_experts <= MAX_ROUTER_EXPERTS:
        raise ValueError(f"n_experts: the cuda router supports 1 to {MAX_ROUTER_EXPERTS} experts, got {n_experts}")
    _, experts_per_lane = router_lanes(n_experts)
    tokens = max(1, min(MAX_ROUTER_TOKENS, ROUTER_LOGITS_PER_LANE // experts_per_lane))
    return {"N_EXPERTS": n_experts, "ROUTER_TOKENS": tokens, "ROUTER_WARPS": ROUTER_WARPS}


# dispatch.cu ----------------------------------------------------------------

DISPATCH_ROUNDS = 8
#: Elements of the (T, k) experts array per segment (one warp, DISPATCH_ROUNDS
#: rounds of 32 consecutive elements, in memory order).
DISPATCH_SEGMENT = WARP * DISPATCH_ROUNDS
DISPATCH_MAX_WARPS = 8
#: The default per-block limit of dynamic shared memory. dispatch_scatter needs
#: the most per warp: an int64 row base and a 16-bit counter per expert, and an
#: int per element of its segment (the staged token rows); that bounds the
#: experts a dispatch can take (dispatch_count_segments: an int counter per
#: expert per warp).
DISPATCH_SHARED_BYTES = 48 * 1024
_SCATTER_BYTES_PER_EXPERT = 8 + 2
MAX_DISPATCH_EXPERTS = (DISPATCH_SHARED_BYTES - 4 * DISPATCH_SEGMENT) // _SCATTER_BYTES_PER_EXPERT
SCAN_THREADS = 256


def dispatch_defines() -> dict:
    """The -D constants of dispatch.cu (DISPATCH_WARPS, the largest block, bounds the scatter's
    registers through __launch_bounds__)."""
    return {"DISPATCH_ROUNDS": DISPATCH_ROUNDS, "DISPATCH_WARPS": DISPATCH_MAX_WARPS}


def _scatter_bytes_per_warp(n_experts: int) -> int:
    return n_experts * _SCATTER_BYTES_PER_EXPERT + 4 * DISPATCH_SEGMENT


def dispatch_warps_per_block(n_experts: int) -> int:
    """Warps per block of the segment kernels (one segment per warp): as many as
    fit dispatch_scatter's shared memory in DISPATCH_SHARED_BYTES, at most
    DISPATCH_MAX_WARPS."""
    if not 1 <= n_experts <= MAX_DISPATCH_EXPERTS:
        raise ValueError(
            f"n_experts: the cuda dispatch supports 1 to {MAX_DISPATCH_EXPERTS} experts "
            f"(its shared memory per block is {DISPATCH_SHARED_BYTES} bytes), got {n_experts}"
        )
    return max(1, min(DISPATCH_MAX_WARPS, DISPATCH_SHARED_BYTES // _scatter_bytes_per_warp(n_experts)))


def dispatch_shared_bytes(kernel: str, n_experts: int) -> int:
    """Dynamic shared memory (bytes) the launcher gives a dispatch kernel for E
    experts: dispatch_count_segments an int counter per expert per warp;
    dispatch_scatter per warp an int64 row base and a 16-bit counter per expert
    and an int per segment element; the scans none."""
    warps = dispatch_warps_per_block(n_experts)
    if kernel == "dispatch_count_segments":
        return warps * n_experts * 4
    if kernel == "dispatch_scatter":
        return warps * _scatter_bytes_per_warp(n_experts)
    if kernel in ("dispatch_scan_segments", "dispatch_offsets"):
        return 0
    raise ValueError(f"kernel: expected a kernel of dispatch.cu, got {kernel!r}")


# combine.cu and activation.cu -----------------------------------------------

#: Warps per block of the row kernels (permute, combine): one row or token per warp.
ROW_WARPS = 8
ELEMENTWISE_THREADS = 256
#: Grid-stride kernels launch at most this many blocks per multiprocessor.
BLOCKS_PER_SM = 32


def widest_access(row_bytes: int, *addresses: int, widths: tuple = (16, 8, 4, 2)) -> int:
    """The widest access (bytes) that divides a row and every base address:
    a row of 33 float32 (132 bytes) gets 4, a row of 104 float16 at aligned
    addresses 16."""
    for width in widths:
        if row_bytes % width == 0 and all(address % width == 0 for address in addresses):
            return width
    raise ValueError(f"no access width in {widths} divides a row of {row_bytes} bytes at {addresses}")


# the build report -----------------------------------------------------------

#: The -D sets nvcc's report compiles for each file; a file not named here is
#: compiled once with its own defaults. The router's register use grows with
#: E, so the report covers the layouts (E < 32 with column lanes, E = 64, and
#: the largest, 1024).
BUILD_VARIANTS = {
    "router.cu": [router_defines(E) for E in (2, 8, 64, MAX_ROUTER_EXPERTS)],
    "dispatch.cu": [dispatch_defines()],
}


def build_variants(file: str) -> list:
    return [dict(defines) for defines in BUILD_VARIANTS.get(file, [{}])]
