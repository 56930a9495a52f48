"""Builds a rewritten kernels/topk_moe/cuda `.cu` file into a shared library with the host
C++ compiler, cached outside the repository.

The cache key is a hash of everything that decides the binary: the rewritten
text of the file and of every local header it includes, cuda_emulator.h, the
-D constants, the compiler's version line and the flags. The "traffic" flavour
(``traffic=True``) is a second build of the same file with the memory-traffic
counters of traffic.h and the data-race detector of racecheck.h (which of the two
runs is chosen per launch): GCC's ThreadSanitizer instrumentation compiled in (a hook
call before every load and store), debug line tables for the access sites, no
sanitizer runtime linked; it has its own cache key, so ordinary emulated runs
keep the fast build. The cache folder is
``$MOE_EMULATOR_CACHE``, else ``~/.cache/topk-moe-emulator``; a build writes
to a temporary name and renames, so parallel test processes never read half a
library.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from . import rewrite

HEADER = Path(__file__).resolve().parent / "cuda_emulator.h"
KERNEL_DIR = Path(__file__).resolve().parent.parent

#: -O2 keeps a 256-thread block of fibers fast; -ffp-contract=off keeps a * b + c
#: two roundings, as written (fmaf is the only fused multiply-add), so results do
#: not depend on the host's FMA units; the sanitizers report misaligned vector
#: accesses and local-array indices out of bounds to cuda_emulator.h's handlers.
FLAGS = ("-std=c++17", "-O2", "-g0", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
         "-fsanitize=alignment,bounds", "-Wl,-z,defs", "-w")


#: The traffic flavour compiles with these instead of -g0 (the object is linked
#: without -fsanitize=thread, so no runtime comes with it). Vectorisation and
#: store merging and scalar replacement of aggregates are off so that each
#: load or store of the source (a float4 too) stays one
#: access of its own width, as the kernel wrote it; function-local statics
#: without thread-safe guards (the emulator runs one thread; the guards would
#: call ThreadSanitizer's atomics). DWARF 4 line tables: binutils' addr2line misnames
#: the `#line` file in some DWARF 5 entries.
TRAFFIC_FLAGS = ("-gdwarf-4", "-DEMU_TRAFFIC", "-fsanitize=thread", "-fno-tree-vectorize", "-fno-tree-slp-vectorize",
                 "-fno-store-merging", "-fno-tree-sra", "-fno-threadsafe-statics")
TRAFFIC_HEADER = HEADER.parent / "traffic.h"
RACECHECK_HEADER = HEADER.parent / "racecheck.h"


class BuildError(RuntimeError):
    """The host compiler refused a kernel file; the message has its output."""


def compiler() -> Optional[str]:
    """The host C++ compiler: $CXX, else g++ or c++ on the PATH; None if there is none."""
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_EMULATOR_CACHE") or Path.home() / ".cache" / "topk-moe-emulator")


def rewritten_sources(file: str, kernel_dir: Path = KERNEL_DIR) -> dict:
    """{name: rewritten text} for ``file`` and the local headers it includes."""
    sources, pending = {}, [file]
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        text = (kernel_dir / name).read_text(encoding="utf-8")
        # `#line` makes compiler errors and sanitizer faults name the real file.
        sources[name] = f'#line 1 "kernels/topk_moe/cuda/{name}"\n' + rewrite.rewrite(text, name)
        pending.extend(rewrite.local_includes(text))
    return sources


def build(file: str, options: tuple, kernel_dir: Path = KERNEL_DIR, *, traffic: bool = False) -> Path:
    """The shared library of ``file`` built with the -D ``options`` (the traffic
    flavour when ``traffic``); cached."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set $CXX or install g++)")
    sources = rewritten_sources(file, kernel_dir)
    key = hashlib.sha256()
    for name in sorted(sources):
        key.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    key.update(HEADER.read_bytes())
    flags = FLAGS
    if traffic:
        key.update(TRAFFIC_HEADER.read_bytes())
        key.update(RACECHECK_HEADER.read_bytes())
        flags = tuple(f for f in FLAGS if f != "-g0") + TRAFFIC_FLAGS
    key.update("\0".join(tuple(options) + flags + (_compiler_version(cxx),)).encode())
    digest = key.hexdigest()[:24]
    library = cache_dir() / f"{Path(file).stem}-{'traffic-' if traffic else ''}{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=library.parent) as folder:
        for name, text in sources.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        main = Path(folder) / (file + ".cc")
        main.write_text(f'#include "{file}"\n', encoding="utf-8")
        output = Path(folder) / "kernel.so"
        command = [cxx, *flags, "-include", str(HEADER), "-I", folder, *options, "-o", str(output), str(main)]
        if traffic:  # compile with the instrumentation, link without its runtime
            objects = Path(folder) / "kernel.o"
            compile_only = [c for c in command if not c.startswith("-Wl,") and c != "-shared"]
            compile_only[compile_only.index("-o") + 1] = str(objects)
            result = subprocess.run(compile_only + ["-c"], capture_output=True, text=True)
            command = [cxx, "-shared", "-fPIC", "-Wl,-z,defs", "-Wl,-Bsymbolic", "-o", str(output), str(objects)]
            if result.returncode != 0:
                raise BuildError(f"{file}: the host compiler failed ({' '.join(options)}):\n{result.stderr[-6000:]}")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{file}: the host compiler failed ({' '.join(options)}):\n{result.stderr[-6000:]}")
        os.replace(output, library)
    return library
