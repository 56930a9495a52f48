"""Data races of emulated launches, found on the CPU as compute-sanitizer's racecheck finds them on a GPU.

    with racecheck.checking() as launches:
        topk_moe.moe_forward(x, weights, cfg, backend="cuda-emulated")
    for launch in launches: launch.hazards

    MOE_EMULATOR_RACECHECK=1 python -m pytest tests/test_cuda.py   # every launch; a hazard fails it

Inside ``checking()`` (or with the environment variable ``MOE_EMULATOR_RACECHECK=1``)
the emulator's loader builds and runs the instrumented ("traffic") flavour of each
kernel file, and racecheck.h looks at every shared- and global-memory access with
its thread, block and source line. A hazard is two accesses to one byte by
different threads, at least one a write and not both atomic, that no barrier
orders: ``__syncthreads`` orders a block, ``__syncwarp`` the lanes it names;
shuffles and votes exchange registers and order nothing; nothing orders two
blocks of one launch. A cp.async copy is in flight from its issue to the
``cp.async.wait_group`` that completes it. The rules are written out at the top
of racecheck.h.

``checking(fail=True)`` and the environment variable raise ``RaceHazard`` at the
first launch with a hazard; ``checking()`` collects
every launch's hazards instead. ``racecheck_cases.run_all_kernels()`` runs every kernel of
kernels/topk_moe/cuda at small shapes under racecheck and summarises (the device
check compares it with compute-sanitizer's racecheck on a GPU).

What it cannot see: it checks the accesses of one schedule of one input (a race
on a path the input does not take is not seen), the host compiler's loads and
stores rather than nvcc's, and data races only: not the memory-model effects of
real hardware beyond them (ordering of accesses that do not conflict, fences,
visibility between blocks that a GPU's caches give or withhold), and not the
timing of real warps. These are results of CPU emulation, not GPU runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os

from . import traffic

ENVIRONMENT_VARIABLE = "MOE_EMULATOR_RACECHECK"
SPACES = ("global", "shared")
KINDS = ("read", "write", "atomic")

_collectors: list = []  # [(launches list, fail)]


@dataclasses.dataclass(frozen=True)
class Access:
    """One side of a hazard: where and by whom."""

    line: str        # "kernels/topk_moe/cuda/<file>:<line>"
    kind: str        # read, write or atomic
    block: tuple     # (x, y, z)
    thread: tuple    # (x, y, z)
    asynchronous: bool  # a cp.async copy in flight

    def __str__(self) -> str:
        what = f"{'cp.async ' if self.asynchronous else ''}{self.kind}"
        return f"{what} at {self.line} by block {self.block} thread {self.thread}"


@dataclasses.dataclass(frozen=True)
class Hazard:
    """Conflicting accesses of two sites: the first pair found, and how many pairs."""

    space: str       # global or shared
    array: str       # the kernel's parameter name (global) or "shared"
    offset: int      # byte offset in the array, or the shared-memory address
    first: Access
    second: Access
    pairs: int       # conflicting access pairs of these two sites in the launch

    def __str__(self) -> str:
        where = f"{self.array}[byte {self.offset}]" if self.space == "global" else f"shared address {self.offset}"
        return (f"race on {self.space} memory, {where}: {self.first} and {self.second} "
                f"({self.pairs} conflicting pair{'s' if self.pairs != 1 else ''})")


@dataclasses.dataclass(frozen=True)
class LaunchRaces:
    file: str
    kernel: str
    grid: tuple
    block: tuple
    hazards: tuple


class RaceHazard(RuntimeError):
    """A launch had a data race (raised by ``checking(fail=True)`` and the environment variable)."""

    def __init__(self, launch: LaunchRaces):
        self.launch = launch
        lines = [f"kernel {launch.kernel} ({launch.file}, grid {launch.grid}, block {launch.block}): "
                 f"{len(launch.hazards)} data race hazard{'s' if len(launch.hazards) != 1 else ''} (CPU emulation)"]
        lines += [f"  {h}" for h in launch.hazards[:10]]
        super().__init__("\n".join(lines))


@contextlib.contextmanager
def checking(fail: bool = False):
    """Check every emulated launch inside for data races; yields the list of
    LaunchRaces. ``fail``: raise ``RaceHazard`` at the first launch with a hazard."""
    if not isinstance(fail, bool):
        raise TypeError(f"checking: fail must be a bool, got {type(fail).__name__}")
    launches: list = []
    entry = (launches, fail)
    _collectors.append(entry)
    try:
        yield launches
    finally:
        _collectors.remove(entry)


def from_environment() -> bool:
    """True when ``MOE_EMULATOR_RACECHECK`` asks for every launch to be checked."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if value in ("", "0", "no", "off", "false"):
        return False
    if value in ("1", "yes", "on", "true"):
        return True
    raise ValueError(f"{ENVIRONMENT_VARIABLE} must be 1 or 0 (on or off), got {value!r}")


def active() -> bool:
    return bool(_collectors) or from_environment()


def begin(library: ctypes.CDLL, regions) -> None:
    """Register the launch's global arrays: [(start address, bytes)]."""
    starts = (ctypes.c_ulonglong * max(1, len(regions)))(*[r[0] for r in regions])
    sizes = (ctypes.c_ulonglong * max(1, len(regions)))(*[r[1] for r in regions])
    library.emu_race_begin(len(regions), starts, sizes)


def _unravel(linear: int, dims) -> tuple:
    x = linear % dims[0]
    y = (linear // dims[0]) % dims[1]
    return (x, y, linear // (dims[0] * dims[1]))


def finish(library: ctypes.CDLL, library_path: str, file: str, kernel: str, grid, block, names) -> None:
    """Read the hazards of the launch that just ran, add them to every collector,
    and raise ``RaceHazard`` if a collector (or the environment variable) asks."""
    values = (ctypes.c_longlong * 14)()
    raw = []
    for i in range(library.emu_race_hazard_count()):
        library.emu_race_hazard(i, values)
        raw.append(tuple(values))
    library.emu_race_end()
    lines = traffic.source_lines(library_path, tuple({r[4] for r in raw} | {r[9] for r in raw}))
    hazards = []
    for r in raw:
        space, buffer, offset, pairs = r[0], r[1], r[2], r[3]
        sides = [Access(lines[pc], KINDS[kind], _unravel(blk, grid), _unravel(thread, block), bool(asynchronous))
                 for pc, kind, asynchronous, blk, thread in (r[4:9], r[9:14])]
        array = "shared" if space == 1 else (names[buffer] if 0 <= buffer < len(names) else f"argument {buffer}")
        hazards.append(Hazard(SPACES[space], array, int(offset), sides[0], sides[1], int(pairs)))
    launch = LaunchRaces(file, kernel, tuple(grid), tuple(block), tuple(hazards))
    for launches, _ in _collectors:
        launches.append(launch)
    if hazards and (from_environment() or any(fail for _, fail in _collectors)):
        raise RaceHazard(launch)
