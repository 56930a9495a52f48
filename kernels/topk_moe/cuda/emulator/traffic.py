"""Memory traffic of emulated launches, counted: the requests each kernel makes.

    with traffic.counting() as launches:
        topk_moe.moe_forward(x, weights, cfg, backend="cuda-emulated")
    for launch in launches: launch.sites, launch.arrays

Inside ``counting()`` the emulator's loader builds and runs the "traffic" flavour
of each kernel file (build.py: GCC's ThreadSanitizer instrumentation calls the
hooks of traffic.h before every load and store; no sanitizer runtime). Each
launch adds one ``LaunchTraffic``: per access site (the kernels/topk_moe/cuda source line,
global and shared memory apart) the warp-wide requests, the 32-byte sectors
they touch against the minimum (global) and the shared-memory wavefronts
against the minimum (bank conflicts); per array argument the distinct bytes
read and written (the ideal: each byte once), the distinct sectors of the launch
(compulsory traffic) and the sum over blocks of each block's distinct sectors.

The grouping into warp-wide requests, and the bank and sector rules, are
written at the top of traffic.h. These are counts of a CPU emulation: the
requests the kernel's source makes, compiled by the host compiler; not DRAM
traffic (no cache is modelled), and not what nvcc's code or a GPU's counters
would show where the two compilers keep different loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import re
import subprocess
from pathlib import Path
from typing import Optional

from . import rewrite

SPACES = ("global", "shared")
KINDS = ("read", "write", "atomic", "ldmatrix")
SECTOR_BYTES = 32

_collectors: list = []


@dataclasses.dataclass(frozen=True)
class Site:
    """One access site of a launch: all warp-wide requests of one instruction."""

    line: str            # "kernels/topk_moe/cuda/<file>:<line>" (innermost kernels/topk_moe/cuda frame)
    space: str           # global or shared
    kind: str            # read, write, atomic or ldmatrix
    access_bytes: int    # bytes one lane accesses
    requests: int        # warp-wide requests (see traffic.h for the grouping)
    lane_accesses: int
    bytes: int           # bytes the lanes asked for, summed
    sectors: int         # global: distinct 32-byte sectors per request, summed
    min_sectors: int     # global: ceil(distinct bytes / 32) per request, summed
    wavefronts: int      # shared: wavefronts per request, summed
    min_wavefronts: int  # shared: ceil(distinct 4-byte words / 32) per request, summed


@dataclasses.dataclass(frozen=True)
class ArrayTraffic:
    """One array argument of a launch (global memory)."""

    name: str                   # the kernel's parameter name
    read_bytes: int             # distinct bytes read in the launch
    written_bytes: int          # distinct bytes written
    read_sectors: int           # distinct sectors read (compulsory)
    written_sectors: int
    block_read_sectors: int     # sum over blocks of each block's distinct sectors read
    block_written_sectors: int


@dataclasses.dataclass(frozen=True)
class LaunchTraffic:
    file: str
    kernel: str
    grid: tuple
    block: tuple
    sites: tuple
    arrays: tuple


@contextlib.contextmanager
def counting():
    """Count the traffic of every emulated launch inside; yields the list of LaunchTraffic."""
    launches: list = []
    _collectors.append(launches)
    try:
        yield launches
    finally:
        _collectors.remove(launches)


def active() -> bool:
    return bool(_collectors)


def begin(library: ctypes.CDLL, regions) -> None:
    """Register the launch's global arrays: [(start address, bytes)]."""
    starts = (ctypes.c_ulonglong * max(1, len(regions)))(*[r[0] for r in regions])
    sizes = (ctypes.c_ulonglong * max(1, len(regions)))(*[r[1] for r in regions])
    library.emu_traffic_begin(len(regions), starts, sizes)


def finish(library: ctypes.CDLL, library_path: str, file: str, kernel: str, grid, block, names) -> None:
    """Read the counts of the launch that just ran and add them to every collector."""
    values = (ctypes.c_longlong * 11)()
    raw = []
    for i in range(library.emu_traffic_site_count()):
        library.emu_traffic_site(i, values)
        raw.append(tuple(values))
    lines = source_lines(library_path, tuple(r[0] for r in raw))
    merged: dict = {}
    for r in raw:  # several instructions may share a line: one Site per (line, space, kind)
        key = (lines[r[0]], SPACES[r[1]], KINDS[r[2]])
        total = merged.setdefault(key, [0] * 8)
        total[0] = max(total[0], r[3])
        for j in range(1, 8):
            total[j] += r[3 + j]
    sites = tuple(Site(line, space, kind, *total) for (line, space, kind), total in sorted(merged.items()))
    buffer_values = (ctypes.c_longlong * 6)()
    arrays = []
    for i, name in enumerate(names):
        library.emu_traffic_buffer(i, buffer_values)
        arrays.append(ArrayTraffic(name, *tuple(buffer_values)))
    launch = LaunchTraffic(file, kernel, tuple(grid), tuple(block), sites, tuple(arrays))
    for collector in _collectors:
        collector.append(launch)


@functools.lru_cache(maxsize=None)
def _addr2line_cache(library_path: str) -> dict:
    return {}


def source_lines(library_path: str, offsets: tuple) -> dict:
    """{offset: "kernels/topk_moe/cuda/<file>:<line>"}: the innermost inlined frame of each
    instruction that lies in a kernels/topk_moe/cuda source (not the emulator's header)."""
    cache = _addr2line_cache(library_path)
    missing = sorted({o for o in offsets if o not in cache})
    if missing:
        # A return address points after the call: the call itself is at offset - 1.
        command = ["addr2line", "-e", library_path, "-i", "-a", *[hex(max(0, o - 1)) for o in missing]]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
        frames, current = {}, None
        by_address = {max(0, o - 1): o for o in missing}
        for text in output:
            if text.startswith("0x"):
                current = by_address[int(text, 16)]
                frames[current] = []
            elif current is not None:
                frames[current].append(text.split(" (discriminator")[0].strip())
        for offset in missing:
            # `#line` names each source kernels/topk_moe/cuda/<file> (addr2line may prefix a folder);
            # the emulator's own header lives in kernels/topk_moe/cuda/emulator/.
            names = [f[f.rindex("kernels/topk_moe/cuda/"):] for f in frames.get(offset, []) if "kernels/topk_moe/cuda/" in f]
            chosen = next((f for f in names if not f.startswith("kernels/topk_moe/cuda/emulator/")), None)
            cache[offset] = chosen or "(emulator)"
    return {o: cache[o] for o in offsets}


_PARAMETERS = re.compile(r"\((?P<params>[^()]*(?:\([^()]*\)[^()]*)*)\)\s*\{")


@functools.lru_cache(maxsize=None)
def parameter_names(source_path: str, kernel: str) -> tuple:
    """The parameter names of ``kernel`` in the .cu file at ``source_path``."""
    text = rewrite.blank_comments_and_strings(Path(source_path).read_text(encoding="utf-8"))
    match = re.search(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?" + re.escape(kernel) + r"\s*\(", text)
    if match is None:
        return ()
    depth, i = 1, match.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    params = text[match.end():i - 1]
    return tuple(re.findall(r"([A-Za-z_]\w*)\s*(?:\[[^\]]*\])?\s*$", p.strip())[0] for p in params.split(",") if p.strip())


def site_ratio(sites, numerator: str, denominator: str, space: Optional[str] = None) -> float:
    """sum(numerator) / sum(denominator) over ``sites`` (of ``space``); NaN when empty."""
    chosen = [s for s in sites if space is None or s.space == space]
    below = sum(getattr(s, denominator) for s in chosen)
    return sum(getattr(s, numerator) for s in chosen) / below if below else float("nan")
