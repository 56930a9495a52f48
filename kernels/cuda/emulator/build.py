"""Builds a rewritten kernels/cuda `.cu` file into a shared library with the host
C++ compiler, cached outside the repository.

The cache key is a hash of everything that decides the binary: the rewritten
text of the file and of every local header it includes, cuda_emulator.h, the
-D constants, the compiler's version line and the flags. The cache folder is
``$MOE_EMULATOR_CACHE``, else ``~/.cache/moe-kernels-emulator``; a build writes
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
    return Path(os.environ.get("MOE_EMULATOR_CACHE") or Path.home() / ".cache" / "moe-kernels-emulator")


def rewritten_sources(file: str, kernel_dir: Path = KERNEL_DIR) -> dict:
    """{name: rewritten text} for ``file`` and the local headers it includes."""
    sources, pending = {}, [file]
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        text = (kernel_dir / name).read_text(encoding="utf-8")
        # `#line` makes compiler errors and sanitizer faults name the real file.
        sources[name] = f'#line 1 "kernels/cuda/{name}"\n' + rewrite.rewrite(text, name)
        pending.extend(rewrite.local_includes(text))
    return sources


def build(file: str, options: tuple, kernel_dir: Path = KERNEL_DIR) -> Path:
    """The shared library of ``file`` built with the -D ``options``; cached."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set $CXX or install g++)")
    sources = rewritten_sources(file, kernel_dir)
    key = hashlib.sha256()
    for name in sorted(sources):
        key.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    key.update(HEADER.read_bytes())
    key.update("\0".join(tuple(options) + FLAGS + (_compiler_version(cxx),)).encode())
    digest = key.hexdigest()[:24]
    library = cache_dir() / f"{Path(file).stem}-{digest}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=library.parent) as folder:
        for name, text in sources.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        main = Path(folder) / (file + ".cc")
        main.write_text(f'#include "{file}"\n', encoding="utf-8")
        output = Path(folder) / "kernel.so"
        command = [cxx, *FLAGS, "-include", str(HEADER), "-I", folder, *options, "-o", str(output), str(main)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{file}: the host compiler failed ({' '.join(options)}):\n{result.stderr[-6000:]}")
        os.replace(output, library)
    return library
