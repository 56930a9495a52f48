"""Theoretical occupancy of the CUDA kernels on A100 and H100, from ptxas's
resource report, with no GPU (issue 21, item 1).

Everything here is *predicted (model)*, never a measurement: it applies the
documented allocation rules to the registers and shared memory nvcc reports
(``topk_moe.cuda.build_report``) and to the block shapes the launchers use.

The rules, as NVIDIA's occupancy calculator implements them
(``cuda_occupancy.h`` of the CUDA toolkit, the header cudaOccupancyMaxActive-
BlocksPerMultiprocessor follows; read in CUDA 13.0 for sm_80 and sm_90):

- a block takes ``ceil(threads / 32)`` warps; at most 64 warps and 32 blocks
  live on one SM;
- registers are allocated per warp, ``registers x 32`` rounded up to the
  allocation unit of 256; each of the SM's 4 sub-partitions holds 65536 / 4
  registers, and a block fits only if its warps, rounded up to a multiple of
  4 (the warp allocation granularity), fit the 65536 registers of a block;
- shared memory per block is static + dynamic + the 1 KiB the runtime reserves
  per block (compute capability 8.0 and newer), rounded up to 128 bytes;
  the SM's shared memory is the carve-out: by default the largest, or the
  requested one rounded up to a supported size (0, 8, 16, 32, 64, 100, 132,
  164 KiB on sm_80; those and 196, 228 KiB on sm_90); a block may take at most
  48 KiB + 1 KiB unless the kernel opts in to more.

Limits per compute capability: CUDA C++ Programming Guide, "Technical
Specifications per Compute Capability" and the shared-memory sections of
"Compute Capability 8.x" and "9.0" (the 1 KiB reserved per block is stated
there). The occupancy is the fraction of the SM's 64 warp slots the resident
blocks fill; the limiter is the resource (or resources, when tied) that sets
the number of resident blocks.
"""

from __future__ import annotations

import dataclasses
import math

WARP = 32

#: Where the allocation rules come from, for every record and table.
RULES_SOURCE = ("CUDA C++ Programming Guide, Technical Specifications per Compute Capability and "
                "Compute Capability 8.x / 9.0 (shared memory carve-outs, 1 KiB reserved per block); "
                "cuda_occupancy.h of CUDA 13.0 (register unit 256 per warp, 4 sub-partitions, "
                "shared memory granularity 128 bytes)")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The per-SM allocation limits of one compute capability."""

    arch: int  # compute capability x 10: 80, 90
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    max_threads_per_block: int = 1024
    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    max_registers_per_thread: int = 255
    register_unit: int = 256  # registers, allocated per warp
    sub_partitions: int = 4  # the warp allocation granularity of the register check
    shared_per_sm: int = 0  # bytes, the largest carve-out
    shared_per_block: int = 48 * 1024  # without opt-in
    shared_per_block_optin: int = 0
    reserved_shared_per_block: int = 1024
    shared_granularity: int = 128
    carveouts_kib: tuple = ()


ARCHITECTURES = {
    80: Architecture(80, shared_per_sm=164 * 1024, shared_per_block_optin=163 * 1024,
                     carveouts_kib=(0, 8, 16, 32, 64, 100, 132, 164)),
    90: Architecture(90, shared_per_sm=228 * 1024, shared_per_block_optin=227 * 1024,
                     carveouts_kib=(0, 8, 16, 32, 64, 100, 132, 164, 196, 228)),
}

#: The order limiters are named in when several tie.
LIMITERS = ("registers", "shared memory", "warps", "blocks")


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Resident blocks per SM, the fraction of warp slots they fill, and why."""

    blocks_per_sm: int
    occupancy: float  # resident warps / max warps per SM
    limiter: str  # "registers", "shared memory", "warps", "blocks", ties joined by " and "
    limits: dict  # blocks per SM each resource allows
    warps_per_block: int
    registers_per_warp: int  # allocated
    shared_bytes_per_block: int  # allocated: static + dynamic + reserved, rounded up
    shared_per_sm: int  # the carve-out the calculation used


def _round_up(value: int, unit: int) -> int:
    return unit * -(-value // unit)


def architecture(arch: int) -> Architecture:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch]


def carveout_bytes(arch: int, requested_bytes: int | None) -> int:
    """The SM's shared memory for a carve-out request: None means the largest
    (the occupancy calculator's default); otherwise the smallest supported
    carve-out at least as large as the request."""
    spec = architecture(arch)
    if requested_bytes is None:
        return spec.shared_per_sm
    if requested_bytes < 0:
        raise ValueError(f"requested_bytes: expected None or a size >= 0, got {requested_bytes}")
    for size_kib in spec.carveouts_kib:
        if size_kib * 1024 >= requested_bytes:
            return size_kib * 1024
    raise ValueError(f"requested_bytes: sm_{arch} has at most {spec.shared_per_sm} bytes of shared memory "
                     f"per SM, got {requested_bytes}")


def occupancy(arch: int, threads_per_block: int, registers: int, static_shared: int = 0,
              dynamic_shared: int = 0, *, carveout: int | None = None, optin: bool = False) -> Occupancy:
    """Theoretical occupancy of a kernel on one SM of compute capability ``arch``.

    ``registers`` per thread and ``static_shared`` bytes as ptxas reports them;
    ``dynamic_shared`` bytes as the launcher passes them; ``carveout`` the
    requested shared memory per SM in bytes (None: the largest); ``optin``
    whether the kernel raised its per-block shared memory limit above 48 KiB.
    A kernel that cannot launch (too many registers or too much shared memory
    per block) gets 0 blocks, and the limiter names the resource.
    """
    spec = architecture(arch)
    for name, value in (("threads_per_block", threads_per_block), ("registers", registers),
                        ("static_shared", static_shared), ("dynamic_shared", dynamic_shared)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a whole number >= 0, got {value!r}")
    if not 1 <= threads_per_block <= spec.max_threads_per_block:
        raise ValueError(f"threads_per_block: expected 1 to {spec.max_threads_per_block}, got {threads_per_block}")

    warps = -(-threads_per_block // WARP)
    limits = {"warps": spec.max_warps_per_sm // warps, "blocks": spec.max_blocks_per_sm}

    # Registers: per warp in units of 256, per sub-partition; the block must fit
    # the per-block register file with its warps rounded up to the sub-partitions.
    per_warp = _round_up(registers * WARP, spec.register_unit)
    if registers > spec.max_registers_per_thread or per_warp * _round_up(warps, spec.sub_partitions) > \
            spec.registers_per_block:
        limits["registers"] = 0
    elif per_warp == 0:
        limits["registers"] = spec.max_blocks_per_sm
    else:
        warps_per_partition = (spec.registers_per_sm // spec.sub_partitions) // per_warp
        limits["registers"] = warps_per_partition * spec.sub_partitions // warps

    # Shared memory: static + dynamic + reserved, in units of 128 bytes.
    shared = _round_up(static_shared + dynamic_shared + spec.reserved_shared_per_block, spec.shared_granularity)
    block_limit = (spec.shared_per_block_optin if optin else spec.shared_per_block) + spec.reserved_shared_per_block
    sm_shared = carveout_bytes(arch, carveout)
    if shared > block_limit:
        limits["shared memory"] = 0
    else:
        if sm_shared < shared:  # a carve-out smaller than one block is raised to fit it
            sm_shared = carveout_bytes(arch, shared)
        limits["shared memory"] = sm_shared // shared

    blocks = min(limits.values())
    limiter = " and ".join(name for name in LIMITERS if limits[name] == blocks)
    return Occupancy(blocks_per_sm=blocks, occupancy=blocks * warps / spec.max_warps_per_sm, limiter=limiter,
                     limits=limits, warps_per_block=warps, registers_per_warp=per_warp,
                     shared_bytes_per_block=shared, shared_per_sm=sm_shared)


@dataclasses.dataclass(frozen=True)
class Waves:
    """How a grid fills the GPU: the blocks that do work, in waves of
    (resident blocks per SM x SMs)."""

    blocks: int
    capacity: int  # blocks resident at once on the whole GPU
    waves: int
    last_wave_fill: float  # the last wave's blocks over the capacity (1 when full)


def waves(blocks: int, blocks_per_sm: int, multiprocessors: int) -> Waves:
    """Waves of a grid of ``blocks`` when each of ``multiprocessors`` SMs holds
    ``blocks_per_sm`` at once. No blocks: 0 waves, fill 0."""
    if blocks_per_sm < 1 or multiprocessors < 1:
        raise ValueError(f"blocks_per_sm, multiprocessors: expected >= 1, got {blocks_per_sm}, {multiprocessors}")
    capacity = blocks_per_sm * multiprocessors
    if blocks <= 0:
        return Waves(0, capacity, 0, 0.0)
    count = math.ceil(blocks / capacity)
    return Waves(blocks, capacity, count, (blocks - (count - 1) * capacity) / capacity)
